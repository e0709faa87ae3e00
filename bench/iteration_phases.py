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

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dash_core.config import DashConfig  # noqa: E402
from dash_core.run import TrainingRun  # noqa: E402


def measure(config: DashConfig, iterations: int) -> dict[str, float]:
    run = TrainingRun.start(config)
    run.sample(0)  # warm the kernels and caches once
    times: dict[str, list[float]] = {"sample": [], "reward": [], "learn": []}
    for iteration in range(1, iterations + 1):
        metrics = run.step(iteration)
        for phase, values in times.items():
            values.append(metrics[f"time/{phase}_s"])
    run.save()  # the last checkpoint is written in the background: done before the folder goes
    run.tracker.finish()
    return {phase: statistics.median(values) for phase, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="M")
    parser.add_argument("--group", type=int, default=8, help="G")
    parser.add_argument("--micro-batch", type=int, default=16, help="learner chunk = small-batch sampling call")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, batch_size in [("preemptive (1 call)", None), ("small-batch (1 call per chunk)", args.micro_batch)]:
            config = DashConfig.model_validate(
                {
                    "threads": args.threads,
                    "model": {"tiny": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.hidden // 64,
                                       "intermediate_size": 4 * args.hidden}},
                    "sampler": {"prompts_per_iteration": args.prompts, "group_size": args.group, "batch_size": batch_size,
                                "max_new_tokens": args.max_new_tokens},
                    "algo": {"tau": 0.0},
                    "learner": {"micro_batch_size": args.micro_batch},
                    "store": {"url": f"{tmp}/store"},
                    "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "bench"},
                }
            )
            rows[mode] = measure(config, args.iterations)

    samples = args.prompts * args.group
    table = Table(title=f"one iteration, M={args.prompts} x G={args.group} = {samples} samples, "
                        f"{args.max_new_tokens} new tokens, micro-batch {args.micro_batch}, {args.threads} threads (median s)")
    for column in ["setup", "sample s", "reward+store s", "learn s", "iteration s", "samples/s"]:
        table.add_column(column, justify="right" if column != "setup" else "left")
    for mode, t in rows.items():
        total = sum(t.values())
        table.add_row(mode, f"{t['sample']:.3f}", f"{t['reward']:.3f}", f"{t['learn']:.3f}", f"{total:.3f}", f"{samples / total:.0f}")
    console = Console(width=140)
    console.print(table)
    pre, small = rows.values()
    console.print(f"sampling speed-up {small['sample'] / pre['sample']:.2f}x, "
                  f"iteration speed-up {sum(small.values()) / sum(pre.values()):.2f}x (small-batch / preemptive)")


if __name__ == "__main__":
    main()
