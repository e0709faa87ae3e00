"""One DASH iteration split into phases: preemptive sampling (all M x G completions in one call) vs the common
small-batch setup (one sampling call per learner micro-batch), same model, same samples, same learner.

    python bench/iteration_phases.py [--prompts 64 --group 8 --micro-batch 16 --max-new-tokens 16 --iterations 5]

The policy is the built-in tiny model from random weights with tau = 0, so every sample reaches the learner: both
setups sample and learn the same number of completions from the same policy, and differ only in how sampling is
batched. A completion ends at EOS or max_new_tokens; a small batch can stop as soon as its own completions end,
which favours the small-batch setup, so the speed-up measured is a lower bound.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dash_core import loop  # noqa: E402
from dash_core.config import DashConfig  # noqa: E402
from dash_core.run import TrainingRun  # noqa: E402

PHASES = ("sample", "reward", "learn")
MODES = ("preemptive", "small-batch")
LABELS = {"preemptive": "preemptive (1 call)", "small-batch": "small-batch (1 call per chunk)"}


@dataclass(frozen=True)
class Setup:
    """The iteration measured: M x G samples of up to `max_new_tokens`, learned in chunks of `micro_batch` (also
    the small-batch setup's sampling call), on a tiny model of `hidden` x `layers`."""

    prompts: int = 64
    group: int = 8
    micro_batch: int = 16
    max_new_tokens: int = 16
    iterations: int = 5
    hidden: int = 128
    layers: int = 2
    dtype: str = "float32"
    threads: int | None = None  # None: torch's default

    def config(self, mode: str, workdir: Path) -> DashConfig:
        shape = {
            "hidden_size": self.hidden,
            "num_layers": self.layers,
            "num_heads": self.hidden // 64,
            "intermediate_size": 4 * self.hidden,
        }
        return DashConfig.model_validate(
            {
                "threads": self.threads,
                "model": {"dtype": self.dtype, "tiny": shape},
                "sampler": {
                    "prompts_per_iteration": self.prompts,
                    "group_size": self.group,
                    "batch_size": self.micro_batch if mode == "small-batch" else None,
                    "max_new_tokens": self.max_new_tokens,
                },
                "algo": {"tau": 0.0},
                "learner": {"micro_batch_size": self.micro_batch},
                "store": {"url": str(workdir / "store")},
                "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": "bench"},
            }
        )


def compare(setup: Setup, workdir: Path) -> dict[str, dict[str, float]]:
    """Median seconds of each phase, per setup. The two runs take turns, an iteration each, so that a burst of
    outside load (a shared machine) hits both alike instead of one whole setup."""
    runs = {mode: TrainingRun.start(setup.config(mode, workdir)) for mode in MODES}
    times = {mode: {phase: [] for phase in PHASES} for mode in MODES}
    for run in runs.values():
        loop.sample(run, 0, 0)  # warm the kernels and caches once
    for iteration in range(1, setup.iterations + 1):
        for mode, run in runs.items():
            loop.iterations(run, iteration, Recorder(times[mode]))  # the loop `dash-train` runs, without Prefect
    for run in runs.values():
        run.save()  # the last checkpoint is written in the background: done before the folder goes
        run.finish()
    return {
        mode: {phase: statistics.median(values) for phase, values in phases.items()} for mode, phases in times.items()
    }


class Recorder(loop.Hooks):
    """Each iteration's phase times, into lists by phase."""

    def __init__(self, times: dict[str, list[float]]):
        self.times = times

    def iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        for phase, values in self.times.items():
            values.append(metrics[f"time/{phase}_s"])


def iteration_s(times: dict[str, float]) -> float:
    return sum(times[phase] for phase in PHASES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=Setup.prompts, help="M")
    parser.add_argument("--group", type=int, default=Setup.group, help="G")
    parser.add_argument(
        "--micro-batch", type=int, default=Setup.micro_batch, help="learner chunk = small-batch sampling call"
    )
    parser.add_argument("--max-new-tokens", type=int, default=Setup.max_new_tokens)
    parser.add_argument("--iterations", type=int, default=Setup.iterations)
    parser.add_argument("--hidden", type=int, default=Setup.hidden)
    parser.add_argument("--layers", type=int, default=Setup.layers)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=Setup.dtype)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    setup = Setup(**{field.name: getattr(args, field.name) for field in fields(Setup)})

    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(setup, Path(tmp))

    samples = setup.prompts * setup.group
    table = Table(
        title=f"one iteration, M={setup.prompts} x G={setup.group} = {samples} samples, "
        f"{setup.max_new_tokens} new tokens, micro-batch {setup.micro_batch}, {setup.threads} threads (median s)"
    )
    for column in ["setup", "sample s", "reward+store s", "learn s", "iteration s", "samples/s"]:
        table.add_column(column, justify="right" if column != "setup" else "left")
    for mode, t in rows.items():
        total = iteration_s(t)
        table.add_row(
            LABELS[mode],
            f"{t['sample']:.3f}",
            f"{t['reward']:.3f}",
            f"{t['learn']:.3f}",
            f"{total:.3f}",
            f"{samples / total:.0f}",
        )
    console = Console(width=140)
    console.print(table)
    pre, small = rows["preemptive"], rows["small-batch"]
    console.print(
        f"sampling speed-up {small['sample'] / pre['sample']:.2f}x, "
        f"iteration speed-up {iteration_s(small) / iteration_s(pre):.2f}x (small-batch / preemptive)"
    )


if __name__ == "__main__":
    main()
