"""Turning problems into the token ids a sampler or learner sees."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from dash_core.data.problem import Problem


def encode_prompts(tokenizer: PreTrainedTokenizerBase, problems: list[Problem]) -> list[list[int]]:
    return [tokenizer(p.prompt)["input_ids"] for p in problems]
