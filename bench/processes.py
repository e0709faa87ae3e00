"""Processes and rollouts ahead on one machine: `dashrl train` as users run it (the `dash-train` flow, MLflow, the
rollout store, checkpoints, evaluations), in several layouts side by side, runs alternated.

    dashrl bench processes [--modes solo1,solo,spmd,ahead1,ahead2 --iterations 50 --eval-every 25 --seeds 0 --rounds 2]
                           [--before DIR]   # also `leader`: --learners 2 of the code in DIR (an earlier checkout)

Modes (P processes x T torch threads each):
  solo1   1 x 1, on-policy                  solo    1 x 2, on-policy (the default layout on two cores)
  spmd    2 x 1 (`--learners 2`): each process samples, grades, learns and evaluates its share
  leader  2 x 1 of the code in --before, where only the first process sampled and evaluated
  ahead1  1 x 1 with `sampler.max_staleness: 1`: a thread samples the next batch while this one learns (one core
          each); ahead2: k = 2; auto: `max_staleness: auto`
Every run starts from the embedded default's warmed-up policy (made once) and trains `--iterations` iterations of
64 prompts x 8 completions, evaluating 500 held-out problems every `--eval-every`. Printed per mode (medians over
iterations, means over runs): each phase's seconds per iteration (`time/*`; with rollouts ahead, sample and reward
overlap the learner and `wait` is the learner waiting for a batch), the iteration, samples/s, an evaluation's
seconds (MLflow's timestamps: from the iteration before it to its scores), and each process's busy fraction of its
cores over the iterations (CPU seconds / wall seconds / threads, psutil). With several seeds, the held-out sampled
accuracy at the end: mean and range. `--json FILE` keeps every figure (`bench/scale_model.py` reads it).

Left out: the start-up (Prefect, MLflow, model load) and the warm-up, which every mode pays alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench._shared import QUIET_ENV, embedded_config, warm_policy
from dash_core.config import merge, parse_override

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("sample", "reward", "wait", "learn", "sync", "checkpoint", "iteration")
HELDOUT = "eval/arithmetic"


@dataclass(frozen=True)
class Mode:
    processes: int
    threads: int
    staleness: int | str = 0  # sampler.max_staleness
    before: bool = False  # the code in --before


MODES = {
    "solo1": Mode(1, 1),
    "solo": Mode(1, 2),
    "spmd": Mode(2, 1),
    "leader": Mode(2, 1, before=True),
    "ahead1": Mode(1, 1, staleness=1),
    "ahead2": Mode(1, 1, staleness=2),
    "auto": Mode(1, 1, staleness="auto"),
}


def train(mode: Mode, name: str, seed: int, args: argparse.Namespace, workdir: Path, model: str) -> dict[str, Any]:
    """One `dashrl train` run of `mode`; its figures, read back from MLflow and psutil."""
    folder = workdir / name
    folder.mkdir()
    overrides = {"seed": seed, "iterations": args.iterations, "model": {"name": model}, "warmup": {"steps": 0},
                 "eval": {"every": args.eval_every, "log_samples": 0}, "tracking": {"experiment": name}}  # fmt: skip
    if mode.processes == 1:
        overrides["threads"] = mode.threads  # several processes share the cores out themselves
    if mode.staleness:
        overrides["sampler"] = {"max_staleness": mode.staleness}
    for text in args.overrides:
        keys, value = parse_override(text)
        for key in reversed(keys):
            value = {key: value}
        overrides = merge(overrides, value)
    config = embedded_config(workdir, **overrides)
    # only the fields set here: an earlier checkout refuses fields it does not know
    fields = overrides | {"store": {"url": config.store.url}, "tracking": {"uri": config.tracking.uri, "experiment": name}}
    (folder / "run.yaml").write_text(yaml.safe_dump(fields))
    tree = Path(args.before) if mode.before else ROOT
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | QUIET_ENV
    env |= {"PREFECT_HOME": str(folder / "prefect"), "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "flows.cli", "train", "--config", str(folder / "run.yaml"), "--learners", str(mode.processes)]
    with open(folder / "log.txt", "w") as log:
        trainer = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        cpu = watch(trainer)
    if trainer.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {trainer.returncode}): see {folder / 'log.txt'}")
    return figures(config.tracking.uri, name, cpu, mode)


def watch(trainer: subprocess.Popen) -> dict[int, list[tuple[float, float]]]:
    """CPU seconds of each process of the run (by rank) over time, until it ends."""
    samples: dict[int, list[tuple[float, float]]] = {}
    root = psutil.Process(trainer.pid)
    while trainer.poll() is None:
        try:
            ranks = {0: root} | {int(p.environ().get("RANK", -1)): p for p in root.children() if "flows.cli" in " ".join(p.cmdline())}
            now = time.time()
            for rank, process in ranks.items():
                if rank >= 0:
                    times = process.cpu_times()
                    samples.setdefault(rank, []).append((now, times.user + times.system))
        except psutil.Error:
            pass
        time.sleep(0.25)
    return samples


def cpu_between(series: list[tuple[float, float]], start: float, end: float) -> float:
    """CPU seconds a process spent between two times (its samples interpolated)."""

    def at(t: float) -> float:
        before = [s for s in series if s[0] <= t] or series[:1]
        after = [s for s in series if s[0] >= t] or series[-1:]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)

    return at(end) - at(start)


def figures(uri: str, experiment: str, cpu: dict[int, list[tuple[float, float]]], mode: Mode) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)

    out: dict[str, Any] = {}
    for phase in PHASES:
        values = [m.value for m in history(f"time/{phase}_s")][1:]  # the first also pays one-off warm-ups
        if values:
            out[f"{phase}_s"] = statistics.median(values)
    iterations = {m.step: m.timestamp / 1000 for m in history("reward/mean")}
    evals = {m.step: m.timestamp / 1000 for m in history(f"{HELDOUT}/accuracy")}
    out["eval_s"] = statistics.fmean(evals[s] - iterations[s] for s in evals if s in iterations)
    train_s = sum(m.value for m in history("time/iteration_s"))
    out["samples_per_s"] = history("samples/total")[-1].value / train_s
    start, end = iterations[min(iterations)], iterations[max(iterations)]
    out["busy"] = [cpu_between(cpu[rank], start, end) / (end - start) / mode.threads for rank in sorted(cpu)]
    out["curve"] = [(m.step, m.value) for m in history(f"{HELDOUT}/sampled_accuracy")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="solo1,solo,spmd,ahead1,ahead2", help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seeds", default="0", help="comma-separated; each seed runs every mode once per round")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the modes, alternating their order")
    parser.add_argument("--before", help="a checkout of an earlier commit, for the `leader` mode")
    parser.add_argument("--workdir", help="folder for the runs (default: a temp folder)")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. checkpoint.every=10 (repeatable)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if "leader" in modes and not args.before:
        parser.error("mode leader runs the code of an earlier checkout: give --before DIR")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dash-processes-"))
    model = warm_policy(workdir, threads=1)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for seed in map(int, args.seeds.split(",")):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                runs[mode].append(train(MODES[mode], f"{mode}-seed{seed}-round{round_}", seed, args, workdir, model))
                print(f"{mode} seed {seed} round {round_}: {runs[mode][-1]['iteration_s']:.3f} s/iteration", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    report(runs, args)


def report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embedded default, {args.iterations} iterations of 64 x 8, seeds {args.seeds}, {args.rounds} round(s), "
                        "median s per iteration (mean over runs)")  # fmt: skip
    columns = ["mode", *(f"{p} s" for p in PHASES), "samples/s", "eval s", "busy per process", "held-out end (range)"]
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, results in runs.items():
        cells = [mode]
        for key in [f"{p}_s" for p in PHASES] + ["samples_per_s", "eval_s"]:
            values = [r[key] for r in results if key in r]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "-")
        busy = [statistics.fmean(r["busy"][i] for r in results) for i in range(len(results[0]["busy"]))]
        cells.append(" / ".join(f"{b:.2f}" for b in busy))
        ends = [r["curve"][-1][1] for r in results]
        cells.append(f"{statistics.fmean(ends):.3f} ({min(ends):.3f}-{max(ends):.3f})")
        table.add_row(*cells)
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
