"""Group-normalised advantages and the gradient filter.

A = (r - mean_group) / (std_group + eps), std unbiased as in GRPO (or no std scaling). The gradient filter keeps
samples with |A| >= tau: groups whose rewards are all equal have A = 0 and add nothing to the gradient sum, so they are
dropped before any learner forward pass. tau = 0 keeps everything ("No-GF").
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """`rewards` is (prompts, group_size); returns advantages of the same shape."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def gradient_filter(advantages: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean mask of the samples worth a forward and backward pass."""
    return advantages.abs() >= tau
