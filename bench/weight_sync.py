"""Weight sync per sampler backend: the seconds and bytes one sync moves, full weights against a LoRA adapter.

    dashrl bench weight_sync --model tiny,qwen0.5b --backend transformers,vllm,remote --repeats 5

For each model and backend, one sampler over one policy with a LoRA adapter (rank --rank on every linear layer) is
synced --repeats times each way, alternated: `full` moves the base and the adapter (what a sync costs a full
fine-tuning run, plus the adapter's bytes), `lora` the adapter alone (what a LoRA run's iterations cost). Between
syncs the weights change (the adapter's B matrices, and with `full` a base matrix), as after an optimizer step.
Bytes are what the sampler reports it moved (`sync/bytes` in a run); the full sync's seconds are split into its
parts: preparing the weights (building the list, or writing the file a server reads) and the engine or server taking
them. `transformers` is the private copy a run with rollouts ahead samples from (the shared policy costs nothing).
Models are built from configs with random weights: `tiny` (the embedded default's shape) and `qwen0.5b`
(Qwen2.5-0.5B's). Leaves out: syncs over a network (the remote server is on loopback, its file on local disk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

from dash_core.config import LoraConfig, RemoteConfig, SamplerConfig  # noqa: E402
from dash_core.models import add_lora, char_tokenizer  # noqa: E402
from dash_core.samplers import build_sampler  # noqa: E402

PARTS: dict[str, float] = defaultdict(float)  # seconds per part of the sync in progress


@contextlib.contextmanager
def timing(part: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        PARTS[part] += time.perf_counter() - start


@contextlib.contextmanager
def instrumented(backend: str) -> Iterator[None]:
    """Within it the parts of a full sync are timed: preparing the weights, and the engine or server taking them."""
    import dash_core.samplers.remote_backend as remote
    import dash_core.samplers.vllm_backend as vllm

    module, name = {"vllm": (vllm, "base_weights"), "remote": (remote, "save_weights")}.get(backend, (None, ""))
    if module is None:
        yield
        return
    original = getattr(module, name)

    def prepare(*args, **kwargs):
        with timing("prepare"):
            return original(*args, **kwargs)

    setattr(module, name, prepare)
    try:
        yield
    finally:
        setattr(module, name, original)


def build(model: str, rank: int):
    from bench.learner_throughput import build_policy

    policy = build_policy(model, "float32", "cpu")
    add_lora(policy, LoraConfig(rank=rank, alpha=2.0 * rank))
    tokenizer = char_tokenizer()  # prompts are not sampled here; a server needs some tokenizer in its folder
    return policy, tokenizer


def sampler_for(backend: str, policy, tokenizer, rank: int, workdir: Path, stack: contextlib.ExitStack):
    if backend == "transformers":
        return build_sampler(SamplerConfig(), policy, tokenizer, 0, str(workdir), private=True)
    if backend == "vllm":
        cfg = SamplerConfig(backend="vllm", vllm={"max_model_len": 128})
        return build_sampler(cfg, policy, tokenizer, 0, str(workdir))
    from dash_core.models import save_model
    from dash_core.samplers.remote_backend import RemoteSampler
    from dash_core.serving import free_port, launch_servers, lora_server_args

    model_dir = save_model(policy, tokenizer, workdir / "initial")
    (server,) = launch_servers(model_dir, 1, free_port(8600), lora_server_args(rank), dtype="float32", max_model_len=128,
                               log_dir=str(workdir))  # fmt: skip
    stack.callback(server.stop)
    return RemoteSampler(RemoteConfig(urls=[server.url], timeout_s=600), tokenizer, str(workdir / "sync"))


@torch.no_grad()
def change(policy, full: bool) -> None:
    """Weights as after an optimizer step: every adapter B matrix, and with `full` one base matrix too."""
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.add_(1e-3)
    if full:
        next(p for n, p in policy.named_parameters() if "base_layer" in n).add_(1e-3)


def measure(model: str, backend: str, rank: int, repeats: int) -> dict:
    policy, tokenizer = build(model, rank)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack, instrumented(backend):
        sampler = sampler_for(backend, policy, tokenizer, rank, Path(tmp), stack)
        sampler.load_weights(policy)  # the first sync: engines and servers warm up
        runs: dict[str, list[dict]] = {"full": [], "lora": []}
        for _ in range(repeats):
            for mode in ("full", "lora"):
                change(policy, mode == "full")
                PARTS.clear()
                start = time.perf_counter()
                sampler.load_weights(policy, adapter_only=mode == "lora")
                seconds = time.perf_counter() - start
                runs[mode].append({"s": seconds, "bytes": sampler.synced_bytes, **PARTS})
    return {mode: {key: statistics.median(r.get(key, 0.0) for r in rows) for key in ("s", "bytes", "prepare")}
            for mode, rows in runs.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny,qwen0.5b", help="comma-separated: tiny, qwen0.5b")
    parser.add_argument(
        "--backend", default="transformers,vllm,remote", help="comma-separated: transformers, vllm, remote"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{'model':9} {'backend':12} {'sync':5} {'MB':>9} {'seconds':>8} {'prepare s':>9} {'take s':>8} {'lora/full bytes':>15}"
    )
    for model in args.model.split(","):
        for backend in args.backend.split(","):
            result = measure(model, backend, args.rank, args.repeats)
            for mode in ("full", "lora"):
                r = result[mode]
                share = f"{result['lora']['bytes'] / result['full']['bytes']:.2%}" if mode == "lora" else ""
                prepare = f"{r['prepare']:.3f}" if mode == "full" and backend != "transformers" else "-"
                take = f"{r['s'] - r['prepare']:.3f}" if mode == "full" and backend != "transformers" else "-"
                print(
                    f"{model:9} {backend:12} {mode:5} {r['bytes'] / 1e6:9.2f} {r['s']:8.3f} {prepare:>9} {take:>8} {share:>15}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
