"""Sampling throughput of each backend (transformers, in-process vLLM, one remote vLLM server) on the same policy:
tokens/s against the number of sequences per call, and one large call against many small ones.

    python bench/sampling_throughput.py [--hidden 128 --layers 2 --dtype float32 --new-tokens 32 --sizes 8,32,128,512]

Every call samples a fixed prompt in groups of 8 (M prompts x n=8, as DASH does) to exactly --new-tokens tokens:
the sampler protocol has no ignore-EOS switch, so the policy (the tiny model from random weights) is edited so
that end-of-sequence is never sampled, which every backend then honours alike. Times are medians of --repeats
calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dash_core.config import ModelConfig, RemoteConfig, SamplerConfig, TinyModelConfig  # noqa: E402
from dash_core.models import load_policy  # noqa: E402
from dash_core.samplers import Sampler, SamplingParams, build_sampler  # noqa: E402

GROUP = 8
PROMPT = "12+34="
SMALL_CALLS = "small calls"
BACKENDS = {"transformers": "transformers", "vllm": "vllm in-process", "remote": "remote (1 server)"}  # id -> column


@dataclass(frozen=True)
class Settings:
    """The policy's shape and what each backend is asked for: calls of `sizes` sequences, `new_tokens` each."""

    hidden: int = 128
    layers: int = 2
    dtype: str = "float32"
    new_tokens: int = 32
    sizes: tuple[int, ...] = (8, 32, 128, 512)
    repeats: int = 3


def bench_policy(hidden: int, layers: int, dtype: str):
    """The tiny model with end-of-sequence out of reach: other logits spread wide (std ~ 1 per unit of hidden
    norm), the EOS logit pinned at 0, so EOS is dozens of nats below the best token at every step."""
    shape = TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64, intermediate_size=4 * hidden)
    policy, tokenizer = load_policy(ModelConfig(dtype=dtype, tiny=shape))
    with torch.no_grad():
        policy.lm_head.weight.mul_(50)
        policy.lm_head.weight[tokenizer.eos_token_id] = 0
    return policy, tokenizer


def timed(call: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median seconds of `call` and the tokens it returned."""
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def measure(sampler: Sampler, prompt: list[int], settings: Settings) -> dict[str, tuple[float, int]]:
    """Per batch size: (median s, tokens) of one call; plus 'small calls': the largest batch in calls of 16."""
    params = SamplingParams(n=GROUP, max_new_tokens=settings.new_tokens)

    def sample(sequences: int, per_call: int) -> int:
        generations = [
            g for _ in range(sequences // per_call) for g in sampler.generate([prompt] * (per_call // GROUP), params)
        ]
        lengths = {len(g.token_ids) for g in generations}
        assert lengths == {settings.new_tokens}, f"completions of unequal lengths {lengths}: EOS was sampled"
        return sum(map(len, (g.token_ids for g in generations)))

    sample(GROUP, GROUP)  # warm-up: kernels, caches, the server's first request
    rows = {str(size): timed(lambda size=size: sample(size, size), settings.repeats) for size in settings.sizes}
    rows[SMALL_CALLS] = timed(lambda: sample(max(settings.sizes), 16), settings.repeats)
    return rows


def throughput(backends: list[str], settings: Settings, workdir: Path) -> dict[str, dict[str, tuple[float, int]]]:
    """`measure` on each backend (keys of BACKENDS), one after the other on the same policy."""
    policy, tokenizer = bench_policy(settings.hidden, settings.layers, settings.dtype)
    prompt = tokenizer.encode(PROMPT)
    results: dict[str, dict[str, tuple[float, int]]] = {}
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if backend == "remote":
            from dash_core.serving import free_port, launch_servers

            model_dir = f"{workdir}/served"
            policy.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            (server,) = launch_servers(model_dir, 1, free_port(8500), dtype=settings.dtype, log_dir=str(workdir))
            with server:
                config = SamplerConfig(backend="remote", remote=RemoteConfig(urls=[server.url]))
                sampler = build_sampler(config, policy, tokenizer, seed=0, sync_dir=f"{workdir}/sync")
                results[backend] = measure(sampler, prompt, settings)
        else:
            sampler = build_sampler(SamplerConfig(backend=backend), policy, tokenizer, seed=0, sync_dir=str(workdir))
            results[backend] = measure(sampler, prompt, settings)
    return results


def tokens_per_s(rows: dict[str, tuple[float, int]], size: int) -> float:
    seconds, tokens = rows[str(size)]
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=Settings.hidden)
    parser.add_argument("--layers", type=int, default=Settings.layers)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=Settings.dtype)
    parser.add_argument("--new-tokens", type=int, default=Settings.new_tokens)
    parser.add_argument(
        "--sizes",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=Settings.sizes,
        help="sequences per call (multiples of 16)",
    )
    parser.add_argument("--repeats", type=int, default=Settings.repeats)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # before vLLM, which pins torch's threads in this process
    settings = Settings(**{field.name: getattr(args, field.name) for field in fields(Settings)})
    backends = args.backends.split(",")
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backend {unknown.pop()!r} (choose from {', '.join(BACKENDS)})")
    with tempfile.TemporaryDirectory() as tmp:
        results = throughput(backends, settings, Path(tmp))

    console = Console(width=160)
    table = Table(
        title=f"tokens/s by sequences per call: tiny Llama hidden {args.hidden}, {args.layers} layers, "
        f"{args.dtype}, {args.new_tokens} new tokens, groups of {GROUP}, {args.threads} threads"
    )
    table.add_column("sequences per call", justify="right")
    for backend in results:
        table.add_column(BACKENDS[backend], justify="right")
    for size in args.sizes:
        table.add_row(str(size), *(f"{tokens_per_s(rows, size):,.0f}" for rows in results.values()))
    console.print(table)

    largest = str(max(args.sizes))
    table = Table(title=f"{largest} sequences: one call vs {int(largest) // 16} calls of 16 (median s)")
    for column in ["backend", "1 call s", "small calls s", "speed-up"]:
        table.add_column(column, justify="left" if column == "backend" else "right")
    for backend, rows in results.items():
        one, many = rows[largest][0], rows[SMALL_CALLS][0]
        table.add_row(BACKENDS[backend], f"{one:.3f}", f"{many:.3f}", f"{many / one:.1f}x")
    console.print(table)


if __name__ == "__main__":
    main()
