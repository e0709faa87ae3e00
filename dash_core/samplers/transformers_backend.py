"""The transformers backend: always available, samples the preemptive batch with the policy's own forward pass.

It runs its own decode loop over a KV cache instead of `generate`, because the batch has a shape `generate` does not
exploit, and per-step overhead is most of the cost for small models:
- a group's G completions share one prompt: the prompt is prefilled once and its cache entries copied G times;
- completions end at different lengths: finished rows leave the batch (once a quarter of it has finished, so the
  cache is not copied every step), and the longest few do not carry the rest;
- only the sampled token's log-probability is kept (logit - logsumexp of the raw logits), never a step's
  full-vocabulary distribution, and the prefill computes logits at the last prompt position only.
- the KV cache is allocated once per call at its final length and written in place (`_GrowingLayer`), instead
  of transformers' DynamicCache copying all of it at every step (8-23% of a CPU call, more the longer the
  completions).

On a GPU the per-step cost is the host launching kernels, so there the loop keeps every tensor's shape fixed
instead: transformers' static KV cache (each prompt prefilled per completion), finished rows kept in the batch, the
attention mask allocated at full length, and the decode step compiled with CUDA graphs (`reduce-overhead`); the
first call of a batch shape pays the compilation.
"""

from __future__ import annotations

import copy
import threading

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache
from transformers.cache_utils import DynamicLayer

from dash_core.models import adapted
from dash_core.samplers.base import Generation, Sampler, SamplingParams


class TransformersSampler(Sampler):
    """Samples from the policy object itself, so weights are current after every optimizer step at no cost."""

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int | None = None,
        static: bool | None = None,
        private: bool = False,
    ):
        """`private`: sample from a copy of `policy`, which takes its weights at each `load_weights`, so that
        sampling (on another thread) and learning never share weights."""
        self.policy = copy.deepcopy(policy) if private else policy
        self.private = private
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # sequences per decode loop (whole groups); None: the whole batch at once
        self.static = static  # fixed shapes and a static KV cache; None: on a GPU (compiled there)
        self._compiled = None
        self._sampling = threading.Lock()  # held by a generate call: new weights wait for it to end

    def load_weights(self, policy: PreTrainedModel, adapter_only: bool = False) -> None:
        """The private copy takes `policy`'s weights (with `adapter_only`, its adapter's): the adapted policy is sampled
        as it is, never merged."""
        if not self.private:
            self.policy = policy
            return
        only_adapter = adapter_only and adapted(policy)
        self.synced_bytes = 0
        with self._sampling, torch.no_grad():
            for (name, mine), theirs in zip(self.policy.named_parameters(), policy.parameters(), strict=True):
                if not only_adapter or ".lora_" in name:
                    mine.copy_(theirs)
                    self.synced_bytes += mine.numel() * mine.element_size()

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        per_call = max(self.batch_size // params.n, 1) if self.batch_size else len(prompts)
        draws = uniform_draws(len(prompts), params, seeds)
        with self._sampling:
            was_training = self.policy.training
            self.policy.eval()
            try:
                return [
                    g
                    for start in range(0, len(prompts), per_call)
                    for g in self._decode(
                        prompts[start : start + per_call],
                        params,
                        draws[start * params.n : (start + per_call) * params.n],
                    )
                ]
            finally:
                self.policy.train(was_training)

    def _decode(self, prompts: list[list[int]], params: SamplingParams, draws: torch.Tensor) -> list[Generation]:
        """`params.n` completions of each prompt, prompt-major, from one prefill and one decode loop; completion i's
        token at step t is drawn with `draws[i, t]`."""
        device, n, steps = self.policy.device, params.n, params.max_new_tokens
        draws = draws.to(device)
        static = device.type == "cuda" if self.static is None else self.static
        pad = self.tokenizer.pad_token_id
        if static:  # each completion gets its own prefilled copy of its prompt: the cache never changes shape
            prompts, n = [p for p in prompts for _ in range(n)], 1
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: every prompt starts at position 0
        cache = (
            StaticCache(config=self.policy.config, max_cache_len=width + steps)
            if static
            else self._growing_cache(width + steps)
        )
        out = self.policy(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)  # fmt: skip
        logits = out.logits[:, -1].float().repeat_interleave(n, 0)
        if n > 1:
            cache.batch_repeat_interleave(n)
            mask = mask.repeat_interleave(n, 0)
        if static:
            mask = torch.cat([mask, mask.new_zeros(len(mask), steps)], dim=1)
        position = positions[:, -1].repeat_interleave(n, 0)
        forward = self._decode_step(device) if static else self.policy
        rows = len(logits)
        tokens = torch.full((rows, steps), pad, device=device)
        logprobs = torch.zeros(rows, steps, device=device)
        lengths = torch.full((rows,), steps, device=device)
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        active = torch.arange(rows, device=device)  # the rows in the cache's batch, in its order
        live = torch.ones(rows, dtype=torch.bool, device=device)  # which of them are still decoding
        remaining = rows
        ends = self._end_of_sequence_ids(device)
        for step in range(steps):
            token, logprob = _sample(logits, params, draws[active, step])
            tokens[active, step], logprobs[active, step] = token, logprob  # past a row's end: cut off below
            done = torch.isin(token, ends) & live
            if params.stop:
                done |= self._meets_stop_string(tokens[active, : step + 1], params.stop) & live
            finished = int(done.sum())  # the loop's one host sync per step
            if finished:
                lengths[active[done]], stopped[active[done]] = step + 1, True
                live &= ~done
                remaining -= finished
            if step == steps - 1 or not remaining:
                break
            if static:
                mask[:, width + step] = 1
            elif 4 * (len(live) - remaining) >= len(live):  # a quarter of the batch has finished: it leaves the batch
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                active, live, token, mask, position = active[keep], live[keep], token[keep], mask[keep], position[keep]
            if not static:
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            position = position + 1
            out = forward(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                          past_key_values=cache, use_cache=True)  # fmt: skip
            logits = out.logits[:, -1].float()
        generations = []
        for row, row_logprobs, length, stop in zip(
            tokens.tolist(), logprobs.tolist(), lengths.tolist(), stopped.tolist()
        ):
            text = self.tokenizer.decode(row[:length], skip_special_tokens=True)
            generations.append(Generation(row[:length], row_logprobs[:length], text, "stop" if stop else "length"))
        return generations

    def _growing_cache(self, capacity: int) -> DynamicCache:
        """A dynamic cache whose full-attention layers write into buffers of `capacity` positions (sliding-window and
        other special layers keep their own kind)."""
        cache = DynamicCache(config=self.policy.config)
        cache.layers = [_GrowingLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def _decode_step(self, device: torch.device):
        """The policy's forward for one decode step: compiled with CUDA graphs on a GPU (once per sampler)."""
        if device.type != "cuda":
            return self.policy
        if self._compiled is None or self._compiled[0] is not self.policy:
            self._compiled = (self.policy, torch.compile(self.policy.forward, mode="reduce-overhead", fullgraph=True))
        return self._compiled[1]

    def _end_of_sequence_ids(self, device: torch.device) -> torch.Tensor:
        """The tokenizer's EOS and the model's own end tokens (chat models end a turn with e.g. <|im_end|>)."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.policy.generation_config, "eos_token_id", None)
        ids |= set(configured) if isinstance(configured, list) else {configured}
        return torch.tensor(sorted(i for i in ids if i is not None), device=device)

    def _meets_stop_string(self, tokens: torch.Tensor, stops: tuple[str, ...]) -> torch.Tensor:
        """Rows whose newest token completes a stop string. Only a tail is decoded: every token adds at least one
        character (or a few bytes of one), so a window of a few tokens per stop character covers any stop string."""
        window = 4 * max(map(len, stops)) + 4
        heads = self.tokenizer.batch_decode(tokens[:, -window - 1 : -1].tolist(), skip_special_tokens=True)
        tails = self.tokenizer.batch_decode(tokens[:, -window:].tolist(), skip_special_tokens=True)
        hits = [any(s in tail and s not in head for s in stops) for head, tail in zip(heads, tails)]
        return torch.tensor(hits, device=tokens.device)


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes each step's keys and values into buffers allocated for the whole completion.
    DynamicLayer concatenates instead, copying the whole cache per layer per step: on a CPU that costs as much as
    the attention, is memory-bound (a second thread barely shortens it) and grows with every token. The buffers are
    position-major, so a step writes one contiguous slab and the attention reads the filled positions about as fast
    as a contiguous cache (a head-major buffer's views slow it by 10-40%); `keys` and `values` are those positions
    in the usual (rows, heads, positions, head dim) view."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = _position_major(key_states, self.capacity, len(key_states))
        self.value_buffer = _position_major(value_states, self.capacity, len(value_states))
        self.length = 0
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        self.key_buffer[start : self.length] = key_states.permute(2, 0, 1, 3)
        self.value_buffer[start : self.length] = value_states.permute(2, 0, 1, 3)
        return self._filled()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row `repeats` times (a prompt's cache for each of its completions), copying filled positions only."""
        for name in ("key_buffer", "value_buffer"):
            filled = getattr(self, name)[: self.length]
            buffer = _position_major(filled.permute(1, 2, 0, 3), self.capacity, filled.shape[1] * repeats)
            buffer[: self.length].unflatten(1, (-1, repeats)).copy_(filled[:, :, None])
            setattr(self, name, buffer)
        self._filled()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Only the rows at `indices` (the completions still decoding), copying filled positions only."""
        for name in ("key_buffer", "value_buffer"):
            filled = getattr(self, name)[: self.length]
            buffer = _position_major(filled.permute(1, 2, 0, 3), self.capacity, len(indices))
            torch.index_select(filled, 1, indices, out=buffer[: self.length])
            setattr(self, name, buffer)
        self._filled()

    def _filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.key_buffer[: self.length].permute(1, 2, 0, 3)
        self.values = self.value_buffer[: self.length].permute(1, 2, 0, 3)
        return self.keys, self.values


def _position_major(states: torch.Tensor, positions: int, rows: int) -> torch.Tensor:
    """An uninitialised buffer of `positions` x `rows` for states shaped (rows, heads, positions, head dim)."""
    return states.new_empty(positions, rows, *states.shape[1:-2], states.shape[-1])


def uniform_draws(prompts: int, params: SamplingParams, seeds: list[int] | None) -> torch.Tensor:
    """One uniform number per completion and step, prompt-major: from each prompt's own generator when `seeds`
    are given (so a prompt's completions never depend on the batch around it), else from torch's global one."""
    shape = (params.n, params.max_new_tokens)
    if seeds is None:
        return torch.rand(prompts * shape[0], shape[1])
    if len(seeds) != prompts:
        raise ValueError(f"{len(seeds)} seeds for {prompts} prompts: give one seed per prompt")
    return torch.cat([torch.rand(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


def _sample(logits: torch.Tensor, params: SamplingParams, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens drawn from the temperature / top-k / top-p shaped distribution by inverting its cumulative
    distribution at `draws` (one uniform number per row), and their log-probabilities under the raw one (what the
    learner recomputes)."""
    normaliser = logits.logsumexp(-1, keepdim=True)
    if params.temperature == 0:
        token = logits.argmax(-1)
    else:
        if params.temperature == 1 and not params.top_k and params.top_p >= 1:
            probs = (logits - normaliser).exp()
        else:
            probs = _shaped(logits / params.temperature, params.top_k, params.top_p).softmax(-1)
        cumulative = probs.cumsum(-1)
        # right=True: the first token whose cumulative mass exceeds the draw, so a token of probability 0 is never taken
        token = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True).squeeze(-1)
        token = token.clamp(max=logits.size(-1) - 1)
    return token, (logits.gather(-1, token[:, None]) - normaliser).squeeze(-1)


def _shaped(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < scores.size(-1):
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    if top_p < 1:
        ordered, order = scores.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # the smallest head of the distribution holding top_p is kept
        scores = scores.scatter(-1, order, ordered.masked_fill(mass_before >= top_p, -torch.inf))
    return scores
