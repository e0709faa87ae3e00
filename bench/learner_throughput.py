"""Learner throughput and memory: one optimizer step of the learner per configuration, each in its own process.

    dashrl bench learner_throughput --model qwen0.5b --logprobs full,lean
    python bench/learner_throughput.py --model tiny --json      # one JSON object per configuration

Models are built from their configs with random weights (no download): `tiny` (the embedded default's) and
`qwen0.5b` (Qwen2.5-0.5B's shape: 24 layers, hidden 896, vocabulary 151,936). The batch is `--rows` sequences of
`--prompt` + `--completion` random tokens. Peak memory is the most the process held above its size just before
the step (RSS sampled every 5 ms on CPU; the allocator's peak on CUDA); learner memory is the most it held above its
size before the model was built (weights, gradients, Adam's state and the step's activations). `--lora RANK` trains
a LoRA adapter on every linear layer instead of every weight. `full` is the log-prob computation the
learner used before (logits at every position over the whole vocabulary, then log-softmax), measured beside today's
for comparison. Imports neither Prefect nor MLflow, so it runs on a machine with only torch and transformers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

MODELS = {
    "tiny": None,
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=32_768, tie_word_embeddings=True),
}  # fmt: skip


def full_logits_logprobs(policy, prompt_ids, completion_ids, pad_id, chunk_tokens=None, packed=False):
    """The learner's log-probs before the lean computation: every position's logits, copied, then log-softmax."""
    import torch

    device = policy.device
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    longest = max(map(len, completion_ids))
    offsets = torch.arange(longest, device=device)
    starts = torch.tensor([len(p) - 1 for p in prompt_ids], device=device)
    positions = (starts[:, None] + offsets).clamp(max=width - 2)
    mask = (offsets[None, :] < torch.tensor([len(c) for c in completion_ids], device=device)[:, None]).float()
    logits = policy(input_ids=input_ids, attention_mask=attention).logits
    logits = logits.gather(1, positions[..., None].expand(-1, -1, logits.size(-1)))
    targets = input_ids.gather(1, positions + 1)
    logp = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return logp * mask, mask


def build_policy(name: str, dtype: str, device: str):
    import torch

    if MODELS[name] is None:
        from dash_core.config import ModelConfig
        from dash_core.models import load_policy

        policy, _ = load_policy(ModelConfig(name="tiny", dtype=dtype, device=device), seed=0)
        return policy
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**MODELS[name], torch_dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).to(device)


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: a warm-up step, then timed steps."""
    import torch

    import dash_core.learner as learner_module
    from dash_core.config import AlgoConfig, LearnerConfig
    from dash_core.learner import Learner
    from dash_core.memory import PeakMemory
    from dash_core.team import local_device, team

    member = team()  # one of `learners` processes, each learning its share of the batch
    torch.set_num_threads(config["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    before = _held(device)
    policy = build_policy(config["model"], config["dtype"], str(local_device(torch.device(device))))
    if config.get("lora"):
        from dash_core.config import LoraConfig
        from dash_core.models import add_lora

        add_lora(policy, LoraConfig(rank=config["lora"], alpha=2.0 * config["lora"]))
    if config["checkpointing"]:
        policy.gradient_checkpointing_enable()
    if config["logprobs"] == "full":
        learner_module.completion_logprobs = full_logits_logprobs
    vocab = policy.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    rows = config["rows"]
    prompts = torch.randint(1, vocab, (rows, config["prompt"]), generator=generator).tolist()
    completions = torch.randint(1, vocab, (rows, config["completion"]), generator=generator).tolist()
    batch = {"prompt_ids": prompts, "completion_ids": completions, "advantage": [1.0 - 2 * (i % 2) for i in range(rows)],
             "sampler_logprobs": [[-1.0] * config["completion"]] * rows}  # fmt: skip
    size, tokens = config["micro_batch"], config.get("tokens")
    learner_cfg = LearnerConfig(lr=1e-6, micro_batch_size=size, tokens_per_micro_batch=tokens, precision=config.get("precision"),
                                data_parallel=config.get("data_parallel", "ddp"))  # fmt: skip
    learner = Learner(policy, learner_cfg, AlgoConfig(), pad_id=0, team=member)
    batch = member.share(batch)
    if tokens:
        learner.step([batch])  # allocator and optimizer state settle before the probe sizes an automatic budget
    chunks = learner.micro_batches(batch)  # as the learner makes them: by token budget (grouped by length) or rows
    learner.step(chunks)  # allocator and optimizer state settle
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for _ in range(config["steps"]):
            learner.step(chunks)
        seconds = (time.perf_counter() - start) / config["steps"]
    tokens = rows * (config["prompt"] + config["completion"])
    return {"config": config | {"tokens": learner.token_budget}, "tokens_per_s": tokens / seconds, "step_s": seconds,
            "peak_mem_gib": memory.peak / 2**30, "learner_gib": (memory.start + memory.peak - before) / 2**30,
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{config['threads']}",
            "learners": member.size}  # fmt: skip


def _held(device: str) -> int:
    """Memory the process holds now: what the learner's own memory (weights, gradients, Adam's state, the step's
    activations) is counted from."""
    import psutil
    import torch

    return torch.cuda.memory_allocated() if device == "cuda" else psutil.Process().memory_info().rss


def run_learners(config: dict[str, Any]) -> subprocess.CompletedProcess:
    """The configuration's learner processes (as `dashrl train --learners N` starts them); rank 0 reports."""
    from dash_core.serving import unused_port

    n = config["learners"]
    env = os.environ | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(unused_port()),
        "WORLD_SIZE": str(n),
        "LOCAL_WORLD_SIZE": str(n),
    }
    command = [sys.executable, __file__, "--worker", json.dumps(config)]
    others = [subprocess.Popen(command, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL)
              for r in range(1, n)]  # fmt: skip
    done = subprocess.run(
        command, env=env | {"RANK": "0", "LOCAL_RANK": "0"} if n > 1 else os.environ, capture_output=True, text=True
    )
    for process in others:
        process.wait()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--logprobs", default="full,lean", help="comma-separated: full (before), lean (today)")
    parser.add_argument("--dtype", default="float32", help="comma-separated model dtypes: float32, bfloat16")
    parser.add_argument(
        "--precision",
        default="model",
        help="comma-separated learner precisions: model (the "
        "model's dtype), bf16-mixed (autocast over float32 weights)",
    )
    parser.add_argument("--checkpointing", default="off", help="comma-separated: off, on (activation checkpointing)")
    parser.add_argument("--micro-batch", default="8", help="comma-separated sequences per forward+backward")
    parser.add_argument(
        "--tokens",
        default="rows",
        help="comma-separated token budgets per micro-batch, 'auto' (sized "
        "for the memory left), or 'rows' (micro-batches of --micro-batch sequences)",
    )
    parser.add_argument(
        "--lora", default="off", help="comma-separated: off (full fine-tuning) or a LoRA rank (every linear layer)"
    )
    parser.add_argument(
        "--learners", default="1", help="comma-separated learner processes sharing the batch (one GPU each)"
    )
    parser.add_argument("--data-parallel", default="ddp", help="comma-separated, for several learners: ddp, fsdp")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from dash_core.team import team

        result = measure(json.loads(args.worker))
        member = team()
        member.disband()
        if member.leads:
            print(json.dumps(result))
        return
    grid = itertools.product(args.model.split(","), args.logprobs.split(","), args.dtype.split(","), args.precision.split(","),
                             args.checkpointing.split(","), map(int, args.micro_batch.split(",")),
                             [None if t == "rows" else t if t == "auto" else int(t) for t in args.tokens.split(",")],
                             map(int, args.learners.split(",")), args.data_parallel.split(","),
                             [None if r == "off" else int(r) for r in args.lora.split(",")])  # fmt: skip
    rows = []
    for model, logprobs, dtype, precision, checkpointing, micro_batch, tokens, learners, parallel, lora in grid:
        if learners == 1 and parallel != args.data_parallel.split(",")[0]:
            continue  # one learner has nothing to split
        config = {"model": model, "logprobs": logprobs, "dtype": dtype, "checkpointing": checkpointing == "on",
                  "precision": None if precision == "model" else precision,
                  "micro_batch": micro_batch, "tokens": tokens, "rows": args.rows, "prompt": args.prompt, "completion": args.completion,
                  "steps": args.steps, "threads": max(1, args.threads // learners), "learners": learners, "data_parallel": parallel,
                  "lora": lora}  # fmt: skip
        done = run_learners(config)
        if done.returncode:
            result = {
                "config": config,
                "error": done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}",
            }
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(result)
        if args.json:
            print(json.dumps(result), flush=True)
    if not args.json:
        print(
            f"{'model':9} {'logprobs':8} {'dtype':8} {'mixed':5} {'ckpt':4} {'lora':>4} {'micro-batch':>13} {'learners':>8} {'tokens/s':>9} {'step s':>7} {'peak GiB':>8} {'learner GiB':>11}"
        )
        for r in rows:
            c = r["config"]
            micro = f"{c['tokens']} tok" if c.get("tokens") else f"{c['micro_batch']} rows"
            mixed = "bf16" if c.get("precision") == "bf16-mixed" else "-"
            learners = f"{c['learners']} {c['data_parallel']}" if c["learners"] > 1 else "1"
            head = f"{c['model']:9} {c['logprobs']:8} {c['dtype']:8} {mixed:5} {'on' if c['checkpointing'] else 'off':4} {c.get('lora') or '-':>4} {micro:>13} {learners:>8}"
            print(
                head
                + (
                    f" {r['tokens_per_s']:9.0f} {r['step_s']:7.2f} {r['peak_mem_gib']:8.2f} {r['learner_gib']:11.2f}"
                    if "error" not in r
                    else f"  {r['error']}"
                )
            )


if __name__ == "__main__":
    main()
