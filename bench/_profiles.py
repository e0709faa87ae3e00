"""The nightly benchmark's sizes: `quick` (a CI smoke test, under a minute on 2 CPU cores) and `full` (the nightly
figures, about 4 minutes on 2 CPU cores, well inside 15). On a GPU, `full` grows: larger models and batches.

Each benchmark takes its own settings type; a profile only picks their values. The figures of one profile are only
ever compared with the same profile's on the same machine, so changing a size here starts new references (update
bench/baseline.json with `dashrl bench nightly --profile <name> --update-baseline`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Any, Literal

from bench.iteration_phases import Setup
from bench.learning_curve import Curve
from bench.sampling_throughput import Settings

ProfileName = Literal["quick", "full"]


@dataclass(frozen=True)
class Profile:
    phases: Setup  # preemptive vs small-batch iteration
    sampling: Settings  # tokens/s of one large call, per backend
    backends: tuple[str, ...]
    learner: dict[str, Any]  # a bench/learner_throughput.py configuration
    curve: Curve  # the embedded default's learning curve
    math_rounds: int  # timed rounds of the grading benchmark
    code_rounds: int
    sync_repeats: int  # weight syncs of each kind per backend


def _learner(model: str, dtype: str, rows: int, prompt: int, completion: int, micro_batch: int, steps: int) -> dict:
    return {"model": model, "logprobs": "lean", "dtype": dtype, "checkpointing": False, "micro_batch": micro_batch,
            "rows": rows, "prompt": prompt, "completion": completion, "steps": steps}  # fmt: skip


QUICK = Profile(
    phases=Setup(prompts=32, iterations=3),
    sampling=Settings(sizes=(256,), repeats=3),
    backends=("transformers",),
    learner=_learner("tiny", "float32", rows=64, prompt=16, completion=16, micro_batch=16, steps=3),
    curve=Curve(iterations=40, eval_every=10, gain=0.10),
    math_rounds=5,
    code_rounds=1,
    sync_repeats=3,
)
FULL = Profile(
    phases=Setup(hidden=256, layers=4, max_new_tokens=32, iterations=8),
    sampling=Settings(sizes=(512,), repeats=5),
    backends=("transformers", "vllm"),
    learner=_learner("tiny", "float32", rows=128, prompt=32, completion=32, micro_batch=32, steps=5),
    curve=Curve(iterations=200, eval_every=10, gain=0.30),
    math_rounds=20,
    code_rounds=3,
    sync_repeats=5,
)
# Untested here (no GPU on the project's machines): shapes sized for one modern GPU.
FULL_GPU = replace(
    FULL,
    phases=Setup(prompts=256, micro_batch=32, max_new_tokens=64, hidden=1024, layers=8, dtype="bfloat16"),
    sampling=Settings(hidden=1024, layers=8, dtype="bfloat16", new_tokens=64, sizes=(1024,), repeats=5),
    learner=_learner("qwen0.5b", "bfloat16", rows=32, prompt=128, completion=256, micro_batch=8, steps=5),
)


def for_machine(name: ProfileName, gpu: bool, threads: int) -> Profile:
    """`name`'s sizes on this machine: `threads` torch threads, the GPU sizes of `full` on a GPU, and vLLM only
    where it is installed."""
    profile = {"quick": QUICK, "full": FULL_GPU if gpu else FULL}[name]
    backends = tuple(b for b in profile.backends if b != "vllm" or importlib.util.find_spec("vllm"))
    return replace(
        profile,
        phases=replace(profile.phases, threads=threads),
        backends=backends,
        learner=profile.learner | {"threads": threads},
    )
