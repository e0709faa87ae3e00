"""Update rules, registered by name, and how each splits a sampled batch into optimizer steps.

A rule maps a chunk's per-token log-probabilities to the SUM of its per-token losses; the learner divides the
accumulated gradient by the number of completion tokens in the optimizer step, so the loss is token-level (every
token weighs the same whatever its completion's length) and chunking never changes the gradient.

- pg (DASH):      l = -A * log pi(t). One step per sampled batch keeps samples exactly on-policy: no ratio, no clip.
- grpo, ppo_*:    r = pi(t) / pi_old(t), l = -min(r * A, clip(r, 1 - eps, 1 + eps) * A), with pi_old the sampler's
                  log-probabilities. grpo takes one step per (small) batch; ppo_multi takes K steps over the whole
                  batch; ppo_mini splits it into K minibatches, one step each. With K = 1 all equal pg.
- sft:            l = -log pi(t) on kept traces (advantage 1): human solutions or a teacher's correct traces.
- KL (any rule):  + beta * k3, k3 = exp(ref - logp) - (ref - logp) - 1, against a frozen reference, when beta > 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (logp, mask, chunk tensors, clip_eps) -> (summed loss, summed count of clipped tokens)
UpdateRule = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float], tuple[torch.Tensor, torch.Tensor]]


def policy_gradient(logp: torch.Tensor, mask: torch.Tensor, chunk: dict[str, torch.Tensor], clip_eps: float):
    return -(chunk["advantage"][:, None] * logp * mask).sum(), torch.zeros(())


def clipped_ratio(logp: torch.Tensor, mask: torch.Tensor, chunk: dict[str, torch.Tensor], clip_eps: float):
    ratio = torch.exp(logp - chunk["sampler_logprobs"])
    advantage = chunk["advantage"][:, None]
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage
    loss = -torch.minimum(unclipped, clipped)
    return (loss * mask).sum(), ((clipped < unclipped).float() * mask).sum()


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate: non-negative, unbiased, zero where the two agree."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


RULES: dict[str, UpdateRule] = {
    "pg": policy_gradient,
    "grpo": clipped_ratio,
    "ppo_multi": clipped_ratio,
    "ppo_mini": clipped_ratio,
    "sft": policy_gradient,
}


def optimizer_steps(rule: str, rows: int, k: int) -> list[range]:
    """The rows of the (kept) batch that each optimizer step learns from."""
    if rule == "ppo_multi":
        return [range(rows)] * k
    if rule == "ppo_mini":
        bounds = [round(i * rows / k) for i in range(k + 1)]
        return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    return [range(rows)]
