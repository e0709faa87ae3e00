"""Does the transformers sampler use a second core? Seconds per batch at each torch thread count, beside
transformers' own `generate` on the same sequences (TRL's GRPOTrainer samples through it).

    python bench/sampler_threads.py [--rounds 30 --threads 1,2 --prompts 64 --group 8 --new-tokens 8]
                                    [--policy DIR | --warm] [--baseline FILE] [--profile]

The batch is one iteration of the embedded default: --prompts arithmetic prompts with their seeds, --group
completions each, at most --new-tokens at temperature 1. The policy is the tiny model at seed 0 (random weights:
nearly every completion runs the full length), a saved model directory (--policy), or the embedded default's
warm-started policy (--warm, made once in a temporary folder: completions end after the 4-token answer).
--baseline names another copy of dash_core/samplers/transformers_backend.py (say, `git show
HEAD:dash_core/samplers/transformers_backend.py > /tmp/before.py`), timed beside the current one; both must
sample the same tokens.

Every round calls each (variant, threads) once, in a shuffled order, so a shift in what else the machine runs
lands on all of them alike; the table gives median seconds per batch and each variant's speed-up from its first
thread count (the median of the per-round ratios). --profile adds torch.profiler's busiest operators per batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.config import ArithmeticTaskConfig, ModelConfig
from dash_core.data.arithmetic import ArithmeticTask
from dash_core.models import load_policy
from dash_core.prompts import encode_prompts
from dash_core.samplers import SamplingParams, TransformersSampler
from dash_core.samplers.base import prompt_seed

Batch = Callable[[], object]


def batch_prompts(tokenizer: PreTrainedTokenizerBase, prompts: int) -> tuple[list[list[int]], list[int]]:
    """The first iteration's prompts of the embedded default and their sampling seeds."""
    problems = ArithmeticTask(ArithmeticTaskConfig(), seed=0).train_problems(0, prompts)
    return encode_prompts(tokenizer, problems), [prompt_seed(0, "rl:0", i) for i in range(prompts)]


def sampler_class(path: str) -> type[TransformersSampler]:
    """TransformersSampler from another copy of the backend's source file."""
    spec = importlib.util.spec_from_file_location("baseline_transformers_backend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TransformersSampler


def transformers_generate(policy: PreTrainedModel, pad: int, prompts: list[list[int]], params: SamplingParams) -> Batch:
    """`generate` as TRL calls it: each prompt repeated per completion, left-padded, until every row has ended."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts for _ in range(params.n)])
    mask = (ids != pad).long()  # no prompt holds the pad token
    options = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=params.max_new_tokens,
                   pad_token_id=pad)  # fmt: skip

    def call() -> torch.Tensor:
        with torch.no_grad():
            return policy.generate(input_ids=ids, attention_mask=mask, **options)

    return call


def alternated(batches: dict[str, Batch], threads: list[int], rounds: int) -> dict[tuple[str, int], list[float]]:
    """Seconds of every (variant, threads), each round in a fresh shuffled order, after one warm-up call each."""
    keys = [(name, count) for name in batches for count in threads]
    for name, count in keys:
        torch.set_num_threads(count)
        batches[name]()
    times: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    for index in range(rounds):
        for name, count in random.Random(index).sample(keys, len(keys)):
            torch.set_num_threads(count)
            start = time.perf_counter()
            batches[name]()
            times[name, count].append(time.perf_counter() - start)
    return times


def busiest_operators(batch: Batch, threads: int, calls: int = 5, top: int = 12) -> list[tuple[str, float, int]]:
    """(operator, ms per batch, calls per batch) by self time: where a batch's time goes at `threads`."""
    torch.set_num_threads(threads)
    batch()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            batch()
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key, e.self_cpu_time_total / calls / 1e3, e.count // calls) for e in events]


def same_tokens(
    samplers: dict[str, TransformersSampler], prompts: list[list[int]], params: SamplingParams, seeds: list[int]
) -> float:
    """The largest log-probability gap between the samplers' completions, after checking their tokens agree."""
    first, *others = [sampler.generate(prompts, params, seeds) for sampler in samplers.values()]
    gap = 0.0
    for generations in others:
        if [g.token_ids for g in generations] != [g.token_ids for g in first]:
            raise AssertionError("the baseline samples other tokens than the current sampler from the same seeds")
        gap = max([gap, *(abs(a - b) for g, f in zip(generations, first) for a, b in zip(g.logprobs, f.logprobs))])
    return gap


def report(times: dict[tuple[str, int], list[float]], threads: list[int], title: str) -> None:
    """Median seconds per variant and thread count, and the speed-up from the first count, ratio by ratio."""
    table = Table(title=title)
    speedups = [f"{threads[0]}->{count} speed-up" for count in threads[1:]]
    columns = ["variant", *(f"{count} thr s" for count in threads), *speedups]
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name in dict.fromkeys(name for name, _ in times):
        first = times[name, threads[0]]
        medians = [f"{statistics.median(times[name, count]):.4f}" for count in threads]
        ratios = [statistics.median(a / b for a, b in zip(first, times[name, count])) for count in threads[1:]]
        table.add_row(name, *medians, *(f"{ratio:.2f}x" for ratio in ratios))
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--policy", help="a saved model directory (default: the tiny model from seed 0)")
    parser.add_argument("--warm", action="store_true", help="the embedded default's warm-started policy")
    parser.add_argument("--baseline", help="another copy of dash_core/samplers/transformers_backend.py to time beside")
    parser.add_argument("--profile", action="store_true", help="also print the busiest operators per batch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        if args.warm:
            from bench._shared import warm_policy

            args.policy = warm_policy(Path(workdir), args.threads[0])
        policy, tokenizer = load_policy(ModelConfig(), seed=0, path=args.policy)
    prompts, seeds = batch_prompts(tokenizer, args.prompts)
    params = SamplingParams(n=args.group, max_new_tokens=args.new_tokens)
    samplers = {"dash": TransformersSampler(policy, tokenizer)}
    if args.baseline:
        samplers["baseline"] = sampler_class(args.baseline)(policy, tokenizer)
        gap = same_tokens(samplers, prompts, params, seeds)
        print(f"baseline samples the same tokens; log-probabilities differ by at most {gap:.1e}")
    batches: dict[str, Batch] = {name: lambda s=s: s.generate(prompts, params, seeds) for name, s in samplers.items()}
    batches["transformers generate"] = transformers_generate(policy.eval(), tokenizer.pad_token_id, prompts, params)
    lengths = [len(g.token_ids) for g in samplers["dash"].generate(prompts, params, seeds)]

    report(alternated(batches, args.threads, args.rounds), args.threads,
           f"s per batch of {args.prompts} prompts x {args.group} completions, <= {args.new_tokens} new tokens "
           f"(DASH's mean {statistics.mean(lengths):.1f}), median of {args.rounds} alternated rounds")  # fmt: skip
    if args.profile:
        for name, count in ((name, count) for name in batches for count in args.threads):
            print(f"\n{name}, {count} threads: ms per batch by operator (self time)")
            for operator, ms, calls in busiest_operators(batches[name], count):
                print(f"  {operator:<52} {ms:8.2f} {calls:6d} calls")


if __name__ == "__main__":
    main()
