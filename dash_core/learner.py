"""The learner: chunked forward+backward over the kept samples, one optimizer step per sampled batch.

Micro-batches (chunks) are sized for the learner's memory, independently of the sampling batch; their gradients
accumulate into one step. The learner also recomputes the log-probabilities of the sampled tokens, and the gap to
the sampler's values shows whether the samples really were on-policy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from dash_core.config import LearnerConfig
from dash_core.rules import UpdateRule


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm was NaN/inf; the optimizer step was not taken."""


@dataclass
class LearnStats:
    loss: float = 0.0
    grad_norm: float = 0.0
    logprob_gap_mean: float = 0.0
    logprob_gap_max: float = 0.0
    sequences: int = 0
    tokens: int = 0

    def metrics(self) -> dict[str, float]:
        return {
            "train/loss": self.loss,
            "train/grad_norm": self.grad_norm,
            "logprob_gap/mean": self.logprob_gap_mean,
            "logprob_gap/max": self.logprob_gap_max,
        }


def completion_logprobs(
    policy: PreTrainedModel, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each completion token under `policy`, as (rows, longest completion), and their mask.

    Sequences are right-padded, so positions count from 0 at the first prompt token, as the samplers count them.
    """
    device = policy.device
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    longest = max(map(len, completion_ids))
    offsets = torch.arange(longest, device=device)
    starts = torch.tensor([len(p) - 1 for p in prompt_ids], device=device)
    positions = (starts[:, None] + offsets).clamp(max=width - 2)  # logits at t predict token t + 1
    mask = (offsets[None, :] < torch.tensor([len(c) for c in completion_ids], device=device)[:, None]).float()
    logits = policy(input_ids=input_ids, attention_mask=attention).logits
    logits = logits.gather(1, positions[..., None].expand(-1, -1, logits.size(-1)))
    targets = input_ids.gather(1, positions + 1)
    logp = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return logp * mask, mask


class Learner:
    def __init__(self, policy: PreTrainedModel, cfg: LearnerConfig, rule: UpdateRule, pad_id: int):
        self.policy = policy
        self.cfg = cfg
        self.rule = rule
        self.pad_id = pad_id
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(self, chunks: Iterable[dict[str, list]], total_tokens: int) -> LearnStats:
        """Accumulate the loss over `chunks` (rows with prompt_ids, completion_ids, advantage, sampler_logprobs)."""
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats = LearnStats()
        gap_sum = 0.0
        for chunk in chunks:
            logp, mask = completion_logprobs(self.policy, chunk["prompt_ids"], chunk["completion_ids"], self.pad_id)
            tensors = self._tensors(chunk, logp.shape)
            loss = self.rule(logp, mask, tensors, total_tokens)
            loss.backward()
            gap = (logp.detach() - tensors["sampler_logprobs"]).abs() * mask
            gap_sum += gap.sum().item()
            stats.logprob_gap_max = max(stats.logprob_gap_max, gap.max().item())
            stats.loss += loss.item()
            stats.sequences += len(chunk["prompt_ids"])
            stats.tokens += int(mask.sum().item())
        if stats.sequences == 0:
            return stats
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip).item()
        if not (math.isfinite(stats.loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss ({stats.loss}) or gradient norm ({grad_norm}); the step was not taken. "
                "Lower learner.lr, check the rewards for NaN, or use model.dtype=float32."
            )
        self.optimizer.step()
        stats.grad_norm = grad_norm
        stats.logprob_gap_mean = gap_sum / max(stats.tokens, 1)
        return stats

    def _tensors(self, chunk: dict[str, list], shape: torch.Size) -> dict[str, torch.Tensor]:
        device = self.policy.device
        sampler = torch.zeros(shape, device=device)
        for i, row in enumerate(chunk["sampler_logprobs"]):
            sampler[i, : len(row)] = torch.tensor(row, device=device)
        return {"advantage": torch.tensor(chunk["advantage"], device=device, dtype=torch.float32), "sampler_logprobs": sampler}
