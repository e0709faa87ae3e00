"""Turning problems into the token ids a sampler or learner sees."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from dash_core.data.problem import Problem


def encode_prompts(tokenizer: PreTrainedTokenizerBase, problems: list[Problem], use_chat_template: bool = True) -> list[list[int]]:
    """Each prompt as a user turn of the tokenizer's chat template when it has one, else as plain text."""
    if use_chat_template and tokenizer.chat_template:
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False))
            for p in problems
        ]
    return [tokenizer(p.prompt)["input_ids"] for p in problems]
