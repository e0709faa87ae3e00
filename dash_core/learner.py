"""The learner: chunked forward+backward over the kept samples, and the update rule's optimizer steps.

Micro-batches (chunks) are sized for the learner's memory, independently of the sampling batch; their gradients
accumulate into one step. Warm-up, RL and supervised baselines all learn through it. The learner also recomputes the log-probabilities of the sampled tokens, and the gap to
the sampler's values shows whether the samples really were on-policy.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from dash_core.config import AlgoConfig, LearnerConfig
from dash_core.memory import PeakMemory, available_bytes
from dash_core.models import adapted
from dash_core.rules import RULES, normalise, objective
from dash_core.store import BatchManifest, RunStore
from dash_core.team import SOLO, Team, summing_gradients

log = logging.getLogger(__name__)
LEARNER_COLUMNS = ["prompt_ids", "completion_ids", "advantage", "sampler_logprobs"]  # what a learner reads of a batch


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm was NaN/inf; the optimizer step was not taken."""


@dataclass
class LearnStats:
    """Sums over one optimizer step's chunks, turned into the logged metrics by `metrics()`."""

    loss_sum: float = 0.0
    kl_sum: float = 0.0
    clipped: float = 0.0
    gap_mean: float = 0.0
    gap_max: float = 0.0
    mismatch_kl: float = 0.0  # sampler -> learner, per token (k3 of their ratio)
    is_weight_mean: float = 0.0  # pi / pi_old per token, before truncation
    is_weight_max: float = 0.0
    is_truncated: float = 0.0  # fraction of tokens whose weight was truncated
    grad_norm: float = 0.0
    sequences: int = 0
    tokens: int = 0  # completion tokens: what the loss is normalised by
    row_tokens: int = 0  # prompt + completion tokens of the rows
    padded_tokens: int = 0  # what the forward passes computed: rows x longest row per micro-batch (packed: the rows)
    forward_s: float = 0.0
    backward_s: float = 0.0

    @classmethod
    def combine(cls, steps: list[LearnStats]) -> LearnStats:
        """Several optimizer steps of one iteration: sums add up; the sampler-learner gap is the first step's (later
        steps see the policy the earlier ones moved)."""
        first = steps[0]
        total = cls(gap_mean=first.gap_mean, gap_max=first.gap_max, mismatch_kl=first.mismatch_kl,
                    is_weight_mean=first.is_weight_mean, is_weight_max=first.is_weight_max, is_truncated=first.is_truncated)  # fmt: skip
        for s in steps:
            total.loss_sum += s.loss_sum
            total.kl_sum += s.kl_sum
            total.clipped += s.clipped
            total.sequences += s.sequences
            total.tokens += s.tokens
            total.row_tokens += s.row_tokens
            total.padded_tokens += s.padded_tokens
            total.forward_s += s.forward_s
            total.backward_s += s.backward_s
        total.grad_norm = sum(s.grad_norm for s in steps) / len(steps)
        return total

    def combine_team(self, team: Team, token_sums: list[float]) -> list[float]:
        """The whole team's sums and maxima in place of this process's; returns the team's `token_sums` (the
        per-token quantities that become means)."""
        names = ["loss_sum", "kl_sum", "clipped", "sequences", "tokens", "row_tokens", "padded_tokens"]
        sums, (self.gap_max, self.is_weight_max) = team.total(
            [getattr(self, name) for name in names] + token_sums, [self.gap_max, self.is_weight_max]
        )
        for name, value in zip(names, sums):
            setattr(self, name, type(getattr(self, name))(value))
        return sums[len(names) :]

    def metrics(self) -> dict[str, float]:
        tokens = max(self.tokens, 1)
        return {
            "train/loss": self.loss_sum / tokens,
            "train/grad_norm": self.grad_norm,
            "train/kl": self.kl_sum / tokens,
            "train/clip_fraction": self.clipped / tokens,
            "logprob_gap/mean": self.gap_mean,
            "logprob_gap/max": self.gap_max,
            "train/mismatch_kl": self.mismatch_kl,
            "train/is_weight_mean": self.is_weight_mean,
            "train/is_weight_max": self.is_weight_max,
            "train/is_truncated_fraction": self.is_truncated,
            "train/padding_fraction": 1 - self.row_tokens / max(self.padded_tokens, 1),
            "time/forward_s": self.forward_s,
            "time/backward_s": self.backward_s,
        }


AUTO_MEMORY_FRACTION = 0.8  # of the memory left that an automatic token budget may fill
PROBE_TOKENS = 2048  # padded tokens of the probe micro-batch that sizes it
LOGPROB_CHUNK_TOKENS = 1024  # completion tokens whose vocabulary-wide logits exist at once


def completion_logprobs(
    policy: PreTrainedModel,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_id: int,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each completion token under `policy`, as (rows, longest completion), and their mask.

    The vocabulary is the memory hog (151k logits per token for Qwen), so the LM head runs only on the positions
    that predict completion tokens, `chunk_tokens` at a time, each chunk recomputed in the backward pass instead of
    kept: log p = logit[target] - logsumexp(logits) never holds more than one chunk's logits. Sequences are
    right-padded, or with `packed` laid end to end in one row with no padding at all (position ids restart at each
    sequence; attention stays within it: variable-length kernels such as flash-attention's skip the rest, others
    mask it); positions count from 0 at the first prompt token, as the samplers count them.
    """
    device = policy.device
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    lengths = torch.tensor([len(c) for c in completion_ids], device=device)
    mask = torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]
    row, offset = mask.nonzero(as_tuple=True)
    position = torch.tensor([len(p) - 1 for p in prompt_ids], device=device)[row] + offset  # state at t predicts t + 1
    if packed:
        starts = torch.tensor([0, *itertools.accumulate(map(len, rows))][:-1], device=device)
        inputs = {"input_ids": torch.tensor([sum(rows, [])], device=device),
                  "position_ids": torch.tensor([[i for r in rows for i in range(len(r))]], device=device)}  # fmt: skip
        at = (torch.zeros_like(row), starts[row] + position)
    else:
        width = max(map(len, rows))
        inputs = {"input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device),
                  "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)}  # fmt: skip
        at = (row, position)
    targets = inputs["input_ids"][at[0], at[1] + 1]
    if _head_is_plain(policy):
        hidden = policy.base_model(**inputs, use_cache=False).last_hidden_state[at]
        head = policy.get_output_embeddings()
        recompute = torch.is_grad_enabled()
        pieces = [
            checkpoint(
                _token_logprobs, head, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens], use_reentrant=False
            )
            if recompute
            else _token_logprobs(head, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens])
            for i in range(0, len(targets), chunk_tokens)
        ]
        logp = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    else:  # heads that rescale or cap their logits: the model's own full forward
        logits = policy(**inputs, use_cache=False).logits[at].float()
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    table = torch.zeros(mask.shape, device=device, dtype=logp.dtype).index_put((row, offset), logp)
    return table, mask.float()


def _token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


class CompletionLogProbs(torch.nn.Module):
    """`completion_logprobs` of a policy as a module: what DDP wraps, so that the gradients of everything it
    computes are averaged across the processes of a team."""

    def __init__(self, policy: PreTrainedModel, pad_id: int, packed: bool):
        super().__init__()
        self.policy, self.pad_id, self.packed = policy, pad_id, packed

    def forward(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logprobs(self.policy, prompt_ids, completion_ids, self.pad_id, packed=self.packed)


def _head_is_plain(policy: PreTrainedModel) -> bool:
    """Logits = LM head of the base model's last hidden state, with no softcapping or scaling in between."""
    config = policy.config
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)) and (
        policy.base_model is not policy and policy.get_output_embeddings() is not None
    )


def by_length(rows: dict[str, list], budget: int, packed: bool = False) -> list[dict[str, list]]:
    """Micro-batches of at most `budget` tokens as computed (padded: rows x longest row; packed: their sum), rows
    sorted by length so that each pads little; a row longer than the budget is a micro-batch of its own. The
    step's gradient is the same in any grouping: it is a sum over tokens, normalised once."""
    lengths = [len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"], strict=True)]
    chunks, current = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        cost = sum(lengths[j] for j in current) + lengths[i] if packed else (len(current) + 1) * lengths[i]
        if current and cost > budget:
            chunks.append(current)
            current = []
        current.append(i)
    chunks += [current] if current else []
    return [{key: [values[i] for i in chunk] for key, values in rows.items()} for chunk in chunks]


class Learner:
    """The policy's optimizer and its update rule: reads the kept rows of a batch from the rollout store in its own
    micro-batches and turns them into the rule's optimizer steps. Every process of a team makes the same calls."""

    def __init__(
        self,
        policy: PreTrainedModel,
        cfg: LearnerConfig,
        algo: AlgoConfig,
        pad_id: int,
        reference: PreTrainedModel | None = None,
        team: Team = SOLO,
        off_policy: bool = False,
    ):
        """In a team, the weights are the first process's. With `data_parallel: fsdp` the learner trains a sharded
        copy of `policy`, which stays whole for sampling and checkpoints (see `export_weights`). `off_policy`:
        samples may come from an older policy (rollouts that run ahead), which the rule corrects for."""
        self.team = team
        self.sharded = team.size > 1 and cfg.data_parallel == "fsdp"
        weights = policy.state_dict() if self.sharded and team.leads else {}
        if self.sharded:  # the policy itself stays whole
            policy = copy.deepcopy(policy)
        self.policy = policy
        self.cfg = cfg
        self.algo = algo
        self.rule = RULES[algo.rule]
        self.pad_id = pad_id
        self.reference = reference
        self.is_cap = algo.is_cap if off_policy else None
        if cfg.activation_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.mixed = cfg.precision == "bf16-mixed"  # float32 weights and Adam state, bfloat16 matmuls
        self.partial = False  # an optimizer step of the batch being learned is (maybe partly) in the weights
        self.token_budget = None if cfg.tokens_per_micro_batch == "auto" else cfg.tokens_per_micro_batch
        attention = getattr(policy.config, "_attn_implementation", None) or ""
        self.packed = cfg.packing if cfg.packing is not None else attention.startswith("flash_attention")
        self.logprobs: torch.nn.Module = CompletionLogProbs(
            policy, pad_id, self.packed
        )  # what the learner differentiates
        if self.sharded:
            team.shard(self.logprobs, [m for m in policy.modules() if type(m).__name__ in policy._no_split_modules])
            team.load_full(policy, weights)
        elif team.size > 1:
            self.logprobs = team.data_parallel(self.logprobs, policy.device)
        trainable = [
            param for param in policy.parameters() if param.requires_grad
        ]  # the shards, if sharded; the adapter's, with LoRA
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def learn(self, store: RunStore, manifest: BatchManifest) -> dict[str, float]:
        """The rule's optimizer steps over the batch's kept rows (which the store keeps first), and their metrics.
        In a team, each process learns from its share of each step's rows."""
        steps: list[LearnStats] = []
        for rows in self.rule.optimizer_steps(manifest.kept, self.algo.ppo_steps):
            kept = store.kept_rows(manifest, LEARNER_COLUMNS, rows)
            stand_in = {key: values[:1] for key, values in kept.items()}
            steps.append(self.step(self.micro_batches(self.team.share(kept)), stand_in))
        self.partial = False
        return self.rule.reported(LearnStats.combine(steps).metrics(), self.algo.beta, self.is_cap is not None)

    def micro_batches(self, rows: dict[str, list]) -> list[dict[str, list]]:
        """`rows` in micro-batches: by token budget (rows grouped by length), or `micro_batch_size` rows each."""
        if not rows["prompt_ids"]:
            return []
        if not self.cfg.tokens_per_micro_batch:
            size = self.cfg.micro_batch_size
            return [
                {key: values[i : i + size] for key, values in rows.items()}
                for i in range(0, len(rows["prompt_ids"]), size)
            ]
        if self.token_budget is None:
            self.token_budget = self.fit_token_budget(rows)
            log.info("learner micro-batches: %d tokens (found for the memory left)", self.token_budget)
        return by_length(rows, self.token_budget, self.packed)

    def share_weights(self, source: PreTrainedModel) -> None:
        """After the first process's policy (`source`) changed outside learning (warm-up, a cached warm-up): every
        process's learner takes its weights."""
        if self.sharded:
            self.team.load_full(self.policy, source.state_dict() if self.team.leads else {})
        else:
            self.team.align(self.policy)

    def export_weights(self, into: PreTrainedModel) -> None:
        """The whole policy (`into`: what samplers and checkpoints read) takes the learned weights. Only sharded
        weights need it: they are gathered from every process."""
        if self.sharded:
            into.load_state_dict(self.team.gather_weights(self.policy))

    def optimizer_state(self) -> dict:
        """Adam's state for a checkpoint (gathered whole into the first process if sharded; every process calls it)."""
        if not self.sharded:
            return self.optimizer.state_dict()
        return get_optimizer_state_dict(
            self.policy, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    @property
    def needs_reference(self) -> bool:
        """A KL penalty needs a frozen reference model, unless the policy is a LoRA adapter on a frozen base: then
        the reference is the policy with its adapter off, and no second copy is held."""
        return self.algo.beta > 0 and self.reference is None and not adapted(self.policy)

    def use_reference(self, reference: PreTrainedModel | None) -> None:
        """The frozen KL reference (the first process's; the others pass None and copy its weights into a model of
        the policy's shape)."""
        if self.team.size > 1:
            reference = reference if self.team.leads else copy.deepcopy(self.policy)
            self.team.align(reference)
        self.reference = reference.eval().requires_grad_(False)

    def _forward_precision(self) -> torch.autocast:
        return torch.autocast(self.policy.device.type, dtype=torch.bfloat16, enabled=self.mixed)

    def load_optimizer_state(self, state: dict) -> None:
        """Adam's moments from a checkpoint; the learning rate and weight decay stay the config's, so a resumed run
        can change them (a checkpoint's param groups would silently override them)."""
        if self.sharded:
            set_optimizer_state_dict(self.policy, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = self.cfg.lr, self.cfg.weight_decay

    def step(self, chunks: list[dict[str, list]], stand_in: dict[str, list] | None = None) -> LearnStats:
        """One optimizer step over `chunks` (columns prompt_ids, completion_ids, advantage, sampler_logprobs).

        In a team, the gradients of every process's chunks are summed in the backward pass of each one's last
        chunk, and the loss is normalised by the whole step's tokens; a process without chunks runs `stand_in` (a
        row) with weight 0, so that it still takes part in that sum."""
        if self.needs_reference:
            raise ValueError("a KL penalty (algo.beta > 0) needs a reference model: call learner.use_reference first")
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats = LearnStats()
        token_sums = [0.0, 0.0, 0.0, 0.0]  # |gap|, mismatch k3, importance weight, truncated: over completion tokens
        idle = self.team.size > 1 and not chunks
        chunks = [stand_in] if idle else chunks
        for i, chunk in enumerate(chunks):
            with summing_gradients(self.logprobs, now=i == len(chunks) - 1):
                start = time.perf_counter()
                loss, kl, clipped, logp, mask, tensors = self._forward(chunk)
                _synchronize(logp.device)
                middle = time.perf_counter()
                (loss * 0 if idle else loss).backward()
                _synchronize(logp.device)
            stats.forward_s += middle - start
            stats.backward_s += time.perf_counter() - middle
            if idle:
                break
            token_sums = [
                a + b
                for a, b in zip(token_sums, self._sampler_gap(logp.detach(), tensors["sampler_logprobs"], mask, stats))
            ]
            stats.loss_sum += loss.item()
            stats.kl_sum += kl.item()
            stats.clipped += clipped.item()
            lengths = [len(p) + len(c) for p, c in zip(chunk["prompt_ids"], chunk["completion_ids"])]
            stats.sequences += len(lengths)
            stats.tokens += int(mask.sum().item())
            stats.row_tokens += sum(lengths)
            stats.padded_tokens += sum(lengths) if self.packed else len(lengths) * max(lengths)
        token_sums = stats.combine_team(self.team, token_sums)
        if stats.sequences == 0:
            return stats
        stats.gap_mean, stats.mismatch_kl, stats.is_weight_mean, stats.is_truncated = (
            s / stats.tokens for s in token_sums
        )
        normalise(self.policy.parameters(), stats.tokens / self.team.size)  # DDP averaged them
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip).item()
        if not (math.isfinite(stats.loss_sum) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss ({stats.loss_sum}) or gradient norm ({grad_norm}); the step was not taken. "
                "Lower learner.lr, check the rewards for NaN, or use model.dtype=float32."
            )
        self.partial = True  # until `learn` ends: an interruption from here on leaves no consistent state to save
        self.optimizer.step()
        stats.grad_norm = grad_norm
        return stats

    def _forward(self, chunk: dict[str, list]) -> tuple[torch.Tensor, ...]:
        """A chunk's objective (summed loss, KL, clipped count) and what the step's metrics need of it."""
        with self._forward_precision():
            logp, mask = self.logprobs(chunk["prompt_ids"], chunk["completion_ids"])
            tensors = self._tensors(chunk, logp.shape)
            ref = None
            if self.algo.beta > 0:
                with torch.no_grad(), self._reference() as reference:
                    ref, _ = completion_logprobs(reference, chunk["prompt_ids"], chunk["completion_ids"], self.pad_id)
            loss, kl, clipped = objective(
                self.rule, logp, mask, tensors, ref, self.algo.clip_eps, self.algo.beta, self.is_cap
            )
        return loss, kl, clipped, logp, mask, tensors

    @contextmanager
    def _reference(self) -> Iterator[PreTrainedModel]:
        """The KL reference: the frozen copy, or the policy itself with its LoRA adapter off."""
        if self.reference is not None:
            yield self.reference
            return
        self.policy.disable_adapters()
        try:
            yield self.policy
        finally:
            self.policy.enable_adapters()

    def _sampler_gap(
        self, logp: torch.Tensor, sampled: torch.Tensor, mask: torch.Tensor, stats: LearnStats
    ) -> list[float]:
        """How far the learner's log-probs are from the sampler's on a chunk's tokens: sums over tokens of the
        absolute gap, of the mismatch KL (k3 of the ratio r = pi / pi_old: r - 1 - log r) and of r and its
        truncation; the maxima go into `stats`."""
        delta = (logp - sampled) * mask
        ratio = delta.exp()
        stats.gap_max = max(stats.gap_max, delta.abs().max().item())
        stats.is_weight_max = max(stats.is_weight_max, (ratio * mask).max().item())
        truncated = (ratio > self.is_cap).float() if self.is_cap is not None else torch.zeros_like(ratio)
        return [
            s.item()
            for s in (
                delta.abs().sum(),
                ((ratio - 1 - delta) * mask).sum(),
                (ratio * mask).sum(),
                (truncated * mask).sum(),
            )
        ]

    def fit_token_budget(self, rows: dict[str, list]) -> int:
        """The largest token budget whose micro-batch fits the device with a margin: one probe micro-batch of the
        longest of `rows` (forward and backward, no step) gives the peak memory per padded token, scaled to the
        memory left once the gradients and Adam's moments have their place. A peak too small to see counts as
        the least a token can hold: its hidden state at each layer."""
        probe = by_length(rows, PROBE_TOKENS, self.packed)[-1]
        lengths = [len(p) + len(c) for p, c in zip(probe["prompt_ids"], probe["completion_ids"])]
        computed = sum(lengths) if self.packed else len(lengths) * max(lengths)
        shards = [p.to_local() if isinstance(p, DTensor) else p for p in self.policy.parameters() if p.requires_grad]
        gradients = sum(p.numel() * p.element_size() for p in shards)
        moments = 0 if self.optimizer.state else 2 * gradients  # allocated by the first optimizer step
        self.policy.train()
        with PeakMemory(self.policy.device) as memory, summing_gradients(self.logprobs, now=False):
            self._forward(probe)[0].backward()
        self.optimizer.zero_grad(set_to_none=True)
        config = self.policy.config
        least = config.hidden_size * config.num_hidden_layers * shards[0].element_size()
        per_token = max((memory.peak - gradients) / computed, least)
        room = available_bytes(self.policy.device) * AUTO_MEMORY_FRACTION - gradients - moments
        return max(int(room / per_token), max(lengths))

    def _tensors(self, chunk: dict[str, list], shape: torch.Size) -> dict[str, torch.Tensor]:
        device = self.policy.device
        sampler = torch.zeros(shape, device=device)
        for i, row in enumerate(chunk["sampler_logprobs"]):
            sampler[i, : len(row)] = torch.tensor(row, device=device)
        return {
            "advantage": torch.tensor(chunk["advantage"], device=device, dtype=torch.float32),
            "sampler_logprobs": sampler,
        }


def _synchronize(device: torch.device) -> None:
    """So that the forward/backward split of the timers is real on asynchronous devices."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
