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

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dash_core.config import ModelConfig, RemoteConfig, SamplerConfig, TinyModelConfig  # noqa: E402
from dash_core.models import load_policy  # noqa: E402
from dash_core.samplers import Sampler, SamplingParams, TransformersSampler  # noqa: E402

GROUP = 8
PROMPT = "12+34="


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


def measure(sampler: Sampler, prompt: list[int], args: argparse.Namespace) -> dict[str, tuple[float, int]]:
    """Per batch size: (median s, tokens) of one call; plus 'small calls': the largest batch in calls of 16."""
    params = SamplingParams(n=GROUP, max_new_tokens=args.new_tokens)

    def sample(sequences: int, per_call: int) -> int:
        generations = [g for _ in range(sequences // per_call) for g in sampler.generate([prompt] * (per_call // GROUP), params)]
        lengths = {len(g.token_ids) for g in generations}
        assert lengths == {args.new_tokens}, f"completions of unequal lengths {lengths}: EOS was sampled"
        return sum(map(len, (g.token_ids for g in generations)))

    sample(GROUP, GROUP)  # warm-up: kernels, caches, the server's first request
    rows = {str(size): timed(lambda size=size: sample(size, size), args.repeats) for size in args.sizes}
    rows["small calls"] = timed(lambda: sample(max(args.sizes), 16), args.repeats)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128, 512],
                        help="sequences per call (multiples of 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="transformers,vllm,remote")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # before vLLM, which pins torch's threads in this process

    policy, tokenizer = bench_policy(args.hidden, args.layers, args.dtype)
    prompt = tokenizer.encode(PROMPT)
    results: dict[str, dict[str, tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            if backend == "transformers":
                results[backend] = measure(TransformersSampler(policy, tokenizer), prompt, args)
            elif backend == "vllm":
                from dash_core.samplers.vllm_engine import VLLMSampler

                sampler = VLLMSampler(policy, tokenizer, SamplerConfig(backend="vllm"), seed=0, work_dir=tmp)
                results["vllm in-process"] = measure(sampler, prompt, args)
            elif backend == "remote":
                from dash_core.samplers.remote import RemoteSampler
                from dash_core.serving import free_port, launch_servers

                model_dir = f"{tmp}/served"
                policy.save_pretrained(model_dir)
                tokenizer.save_pretrained(model_dir)
                (server,) = launch_servers(model_dir, 1, free_port(8500), dtype=args.dtype, log_dir=tmp)
                with server:
                    remote = RemoteSampler(RemoteConfig(urls=[server.url]), tokenizer, f"{tmp}/sync")
                    results["remote (1 server)"] = measure(remote, prompt, args)
            else:
                parser.error(f"unknown backend {backend!r} (transformers, vllm, remote)")

    console = Console(width=160)
    table = Table(title=f"tokens/s by sequences per call: tiny Llama hidden {args.hidden}, {args.layers} layers, "
                        f"{args.dtype}, {args.new_tokens} new tokens, groups of {GROUP}, {args.threads} threads")
    table.add_column("sequences per call", justify="right")
    for backend in results:
        table.add_column(backend, justify="right")
    for size in map(str, args.sizes):
        table.add_row(size, *(f"{tokens / seconds:,.0f}" for seconds, tokens in (r[size] for r in results.values())))
    console.print(table)

    largest = str(max(args.sizes))
    table = Table(title=f"{largest} sequences: one call vs {int(largest) // 16} calls of 16 (median s)")
    for column in ["backend", "1 call s", "small calls s", "speed-up"]:
        table.add_column(column, justify="left" if column == "backend" else "right")
    for backend, rows in results.items():
        one, many = rows[largest][0], rows["small calls"][0]
        table.add_row(backend, f"{one:.3f}", f"{many:.3f}", f"{many / one:.1f}x")
    console.print(table)


if __name__ == "__main__":
    main()
