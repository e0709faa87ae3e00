"""Helpers shared by the sampler tests."""

import torch

from dash_core.learner import completion_logprobs


def max_gap(policy, prompts, generations, n, pad_id) -> float:
    """Largest |sampler logprob - learner logprob| over all completion tokens (completion i*n+j is prompt i's)."""
    completions = [g.token_ids for g in generations]
    with torch.no_grad():
        logp, mask = completion_logprobs(policy, [p for p in prompts for _ in range(n)], completions, pad_id)
    sampled = torch.zeros_like(logp)
    for i, g in enumerate(generations):
        sampled[i, : len(g.logprobs)] = torch.tensor(g.logprobs)
    return ((logp - sampled).abs() * mask).max().item()
