"""The transformers `generate` backend: always available, samples the preemptive batch in as few calls as fit."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from dash_core.samplers.base import Generation, SamplingParams


class SampledLogprobs(LogitsProcessor):
    """Log-probabilities of the sampled tokens under the raw (temperature-1, untruncated) distribution, one step at a
    time: `output_logits` would keep every step's full-vocabulary logits (batch x steps x vocab floats, many GiB for
    a real vocabulary). Custom processors run before generate's temperature/top-k/top-p warpers, so `scores` are raw.
    Each call sees the token the previous step sampled; `finish` adds the last one."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.values.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = scores.float().log_softmax(-1)
        return scores

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token log-probabilities of `tokens` (batch x steps), the completions generate returned."""
        if self.previous is not None:
            self.values.append(self.previous.gather(-1, tokens[:, -1:]).squeeze(-1))
        return torch.stack(self.values, dim=1) if self.values else tokens.new_zeros(tokens.shape, dtype=torch.float32)


class TransformersSampler:
    """Samples from the policy object itself, so weights are current after every optimizer step at no cost."""

    def __init__(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int | None = None):
        self.policy = policy
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def load_weights(self, policy: PreTrainedModel) -> None:
        self.policy = policy

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        expanded = [prompt for prompt in prompts for _ in range(params.n)]
        size = self.batch_size or len(expanded)
        was_training = self.policy.training
        self.policy.eval()
        try:
            return [g for start in range(0, len(expanded), size) for g in self._generate(expanded[start : start + size], params)]
        finally:
            self.policy.train(was_training)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        device = self.policy.device
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        recorder = SampledLogprobs()
        sequences = self.policy.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(params),
            logits_processor=[recorder],
            tokenizer=self.tokenizer if params.stop else None,
        )
        tokens = sequences[:, width:]
        logprobs = recorder.finish(tokens)
        generations = []
        for row, row_logprobs in zip(tokens.tolist(), logprobs.tolist()):
            end = row.index(eos) + 1 if eos in row else len(row)
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
            stopped = eos in row or any(stop in text for stop in params.stop)
            if stopped and eos not in row:
                while end and row[end - 1] == pad:  # generate pads a row once a stop string ends it
                    end -= 1
            generations.append(Generation(row[:end], row_logprobs[:end], text, "stop" if stopped else "length"))
        return generations

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # Every field that shapes the distribution is set, so a model's own generation defaults
        # (repetition penalties, top-k) never make sampling drift from the policy the learner sees.
        greedy = params.temperature == 0
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else params.top_k,
            repetition_penalty=1.0,
            stop_strings=list(params.stop) or None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
