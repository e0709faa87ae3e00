"""The embedded default's learning curve: held-out accuracy against training time, and the time it takes to gain
a given number of points.

    dashrl bench learning_curve [--iterations 200 --eval-every 10 --gain 0.30] [--set learner.lora.rank=16 ...]

`dashrl train` with no flags (the tiny model on the synthetic arithmetic task, its supervised warm-up included),
run as the `dash-train` flow with an evaluation every --eval-every iterations. Time is training time
(`time/train_s`: the iterations' wall-clock, without the warm-up and the evaluations), so the figure says how fast
the policy learns, whatever the evaluations cost. The gain is in held-out sampled accuracy (temperature 1): after
the warm-up, greedy accuracy starts high and leaves little to gain.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._shared import embedded_config

HELDOUT = "eval/arithmetic"  # the embedded default's held-out set


@dataclass(frozen=True)
class Curve:
    """How long to train, how often to evaluate, and the gain in held-out sampled accuracy to time."""

    iterations: int = 200
    eval_every: int = 10
    gain: float = 0.30
    overrides: tuple[str, ...] = ()  # config changes from the embedded default, `--set` style


@dataclass(frozen=True)
class Point:
    """One evaluation: after `iteration` iterations, which took `train_s` seconds of training."""

    iteration: int
    train_s: float
    sampled_accuracy: float
    greedy_accuracy: float


def train(curve: Curve, workdir: Path, tracking: dict[str, Any] | None = None) -> tuple[str, str]:
    """Run the embedded default as the `dash-train` flow (a subflow inside another flow); its MLflow URI and run id.
    `tracking`: fields of its tracking config, e.g. the experiment and parent run to log under."""
    from flows.train import dash_train

    config = embedded_config(
        workdir,
        curve.overrides,
        iterations=curve.iterations,
        eval={"every": curve.eval_every, "log_samples": 0},
        tracking=tracking or {},
    )
    return config.tracking.uri, dash_train(config=config)["run_id"]


def points(uri: str, run_id: str) -> list[Point]:
    """The run's evaluations, first to last, read back from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    history = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
               for key in (f"{HELDOUT}/sampled_accuracy", f"{HELDOUT}/accuracy", "time/train_s")}  # fmt: skip
    train_s = history["time/train_s"] | {0: 0.0}  # the first evaluation comes before any training
    return [
        Point(step, train_s[step], sampled, history[f"{HELDOUT}/accuracy"][step])
        for step, sampled in sorted(history[f"{HELDOUT}/sampled_accuracy"].items())
    ]


def reached(curve: list[Point], gain: float) -> Point | None:
    """The first evaluation at least `gain` above the first one; None when the run never got there."""
    return next((p for p in curve if p.sampled_accuracy >= curve[0].sampled_accuracy + gain), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=Curve.iterations)
    parser.add_argument("--eval-every", type=int, default=Curve.eval_every)
    parser.add_argument(
        "--gain", type=float, default=Curve.gain, help="in held-out sampled accuracy (0.30 = +30 points)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config change from the embedded default"
    )
    args = parser.parse_args()
    curve = Curve(args.iterations, args.eval_every, args.gain, tuple(args.set))

    from rich.console import Console
    from rich.table import Table

    from flows.prefect_api import prefect_api

    with tempfile.TemporaryDirectory() as tmp, prefect_api():
        evaluations = points(*train(curve, Path(tmp)))
    table = Table(
        title=f"embedded default: held-out accuracy by training time, eval every {curve.eval_every} iterations"
    )
    for column in ["iteration", "training s", "sampled accuracy", "greedy accuracy"]:
        table.add_column(column, justify="right")
    for p in evaluations:
        table.add_row(str(p.iteration), f"{p.train_s:.1f}", f"{p.sampled_accuracy:.3f}", f"{p.greedy_accuracy:.3f}")
    console = Console(width=140)
    console.print(table)
    hit = reached(evaluations, curve.gain)
    console.print(
        f"+{curve.gain * 100:.0f} points of held-out sampled accuracy after {hit.train_s:.1f} s of training "
        f"(iteration {hit.iteration})"
        if hit
        else f"never +{curve.gain * 100:.0f} points of held-out sampled accuracy in {curve.iterations} iterations"
    )


if __name__ == "__main__":
    main()
