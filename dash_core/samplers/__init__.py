"""Samplers: one protocol, several backends. Each returns tokens and per-token logprobs and can load new weights."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.config import SamplerConfig
from dash_core.samplers.base import Generation, Sampler, SamplingParams
from dash_core.samplers.hf import TransformersSampler

__all__ = ["Generation", "Sampler", "SamplingParams", "build_sampler"]


def build_sampler(cfg: SamplerConfig, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Sampler:
    return TransformersSampler(policy, tokenizer, batch_size=cfg.batch_size)
