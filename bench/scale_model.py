"""A throughput model of DASH's layouts: from per-token costs of sampling and learning (and the fixed costs of an
iteration), iterations/s and each device's idle fraction for N processes, H inference servers and staleness k.

    dashrl bench scale_model --measured processes.json     # calibrate here, check against `bench/processes.py`
    dashrl bench scale_model                                # only the GPU table (anchors of one H100)

Assumptions (each one a way the model can be wrong):
- A decode step costs `step_s + row_s * rows` (a fixed cost per step, the Python and kernel launches, then a cost
  per sequence), so splitting a batch over N processes divides only the second part; the number of decode steps
  is the longest completion's, whatever the split. A learner step costs `learn_fixed_s + token_s * tokens`.
- Grading and writing cost the same per sample everywhere; sync, checkpoint and the loop's own bookkeeping (MLflow,
  the progress line, the collectives) cost what one process measured, once per iteration, whatever N.
- Each process (or server) has its own device and nothing else slows it: no shared memory bandwidth, no contention
  for the interpreter's lock between a learner and a sampling thread of one process.
- Rollouts ahead (k >= 1) overlap sampling with learning completely: an iteration takes the longer of the two sides
  (sample + grade on the sampler's devices; learn + sync + checkpoint + bookkeeping on the learner's), which holds
  for any k >= 1 once the pipeline is full; k only bounds how far the faster side may run ahead.
- Leader-only (the layout before SPMD) samples, grades and evaluates on the first process while the others wait.
On a GPU, per-token costs come from the anchors in shared/notes/gpu-anchors.md (one H100, Qwen2.5-0.5B's shape);
the 1.5B shape scales them by the parameter count (3.1x), i.e. it assumes both sides are bound by weight reads and
matmuls in proportion, which is rough at small sampling batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

ROWS, PROMPTS, GROUP, NEW_TOKENS = 512, 64, 8, 8  # the embedded default's batch


@dataclass(frozen=True)
class Costs:
    """Seconds of one device, for one iteration's parts."""

    step_s: float  # a decode step's fixed cost
    row_s: float  # a decode step's cost per sequence
    steps: int  # decode steps per batch
    grade_s: float  # grading + advantages + writing, per sample
    learn_fixed_s: float  # a learner step's fixed cost
    token_s: float  # learner seconds per token (forward + backward + optimizer, averaged)
    tokens: int  # tokens the learner computes per iteration
    fixed_s: float  # sync + checkpoint + bookkeeping per iteration, once
    eval_s: float = 0.0  # an evaluation on one device (it splits as sampling does)

    def sample_s(self, rows: float) -> float:
        return self.steps * (self.step_s + self.row_s * rows)

    def learn_s(self, share: float) -> float:
        return self.learn_fixed_s + self.token_s * self.tokens * share


@dataclass(frozen=True)
class Layout:
    name: str
    processes: int  # learner processes (devices), each also sampling unless `servers`
    staleness: int = 0
    servers: int = 0  # devices that only sample (disaggregated); 0: every process samples its share
    leader_only: bool = False


@dataclass(frozen=True)
class Prediction:
    iteration_s: float
    eval_s: float
    idle: dict[str, float]  # fraction of the iteration each kind of device waits: first process, other learners, samplers

    @property
    def samples_per_s(self) -> float:
        return ROWS / self.iteration_s


def predict(c: Costs, layout: Layout, rows: int = ROWS) -> Prediction:
    """One iteration of `rows` samples in `layout`."""
    n = layout.processes
    samplers = layout.servers or (1 if layout.leader_only else n)  # devices that sample, each its share
    sample = c.sample_s(rows / samplers) + c.grade_s * rows / samplers
    learn = c.learn_s(1 / n)
    sampled_all = c.sample_s(rows)
    evaluation = c.eval_s * c.sample_s(rows / (1 if layout.leader_only else n)) / sampled_all
    if layout.staleness:  # the sampling side and the learning side overlap
        iteration = max(sample, learn + c.fixed_s)
        busy = {"first": learn + c.fixed_s, "others": learn, "samplers": sample}
    else:
        iteration = sample + learn + c.fixed_s
        own = 0.0 if layout.servers else sample  # a process that samples its own share
        busy = {"first": own + learn + c.fixed_s, "others": (0.0 if layout.leader_only else own) + learn, "samplers": sample}
    if n == 1:
        del busy["others"]
    if not (layout.servers or layout.staleness):
        del busy["samplers"]
    return Prediction(iteration, evaluation, {k: max(0.0, 1 - b / iteration) for k, b in busy.items()})


# -- calibration on this machine ---------------------------------------------------------------------------------
def fixed_shares(policy_dir: str) -> tuple[float, float]:
    """The share of the sampler's and of the learner's time per batch that does not shrink with the batch: each
    timed at one thread on the embedded default's batch and on half of it (the policy of `policy_dir`)."""
    import torch

    from dash_core.config import AlgoConfig, ArithmeticTaskConfig, LearnerConfig, ModelConfig
    from dash_core.data import build_task
    from dash_core.learner import Learner
    from dash_core.models import load_policy
    from dash_core.prompts import encode_prompts
    from dash_core.samplers import SamplingParams, TransformersSampler, prompt_seed

    torch.set_num_threads(1)
    policy, tokenizer = load_policy(ModelConfig(name=policy_dir), seed=0)
    prompts = encode_prompts(tokenizer, build_task(ArithmeticTaskConfig(), 0).train_problems(1, PROMPTS))
    seeds = [prompt_seed(0, "rl:1", i) for i in range(PROMPTS)]
    sampler, params = TransformersSampler(policy, tokenizer), SamplingParams(n=GROUP, max_new_tokens=NEW_TOKENS)
    generations = sampler.generate(prompts, params, seeds)
    batch = {"prompt_ids": [p for p in prompts for _ in range(GROUP)], "completion_ids": [g.token_ids for g in generations],
             "advantage": [(-1.0) ** i for i in range(ROWS)], "sampler_logprobs": [g.logprobs for g in generations]}  # fmt: skip
    learner = Learner(policy, LearnerConfig(lr=1e-9), AlgoConfig(), tokenizer.pad_token_id)

    def share(run) -> float:
        full, half = (statistics.median(timed(lambda f=f: run(f)) for _ in range(7)) for f in (1.0, 0.5))
        return max(0.0, 2 * half / full - 1)  # full = a + b, half = a + b / 2

    sample_share = share(lambda f: sampler.generate(prompts[: int(PROMPTS * f)], params, seeds[: int(PROMPTS * f)]))
    learn_share = share(lambda f: learner.step(learner.micro_batches({k: v[: int(ROWS * f)] for k, v in batch.items()})))
    return sample_share, learn_share


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def calibrated(solo: dict, shares: tuple[float, float]) -> Costs:
    """The costs of one device from a measured 1-process, 1-thread run (`solo`: medians of its phases, from
    bench/processes.py) and the fixed shares of sampling and learning."""
    sample_share, learn_share = shares
    sample_s = solo["sample_s"] / NEW_TOKENS
    return Costs(step_s=sample_s * sample_share, row_s=sample_s * (1 - sample_share) / ROWS, steps=NEW_TOKENS,
                 grade_s=solo["reward_s"] / ROWS, learn_fixed_s=solo["learn_s"] * learn_share,
                 token_s=solo["learn_s"] * (1 - learn_share), tokens=1,
                 fixed_s=max(solo["iteration_s"] - solo["sample_s"] - solo["reward_s"] - solo["learn_s"], 0.0),
                 eval_s=solo["eval_s"])  # fmt: skip


MEASURED_LAYOUTS = {
    "solo1": Layout("1 process x 1 thread", 1),
    "spmd": Layout("SPMD, 2 processes x 1 thread", 2),
    "leader": Layout("leader-only, 2 processes x 1 thread", 2, leader_only=True),
    "ahead1": Layout("rollouts ahead k=1 (a sampling thread)", 1, staleness=1, servers=1),
    "ahead2": Layout("rollouts ahead k=2 (a sampling thread)", 1, staleness=2, servers=1),
}


def validate(costs: Costs, measured: dict[str, list[dict]]) -> list[list[str]]:
    rows = []
    for mode, layout in MEASURED_LAYOUTS.items():
        if mode not in measured:
            continue
        runs = measured[mode]
        iteration = statistics.fmean(r["iteration_s"] for r in runs)
        evaluation = statistics.fmean(r["eval_s"] for r in runs)
        busy = [statistics.fmean(r["busy"][i] for r in runs) for i in range(len(runs[0]["busy"]))]
        p = predict(costs, layout)
        rows.append([layout.name, f"{p.iteration_s:.3f}", f"{iteration:.3f}", f"{p.iteration_s / iteration - 1:+.0%}",
                     f"{p.eval_s:.2f}", f"{evaluation:.2f}", f"{p.eval_s / evaluation - 1:+.0%}",
                     " / ".join(f"{k} {v:.2f}" for k, v in p.idle.items()), " / ".join(f"{b:.2f}" for b in busy)])  # fmt: skip
    return rows


# -- GPUs --------------------------------------------------------------------------------------------------------
def gpu_costs(scale: float, sampler: str) -> Costs:
    """One H100 (anchors), Qwen2.5-0.5B's shape times `scale` in parameters; an iteration of 1024 samples of 128 +
    256 tokens, 60% kept by the gradient filter. `sampler`: 'engine' (a CUDA-graph decode loop, 133k tok/s at 1024
    sequences, 85k at 256: vLLM-class) or 'transformers' (static cache + compile, 29k at 1024, 21k at 256)."""
    at_256, at_1024 = {"engine": (85_122, 133_358), "transformers": (21_324, 29_089)}[sampler]
    step_1024, step_256 = 1024 / at_1024, 256 / at_256  # seconds per decode step at each batch
    row_s = (step_1024 - step_256) / 768 * scale
    step_s = step_1024 * scale - row_s * 1024
    tokens = int(1024 * 0.6 * 384)
    return Costs(step_s=step_s, row_s=row_s, steps=256, grade_s=2e-4, learn_fixed_s=0.05 * scale, token_s=scale / 83_000,
                 tokens=tokens, fixed_s=0.2 * scale)  # fmt: skip


GPU_LAYOUTS = [
    Layout("leader-only sampling, 8 learners", 8, leader_only=True),
    Layout("SPMD, 8 processes sample and learn", 8),
    Layout("4 servers + 4 learners, on-policy", 4, servers=4),
    Layout("4 servers + 4 learners, k=1", 4, staleness=1, servers=4),
    Layout("2 servers + 6 learners, k=1", 6, staleness=1, servers=2),
    Layout("6 servers + 2 learners, k=1", 2, staleness=1, servers=6),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", help="JSON of bench/processes.py (--json): calibrate here and check against it")
    parser.add_argument("--policy", help="with --measured: the policy those runs trained (their workdir's warm-policy)")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    if args.measured:
        measured = json.loads(Path(args.measured).read_text())
        solo = {k: statistics.fmean(r[k] for r in measured["solo1"]) for k in measured["solo1"][0] if k.endswith("_s")}
        costs = calibrated(solo, fixed_shares(args.policy))
        console.print(f"calibrated costs (1 thread): {costs}")
        table = Table(title="model vs measured on this machine (s per iteration, s per evaluation, idle fraction per process)")
        for column in ["layout", "predicted s/it", "measured s/it", "error", "predicted eval s", "measured eval s", "error",
                       "predicted idle", "measured CPU busy per process (cores)"]:
            table.add_column(column, justify="left" if column == "layout" else "right")
        for row in validate(costs, measured):
            table.add_row(*row)
        console.print(table)
    for shape, scale in (("Qwen2.5-0.5B", 1.0), ("Qwen2.5-1.5B", 3.1)):
        for sampler in ("engine", "transformers"):
            costs = gpu_costs(scale, sampler)
            table = Table(title=f"8 x H100 predicted, {shape} shape, {sampler} sampler: 1024 samples of 128 + 256 tokens per iteration")
            for column in ["layout", "s/iteration", "samples/s", "idle fraction"]:
                table.add_column(column, justify="left" if column == "layout" else "right")
            for layout in GPU_LAYOUTS:
                p = predict(costs, layout, rows=1024)
                table.add_row(layout.name, f"{p.iteration_s:.2f}", f"{1024 / p.iteration_s:,.0f}", " / ".join(f"{k} {v:.2f}" for k, v in p.idle.items()))
            console.print(table)


if __name__ == "__main__":
    main()
