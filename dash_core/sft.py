"""Supervised fine-tuning on solution traces: the tiny model's warm-up, and later the SFT baselines.

Loss is the mean negative log-likelihood of the solution tokens (and the end-of-sequence token) given the prompt;
prompt tokens are context only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.data.problem import Problem
from dash_core.learner import completion_logprobs
from dash_core.prompts import encode_prompts


def solution_ids(tokenizer: PreTrainedTokenizerBase, solutions: list[str | None]) -> list[list[int]]:
    """Target tokens of each solution, ending with end-of-sequence so the policy learns to stop."""
    if any(s is None for s in solutions):
        raise ValueError("problems without a solution cannot be used for supervised training")
    return [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for s in solutions]


def sft_loss(
    policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], use_chat_template: bool = True
) -> torch.Tensor:
    prompts = encode_prompts(tokenizer, problems, use_chat_template)
    targets = solution_ids(tokenizer, [p.solution for p in problems])
    logp, mask = completion_logprobs(policy, prompts, targets, tokenizer.pad_token_id)
    return -logp.sum() / mask.sum()


def train_supervised(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batches: Iterable[list[Problem]],
    lr: float,
    use_chat_template: bool = True,
    grad_clip: float = 1.0,
    done: Callable[[int], bool] = lambda step: False,
) -> list[float]:
    """One AdamW step per batch until the batches run out or `done(step)`; returns the loss of every step."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    losses = []
    for step, problems in enumerate(batches, 1):
        policy.train()
        optimizer.zero_grad(set_to_none=True)
        loss = sft_loss(policy, tokenizer, problems, use_chat_template)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if done(step):
            break
    return losses
