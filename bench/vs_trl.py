"""DASH against TRL's GRPOTrainer on the same work, side by side, alternated.

    dashrl bench vs_trl [--pairs 3 --budget-s 90 --threads 1 --prompts 64 --group 8 --max-new-tokens 8]
    (TRL is an optional extra: pip install -e .[peers])

Both systems start from the embedded default's warm-started policy, see the same prompt stream (DASH's own
`train_problems`, token ids checked equal), are rewarded by DASH's exact checker, and sample --prompts x --group
completions per optimizer step at temperature 1 with --max-new-tokens, lr 3e-4, no KL, fp32, the same torch
threads. DASH runs as `dashrl train` does (Prefect flow, MLflow, rollout store, checkpoints as by default); TRL
as `GRPOTrainer` configured to the same work: the whole batch sampled at once (`steps_per_generation`),
token-level loss (`dapo`), group-scaled rewards, constant lr, gradient checkpointing off. Each run trains for the
same wall-clock budget in a fresh process; its policy is then scored on the held-out set by DASH's evaluator.

Both systems are deterministic on this CPU, so pair i runs both with seed --seed + i: the pairs differ in prompt
stream and sampling, which is what the reward and accuracy comparisons average over.

Per system (means over runs): median and mean s/step (the whole cycle, step end to step end), samples/s,
generate / learn / other s/step, CPU s/step (the process tree's, Prefect's server included), reward per step,
held-out accuracy after the budget; then the ratios. The load other processes put on the machine is measured
during every run (system CPU time minus the run's own); ratios are refused when it differs between runs by more
than --max-load-spread cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench._shared import embedded_config, finish, warm_policy, worker

SYSTEMS = ("dash", "trl")
UNBOUNDED = 1_000_000


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config both systems are given (DASH's field names)."""
    return {
        "seed": args.seed,
        "threads": args.threads,
        "model": {"name": args.model},
        "warmup": {"steps": 0},
        "sampler": {
            "prompts_per_iteration": args.prompts,
            "group_size": args.group,
            "max_new_tokens": args.max_new_tokens,
        },
        "learner": {"lr": args.lr, "micro_batch_size": args.micro_batch},
    }


# -- DASH ---------------------------------------------------------------------------------------------------------
def run_dash(args: argparse.Namespace) -> dict[str, Any]:
    """`dashrl train` on the shared settings; per-step figures come back from the MLflow run it logged."""
    from mlflow.tracking import MlflowClient

    from dash_core.checkpoint import load_latest
    from dash_core.config import merge
    from dash_core.store import RunStore
    from flows.cli import main

    experiment = f"vs_trl-{uuid.uuid4().hex[:8]}"
    config = embedded_config(Path(args.workdir), **merge(settings(args), {
        "iterations": args.max_steps or UNBOUNDED, "budget_minutes": args.budget_s / 60,
        "eval": {"every": UNBOUNDED, "size": 50, "log_samples": 0}, "tracking": {"experiment": experiment},
    }))  # fmt: skip
    config_file = Path(args.workdir) / f"{experiment}.yaml"
    config_file.write_text(config.to_yaml())
    if main(["train", "--config", str(config_file)]) != 0:
        raise RuntimeError("dashrl train failed")
    client = MlflowClient(config.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = {key: sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
               for key in ("time/iteration_s", "time/sample_s", "time/learn_s", "reward/mean")}  # fmt: skip
    cycles = history["time/iteration_s"]
    steps = [
        {"end": cycle.timestamp / 1000, "cycle_s": cycle.value, "generate_s": sample.value, "learn_s": learn.value,
         "reward": reward.value}
        for cycle, sample, learn, reward in zip(*history.values(), strict=True)
    ]  # fmt: skip
    final = load_latest(RunStore(config.store.url, run.info.run_id), tempfile.mkdtemp(prefix="dash-final-"))
    return {"steps": steps, "loop_start": steps[0]["end"] - cycles[0].value, "model_dir": str(final.model_dir)}


# -- TRL ----------------------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """GRPOTrainer on the same prompts, reward, batch and budget; per-step figures from a callback and timers."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from dash_core.config import DashConfig
    from dash_core.data import build_task
    from dash_core.prompts import encode_prompts
    from dash_core.rewards.grading import grade

    torch.set_num_threads(args.threads)
    config = DashConfig.model_validate(settings(args))
    task = build_task(config.task, config.seed)
    steps_in_data = args.max_steps or int(args.budget_s / 0.05)  # more than any run reaches
    problems = [p for step in range(1, steps_in_data + 1) for p in task.train_problems(step, args.prompts)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.chat_template = None  # plain-text prompts, as DASH encodes them for this tokenizer
    sample = problems[: 8 * args.prompts]
    assert tokenizer(text=[p.prompt for p in sample])["input_ids"] == encode_prompts(tokenizer, sample), (
        "token ids differ"
    )

    rewards: list[float] = []

    def exact_answer(prompts: list[str], completions: list[str], index: list[int], **_: Any) -> list[float]:
        scores = grade([problems[i] for i in index], completions).rewards
        rewards.append(sum(scores) / len(scores))
        return scores

    micro = args.micro_batch
    samples = args.prompts * args.group
    trl_config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-"), seed=args.seed, use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=UNBOUNDED, disable_tqdm=True, max_steps=steps_in_data,
        num_generations=args.group, per_device_train_batch_size=micro, gradient_accumulation_steps=samples // micro,
        steps_per_generation=samples // micro, shuffle_dataset=False, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, beta=0.0, num_iterations=1,
        scale_rewards="group", loss_type="dapo", learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, use_vllm=False, gradient_checkpointing=False,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems], "index": list(range(len(problems)))})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=trl_config, train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    generate = _timed_method(trainer, "_generate_single_turn")
    generate_and_score = _timed_method(trainer, "_generate_and_score_completions")
    clock = budget_clock(args.budget_s)
    trainer.add_callback(clock)
    trainer.train()
    steps = []
    for i, end in enumerate(clock.ends):
        cycle = end - (clock.ends[i - 1] if i else clock.start)
        steps.append({"end": end, "cycle_s": cycle, "generate_s": generate[i], "learn_s": cycle - generate_and_score[i],
                      "reward": rewards[i]})  # fmt: skip
    model_dir = tempfile.mkdtemp(prefix="trl-final-")
    trainer.save_model(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"steps": steps, "loop_start": clock.start, "model_dir": model_dir}


def _timed_method(obj: Any, name: str) -> list[float]:
    """Wrap `obj.name` so that each call's wall-clock seconds are appended to the returned list."""
    seconds: list[float] = []
    original = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(obj, name, timed)
    return seconds


def budget_clock(budget_s: float) -> Any:
    """A TrainerCallback that records optimizer-step end times and stops training once the budget is spent, as
    DASH's budget_minutes does."""
    from transformers import TrainerCallback

    class BudgetClock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.time())
            control.should_training_stop = self.ends[-1] - self.start >= budget_s

    return BudgetClock()


# -- both -----------------------------------------------------------------------------------------------------------
def heldout_accuracy(model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    """DASH's evaluator on the embedded task's held-out problems: greedy and sampled accuracy."""
    import torch

    from dash_core.config import DashConfig
    from dash_core.evaluation import evaluate_model

    torch.manual_seed(args.seed)
    config = DashConfig.model_validate(
        settings(args) | {"model": {"name": model_dir}, "eval": {"size": args.eval_size, "n": args.eval_n}}
    )
    metrics = evaluate_model(config)["arithmetic"].metrics
    return {"greedy": metrics["eval/arithmetic/accuracy"], "sampled": metrics["eval/arithmetic/sampled_accuracy"]}


def work(system: str, args: argparse.Namespace) -> None:
    """Worker process: train one system, score it, write the record to --out."""
    record = run_dash(args) if system == "dash" else run_trl(args)
    record["loop_end"] = record["steps"][-1]["end"]
    record["heldout"] = heldout_accuracy(record.pop("model_dir"), args)
    Path(args.out).write_text(json.dumps(record))


class TreeWatcher:
    """Samples a process tree's CPU seconds and the whole machine's busy CPU seconds, four times a second."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.samples: list[tuple[float, float, float]] = []  # (time, tree CPU s, machine busy CPU s)
        self.cpu: dict[int, float] = {}  # last CPU seconds seen per process, so exited children still count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            try:
                for process in [self.root, *self.root.children(recursive=True)]:
                    times = process.cpu_times()
                    self.cpu[process.pid] = times.user + times.system
            except psutil.Error:
                continue
            machine = psutil.cpu_times()
            busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
            self.samples.append((time.time(), sum(self.cpu.values()), busy))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, moment: float) -> tuple[float, float]:
        """(tree CPU s, machine busy CPU s) at `moment`, interpolated between samples."""
        before = max((s for s in self.samples if s[0] <= moment), default=self.samples[0])
        after = min((s for s in self.samples if s[0] >= moment), default=self.samples[-1])
        if after[0] == before[0]:
            return before[1], before[2]
        w = (moment - before[0]) / (after[0] - before[0])
        return before[1] + w * (after[1] - before[1]), before[2] + w * (after[2] - before[2])


def summarise(record: dict[str, Any], samples_per_step: int) -> dict[str, float]:
    """One run's figures (excluding its first step, which also pays one-off start-up costs)."""
    steps = record["steps"][1:]
    wall = record["loop_end"] - record["loop_start"]
    return {
        "steps": len(record["steps"]),
        "median_s": statistics.median(s["cycle_s"] for s in steps),
        "mean_s": statistics.fmean(s["cycle_s"] for s in steps),
        "samples_per_s": samples_per_step * len(record["steps"]) / wall,
        "generate_s": statistics.fmean(s["generate_s"] for s in steps),
        "learn_s": statistics.fmean(s["learn_s"] for s in steps),
        "other_s": statistics.fmean(s["cycle_s"] - s["generate_s"] - s["learn_s"] for s in steps),
        "cpu_s": record["cpu_s"] / len(record["steps"]),
        "background_cores": record["background_cores"],
        "greedy": record["heldout"]["greedy"],
        "sampled": record["heldout"]["sampled"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="DASH/TRL run pairs, alternated")
    parser.add_argument("--budget-s", type=float, default=90, help="training wall-clock per run")
    parser.add_argument("--max-steps", type=int, help="also stop after this many optimizer steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=64, help="M prompts per optimizer step")
    parser.add_argument("--group", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=64, help="sequences per forward+backward, both systems")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument(
        "--seed", type=int, default=0, help="pair i runs both systems with seed + i (prompts, sampling)"
    )
    parser.add_argument("--eval-size", type=int, default=500, help="held-out problems scored after each run")
    parser.add_argument("--eval-n", type=int, default=4, help="samples per held-out problem (sampled accuracy)")
    parser.add_argument("--max-load-spread", type=float, default=0.25, help="cores of outside load runs may differ by")
    parser.add_argument("--systems", default="dash,trl", help="which systems to run (dash alone needs no TRL)")
    parser.add_argument("--workdir", help="warm-up cache, stores, MLflow and raw records (default: a temp folder)")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        return work(args.worker, args)
    systems = args.systems.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dash-vs-trl-"))
    args.model = warm_policy(workdir, args.threads)
    runs = compare(systems, args, workdir)
    report(runs, systems, args)


def compare(systems: list[str], args: argparse.Namespace, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """Run the systems alternately, --pairs times, the order swapped every pair; each record gets the CPU of the
    system's whole process tree (its threads and children: checkpoint writer, MLflow, a Prefect server) over its
    training loop, and the outside load."""
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("pairs", "systems", "workdir", "worker", "out", "max_load_spread", "seed") and v is not None]  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    for pair in range(args.pairs):
        for system in systems if pair % 2 == 0 else systems[::-1]:  # neither always runs first (a warm page cache)
            out = workdir / f"{system}-{pair}.json"
            load_before = os.getloadavg()[0]
            options = [*passed, f"--workdir={workdir}", f"--seed={args.seed + pair}"]  # both systems are deterministic
            process = worker(__file__, system, out, options, {"PREFECT_HOME": str(workdir / "prefect")})
            watcher = TreeWatcher(process.pid)
            try:
                record = finish(process, out)
            finally:
                watcher.stop()
            (tree_start, busy_start), (tree_end, busy_end) = (
                watcher.at(record["loop_start"]),
                watcher.at(record["loop_end"]),
            )
            wall = record["loop_end"] - record["loop_start"]
            record |= {"cpu_s": tree_end - tree_start, "background_cores": ((busy_end - busy_start) - (tree_end - tree_start)) / wall,
                       "load_before": load_before, "load_after": os.getloadavg()[0]}  # fmt: skip
            out.write_text(json.dumps(record))
            runs[system].append(record)
    return runs


def report(runs: dict[str, list[dict[str, Any]]], systems: list[str], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    samples = args.prompts * args.group
    figures = {system: [summarise(r, samples) for r in records] for system, records in runs.items()}
    columns = [("steps", "steps", "{:.0f}"), ("median_s", "median s/step", "{:.3f}"), ("mean_s", "mean s/step", "{:.3f}"),
               ("samples_per_s", "samples/s", "{:.0f}"), ("generate_s", "generate s/step", "{:.3f}"),
               ("learn_s", "learn s/step", "{:.3f}"), ("other_s", "other s/step", "{:.3f}"), ("cpu_s", "CPU s/step", "{:.3f}"),
               ("greedy", "held-out greedy", "{:.3f}"), ("sampled", "held-out sampled", "{:.3f}"),
               ("background_cores", "outside load (cores)", "{:.2f}")]  # fmt: skip
    title = (f"{args.prompts} prompts x {args.group} completions x {args.max_new_tokens} new tokens per step, "
             f"{args.budget_s:.0f} s budget per run, {args.threads} torch thread(s), runs alternated")  # fmt: skip
    table = Table(title=title)
    table.add_column("run")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    table.add_column("load before/after", justify="right")
    for pair in range(args.pairs):
        for system in systems:
            f, r = figures[system][pair], runs[system][pair]
            table.add_row(f"{system} #{pair + 1}", *(fmt.format(f[name]) for name, _, fmt in columns),
                          f"{r['load_before']:.2f} / {r['load_after']:.2f}")  # fmt: skip
    for system in systems:
        means = (fmt.format(statistics.fmean(f[name] for f in figures[system])) for name, _, fmt in columns)
        table.add_row(f"[bold]{system} mean", *means, "")
    console.print(table)
    print_rewards(runs, systems, console)
    if systems != list(SYSTEMS):
        return
    background = [f["background_cores"] for fs in figures.values() for f in fs]
    if max(background) - min(background) > args.max_load_spread:
        console.print(f"[red]no ratios: outside load differed between runs by {max(background) - min(background):.2f} cores "
                      f"(> {args.max_load_spread}); rerun on a quiet machine[/]")  # fmt: skip
        return
    dash, trl = ({name: statistics.fmean(f[name] for f in figures[s]) for name, _, _ in columns} for s in SYSTEMS)
    console.print(
        f"DASH / TRL: samples/s {dash['samples_per_s'] / trl['samples_per_s']:.2f}x, "
        f"median s/step {trl['median_s'] / dash['median_s']:.2f}x faster, generate {trl['generate_s'] / dash['generate_s']:.2f}x, "
        f"learn {trl['learn_s'] / dash['learn_s']:.2f}x, CPU per step {trl['cpu_s'] / dash['cpu_s']:.2f}x less; "
        f"held-out greedy {dash['greedy']:.3f} vs {trl['greedy']:.3f}, sampled {dash['sampled']:.3f} vs {trl['sampled']:.3f}"
    )


def print_rewards(runs: dict[str, list[dict[str, Any]]], systems: list[str], console) -> None:
    """Mean training reward at the same steps (over runs), and over the steps every run reached."""
    from rich.table import Table

    common = min(len(r["steps"]) for records in runs.values() for r in records)
    marks = sorted({1, 10, 20, 40, 80, 160, common} & set(range(1, common + 1)))
    table = Table(
        title=f"training reward per step (mean over runs); 'mean' is over steps 1-{common}, which every run reached"
    )
    table.add_column("system")
    for step in marks:
        table.add_column(f"step {step}", justify="right")
    table.add_column("mean", justify="right")
    for system in systems:
        curves = [[s["reward"] for s in r["steps"]] for r in runs[system]]
        at = [statistics.fmean(c[step - 1] for c in curves) for step in marks]
        overall = statistics.fmean(statistics.fmean(c[:common]) for c in curves)
        table.add_row(system, *(f"{v:.3f}" for v in at), f"{overall:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
