"""`dashrl`: the command line. Configs are resolved and validated here, before Prefect or torch start any work."""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
from pathlib import Path

import yaml

from dash_core.config import DEFAULT_TRACKING_URI, ConfigError, DashConfig, load_config
from dash_core.presets import Preset
from flows import interrupted

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) applied in order, e.g. configs/math.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set algo.tau=0.2 (repeatable)")
    parser.add_argument("--model", help="hub id, local directory, 'tiny', or a zoo name such as smollm2-135m")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dashrl", description="DASH: on-policy RL post-training for reasoning.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (the embedded default needs no GPU and no network)")
    _config_args(train)
    train.add_argument("--resume", metavar="RUN_ID", help="continue an MLflow run from its last checkpoint")
    train.add_argument("--learners", type=_positive, default=1, metavar="N",
                       help="processes on this machine, each sampling and learning its share (one GPU each); "
                            "under torchrun, leave it out: torchrun starts the processes")  # fmt: skip

    evaluate = commands.add_parser("eval", help="score a model: greedy and sampled accuracy, pass@k")
    _config_args(evaluate)
    evaluate.add_argument("--dataset", help="math500, math, gsm8k, mbpp, mbppplus (default: the task's held-out set)")
    evaluate.add_argument("--data-path", help="local file or folder of the dataset (jsonl, jsonl.gz, parquet)")
    evaluate.add_argument("--split", help="dataset split (train / test / all)")
    evaluate.add_argument("--size", type=int, help="evaluate a seeded random subset of this many problems")
    evaluate.add_argument("--n", type=int, help="samples per problem (sampled accuracy, pass@k)")
    evaluate.add_argument("--k", help="comma-separated pass@k values, e.g. 1,4,8")
    evaluate.add_argument("--max-new-tokens", type=int)
    evaluate.add_argument("--temperature", type=float)
    evaluate.add_argument("--out", default="eval_results", help="folder for per-problem results (JSONL)")

    sweep = commands.add_parser("sweep", help="run presets side by side (one MLflow experiment) and report")
    _config_args(sweep)
    sweep.add_argument("--presets", required=True, type=_presets, help=f"comma-separated, of: {','.join(Preset)}")
    sweep.add_argument("--seeds", default=[0], type=_seeds, help="comma-separated seeds, each preset runs once per seed (default: 0)")
    budget = sweep.add_mutually_exclusive_group()
    budget.add_argument("--budget-minutes", type=float, help="training wall-clock per run")
    budget.add_argument("--budget-samples", type=int, help="sampled completions per run")
    sweep.add_argument("--fan-out", action="store_true",
                       help="every preset x seed a flow run of dash-train/default on its work pool, all at once "
                            "(needs PREFECT_API_URL, the deployment, workers and a budget)")  # fmt: skip
    sweep.add_argument("--name", help="MLflow experiment of the sweep (default: sweep-<date>-<time>)")
    sweep.add_argument("--report-dir", default="reports", help="local folder for the report")

    report = commands.add_parser("report", help="rebuild a sweep's report from MLflow")
    report.add_argument("--experiment", required=True, help="the sweep's MLflow experiment")
    report.add_argument("--run", help="the sweep's parent run id (default: the latest sweep in the experiment)")
    report.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    report.add_argument("--out", default="reports", help="folder for report.md and the plots")

    serve = commands.add_parser("serve", help="run a vLLM inference server that training runs can sync weights to")
    serve.add_argument("--model", required=True, help="model directory, hub id or zoo name (e.g. smollm2-135m)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: extra `vllm serve` arguments")

    bench = commands.add_parser("bench", help="run a benchmark from bench/ (prints a table)")
    bench.add_argument("name", choices=sorted(p.stem for p in BENCH_DIR.glob("[!_]*.py")))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own options (see --help)")

    models = commands.add_parser("models", help="models that install without the hub")
    models.add_argument("action", choices=["pull"])
    models.add_argument("name", help="e.g. smollm2-135m")
    return parser


def _presets(text: str) -> list[Preset]:
    """`dash,grpo` -> the presets, or an error naming the unknown one and the choices."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in Preset.__members__]
    if unknown or not names:
        problem = f"unknown preset {unknown[0]!r}" if unknown else "no preset given"
        raise argparse.ArgumentTypeError(f"{problem} (choose from {', '.join(Preset)})")
    return [Preset(name) for name in names]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides) + ([f"model.name={args.model}"] if args.model else [])
    if args.command == "sweep":
        return overrides
    if args.command == "eval":
        if args.dataset:
            dataset = {"name": args.dataset, "path": args.data_path, "split": args.split, "size": args.size}
            overrides.append("eval.datasets=" + yaml.safe_dump([{k: v for k, v in dataset.items() if v is not None}]))
        elif args.data_path:
            raise ConfigError("--data-path needs --dataset (which set the file holds)")
        for flag, key in [("n", "eval.n"), ("max_new_tokens", "eval.max_new_tokens"), ("temperature", "eval.temperature")]:
            if getattr(args, flag) is not None:
                overrides.append(f"{key}={getattr(args, flag)}")
        if args.k:
            overrides.append(f"eval.ks=[{args.k}]")
    return overrides


def resolve_config(args: argparse.Namespace) -> DashConfig:
    overrides = _overrides(args)
    config = load_config(args.config, overrides)
    if getattr(args, "resume", None):
        from dash_core.tracking import run_config

        base = yaml.safe_load(run_config(config.tracking, args.resume))
        config = load_config(args.config, overrides, base=base)
    if args.command == "train":
        config.require_standalone()
        from dash_core.preflight import check_run

        check_run(config)  # before Prefect starts: one line per bad input, no flow-run traceback
    elif args.command == "eval":
        from dash_core.evaluation import evaluation_sets
        from dash_core.preflight import check_device, check_model, check_sandbox, check_tracking

        check_model(config.model)
        check_device(config.model.device)
        check_sandbox(config, list(evaluation_sets(config).values()))
        check_tracking(config.tracking)
    return config


def _quiet_defaults() -> None:
    """Defaults for a terminal run; users can still set every one of these themselves.

    Per-task INFO lines would bury the progress display. The ephemeral Prefect server's telemetry heartbeat races
    its first database migration (a `database is locked` traceback on a fresh PREFECT_HOME), and its 20 s start-up
    limit is too short on a busy 2-core machine."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _show_dash_logs() -> None:
    """dash_core reports its slow steps (server start-up, resume, evaluation) at INFO, which root's WARNING hides."""
    logging.getLogger("dash_core").setLevel(logging.INFO)
    if not logging.getLogger().handlers:  # commands that never import Prefect, whose handler prints them otherwise
        logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s - %(message)s", datefmt="%H:%M:%S")


def _run(args: argparse.Namespace, config: DashConfig) -> None:
    if args.command == "train":
        from flows.train import dash_train

        dash_train(config=config, resume=args.resume)
    elif args.command == "sweep":
        from flows.sweep import dash_sweep

        folder = dash_sweep(
            presets=args.presets, seeds=args.seeds, configs=args.config, overrides=_overrides(args),
            budget_minutes=args.budget_minutes, budget_samples=args.budget_samples, fan_out=args.fan_out,
            experiment=args.name, report_dir=args.report_dir,
        )  # fmt: skip
        print((Path(folder) / "report.md").read_text())
        print(f"report and plots: {folder}")
    else:
        from rich.console import Console

        from flows.evaluate import dash_eval

        metrics = dash_eval(config=config, out_dir=args.out)
        Console().print({k: round(v, 4) for k, v in metrics.items()})


def main(argv: list[str] | None = None) -> int:
    """`dashrl`. A Ctrl-C at any moment ends it with one line and exit status 130 (a training run keeps its
    checkpoint and prints how to resume first)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return interrupted()


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    _quiet_defaults()
    if args.command == "models":
        from dash_core.model_zoo import pull

        print(pull(args.name))
        return 0
    if args.command == "bench":
        sys.argv = [str(BENCH_DIR / f"{args.name}.py"), *args.bench_args]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    if args.command == "serve":
        from dash_core.model_zoo import resolve
        from dash_core.serving import serve

        _show_dash_logs()
        serve(resolve(args.model), args.port, [a for a in args.vllm_args if a != "--"], host=args.host)
        return 0
    if args.command == "report":
        from dash_core.report import build_report

        try:
            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
            folder = build_report(uri, args.experiment, Path(args.out) / args.experiment, args.run)
        except ValueError as exc:
            print(f"dashrl: {exc}", file=sys.stderr)
            return 1
        print((folder / "report.md").read_text())
        return 0
    if args.command == "train" and os.environ.get("RANK", "0") != "0":  # a later process of the run (torchrun, --learners)
        return _join()
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"dashrl: {exc}", file=sys.stderr)
        return 2
    from dash_core.learner import NonFiniteLossError
    from dash_core.loop import EverythingFilteredError, ResumeError
    from dash_core.team import Followers, team
    from flows.prefect_api import prefect_api

    _show_dash_logs()
    followers = Followers(args.learners) if args.command == "train" and args.learners > 1 and "WORLD_SIZE" not in os.environ else None
    finished = False
    try:
        with prefect_api():
            _run(args, config)
        finished = True
    except (ConfigError, NonFiniteLossError, EverythingFilteredError, ResumeError, OSError, ValueError) as exc:
        print(f"dashrl: {exc}", file=sys.stderr)
        return 1
    except RuntimeError:
        if followers and (lost := followers.lost()):
            print(f"dashrl: {lost}, so the run stopped (its output above says why); resume as above", file=sys.stderr)
            return 1
        raise
    finally:
        if finished and args.command == "train":
            team().disband()
        if followers:
            followers.close(finished)
    return 0


def _join() -> int:
    """A later process of a run: the same loop as the first, on its share of the work, without Prefect or MLflow.
    A terminal's Ctrl-C is the first process's to handle: it keeps what is learned and the others end with it."""
    import signal

    from dash_core import loop
    from dash_core.learner import NonFiniteLossError
    from dash_core.run import TrainingRun
    from dash_core.serving import die_with_parent
    from dash_core.team import team

    if "DASH_LEADER_PID" in os.environ and not die_with_parent(int(os.environ["DASH_LEADER_PID"])):
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _show_dash_logs()
    run = TrainingRun.join()
    try:
        loop.train(run)
    except (NonFiniteLossError, loop.EverythingFilteredError, loop.ResumeError):
        return 1  # every process meets it; the first one says why
    del run
    team().disband()
    return 0


if __name__ == "__main__":
    sys.exit(main())
