"""Update rules and the whole objective: each rule is one record in `RULES`; the per-token losses, the KL term and
the token-level normalisation are all below.

The objective of an optimizer step over the kept completions (tokens t, advantages A, the sampler's log-probs old):

    L = (1 / T) * sum_t [ loss_rule(t) + beta * k3(t) ],   T = completion tokens in the step

- pg (DASH):   loss = -A * log pi(t). One step per sampled batch keeps samples exactly on-policy: no ratio, no clip.
- clipped:     r = pi(t) / pi_old(t), loss = -min(r * A, clip(r, 1 - eps, 1 + eps) * A). `grpo` takes one step per
               (small) batch, `ppo_multi` K passes over the whole batch (TRL's num_iterations), `ppo_mini` K
               minibatches, one step each (TRL's steps_per_generation); K = algo.ppo_steps. With K = 1 all equal pg.
- sft:         loss = -log pi(t) on supervised traces (advantage 1): human solutions or a teacher's correct traces.
- KL (any rule, algo.beta > 0): k3 = exp(ref - logp) - (ref - logp) - 1 against a frozen reference.
- Samples from an older policy (rollouts run ahead, sampler.max_staleness != 0): pg's loss is multiplied by the
               truncated importance weight w = min(pi(t) / pi_old(t), algo.is_cap), a constant in the gradient
               (truncated importance sampling), so the step follows the current policy's gradient with bounded
               variance. The clipped rules need no weight: their ratio is already taken to the sampler's policy.

Every token weighs the same whatever its completion's length, and since the learner sums losses over chunks and
divides the gradient by T once (`normalise`), chunking never changes the gradient.

Adding a rule is one `UpdateRule` in `RULES` plus a preset file in configs/. This module imports no torch, so the
config can list the rules without loading it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor
    from torch.nn import Parameter

# (log pi, log pi_old, advantage per row as a column, clip eps) -> (per-token loss, per-token 1.0 where clipped)
TokenLoss = Callable[["Tensor", "Tensor", "Tensor", float], tuple["Tensor", "Tensor"]]


def policy_gradient(logp: Tensor, old: Tensor, advantage: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    return -advantage * logp, logp.new_zeros(logp.shape)


def clipped_ratio(logp: Tensor, old: Tensor, advantage: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    ratio = (logp - old).exp()
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage
    return -unclipped.minimum(clipped), (clipped < unclipped).float()


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate: non-negative, unbiased, zero where the two agree."""
    delta = ref_logp - logp
    return delta.exp() - delta - 1


@dataclass(frozen=True)
class UpdateRule:
    """Everything that differs between update rules."""

    loss: TokenLoss
    split: Literal["once", "passes", "minibatches"] = "once"  # the kept batch as 1, K or K optimizer steps
    learns_from: Literal["samples", "traces"] = "samples"  # the policy's own samples, or supervised traces
    clips: bool = False  # reports train/clip_fraction
    corrects: bool = False  # weighs samples of an older policy by truncated importance weights (see the top)

    def optimizer_steps(self, rows: int, k: int) -> list[range]:
        """The rows of the kept batch that each optimizer step learns from."""
        if self.split == "passes":
            return [range(rows)] * k
        if self.split == "minibatches":
            bounds = [round(i * rows / k) for i in range(k + 1)]
            return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        return [range(rows)]

    def reported(self, metrics: dict[str, float], beta: float, off_policy: bool) -> dict[str, float]:
        """The learner's metrics that mean something for this rule (`off_policy`: samples may be stale)."""
        left_out = {"train/kl"} if beta == 0 else set()
        if not self.clips:
            left_out.add("train/clip_fraction")
        if not (off_policy and self.corrects):
            left_out |= set(IS_METRICS)
        if self.learns_from == "traces":  # not sampled from the policy: there is no on-policy gap to check
            left_out |= {"logprob_gap/mean", "logprob_gap/max", "train/mismatch_kl"}
        return {k: v for k, v in metrics.items() if k not in left_out}


IS_METRICS = ("train/is_weight_mean", "train/is_weight_max", "train/is_truncated_fraction")

RULES: dict[str, UpdateRule] = {
    "pg": UpdateRule(policy_gradient, corrects=True),
    "grpo": UpdateRule(clipped_ratio, clips=True),
    "ppo_multi": UpdateRule(clipped_ratio, split="passes", clips=True),
    "ppo_mini": UpdateRule(clipped_ratio, split="minibatches", clips=True),
    "sft": UpdateRule(policy_gradient, learns_from="traces"),
}


def importance_weight(logp: Tensor, old: Tensor, cap: float) -> Tensor:
    """Per-token pi / pi_old, truncated at `cap`, with no gradient of its own."""
    return (logp.detach() - old).exp().clamp(max=cap)


def objective(
    rule: UpdateRule,
    logp: Tensor,
    mask: Tensor,
    chunk: dict[str, Tensor],
    ref_logp: Tensor | None,
    clip_eps: float,
    beta: float,
    is_cap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A chunk's summed objective (before `normalise`), its summed KL and its count of clipped tokens; `is_cap`:
    the samples may come from an older policy, and a correcting rule weighs them (see the top)."""
    old = chunk["sampler_logprobs"]
    loss, clipped = rule.loss(logp, old, chunk["advantage"][:, None], clip_eps)
    if is_cap is not None and rule.corrects:
        loss = loss * importance_weight(logp, old, is_cap)
    kl = k3(logp, ref_logp) if ref_logp is not None else logp.new_zeros(logp.shape)
    return ((loss + beta * kl) * mask).sum(), (kl * mask).sum(), (clipped * mask).sum()


def normalise(parameters: Iterable[Parameter], tokens: int) -> None:
    """Token-level normalisation: the step's summed gradient divided by its completion tokens."""
    for param in parameters:
        if param.grad is not None:
            param.grad /= tokens
