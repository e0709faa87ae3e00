"""Update rules, registered by name: each turns per-token log-probabilities of a chunk into its share of the loss.

Losses are token-level: summed over the chunk's completion tokens and divided by the number of completion tokens
in the whole optimizer step (`total_tokens`), so accumulating chunks gives exactly the full-batch gradient and
every token weighs the same whatever the length of its completion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

UpdateRule = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int], torch.Tensor]


def pg(logp: torch.Tensor, mask: torch.Tensor, chunk: dict[str, torch.Tensor], total_tokens: int) -> torch.Tensor:
    """DASH: vanilla policy gradient, loss = -sum(A * log pi(token)) / total_tokens.

    One optimizer step per sampled batch keeps the samples exactly on-policy, so no ratio or clipping is needed.
    """
    return -(chunk["advantage"][:, None] * logp * mask).sum() / total_tokens


RULES: dict[str, UpdateRule] = {"pg": pg}
