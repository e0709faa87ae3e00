"""Supervised traces: solutions written by people, or a stronger teacher's completions, as rows the learner takes
with the sft rule (the warm-up and the sft_h / sft_m baselines)."""

from __future__ import annotations

import tempfile

from transformers import PreTrainedTokenizerBase

from dash_core.config import DashConfig
from dash_core.samplers import Generation, Sampler, SamplingParams, policy_sampler


def solution_ids(tokenizer: PreTrainedTokenizerBase, solutions: list[str | None]) -> list[list[int]]:
    """Target tokens of each solution, ending with end-of-sequence so the policy learns to stop."""
    if any(s is None for s in solutions):
        raise ValueError("problems without a solution cannot be used for supervised training")
    return [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for s in solutions]


def as_generations(tokenizer: PreTrainedTokenizerBase, texts: list[str | None]) -> list[Generation]:
    """Traces in the policy's own tokens, shaped like samples; they have no sampler log-probabilities."""
    ids = solution_ids(tokenizer, texts)
    return [Generation(t, [0.0] * len(t), text, "stop") for t, text in zip(ids, texts)]


def trace_chunk(prompt_ids: list[list[int]], traces: list[Generation]) -> dict[str, list]:
    """Prompts and their traces as one learner micro-batch: every token a target of weight 1."""
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": [t.token_ids for t in traces],
        "advantage": [1.0] * len(traces),
        "sampler_logprobs": [t.logprobs for t in traces],
    }


class Teacher:
    """The sft teacher (algo.teacher), loaded on first use; it shares the policy's tokenizer, so its prompts are the
    policy's. Remote servers serve the policy, not the teacher, so a remote run's teacher samples in process."""

    def __init__(self, config: DashConfig):
        self.config = config
        self._sampler: Sampler | None = None

    def complete(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int] | None = None) -> list[str]:
        if self._sampler is None:
            model_cfg = self.config.model.model_copy(update={"name": self.config.algo.teacher})
            sampler_cfg = self.config.sampler
            if sampler_cfg.backend == "remote":
                sampler_cfg = sampler_cfg.model_copy(update={"backend": "transformers"})
            self._sampler = policy_sampler(model_cfg, sampler_cfg, self.config.seed, tempfile.mkdtemp()).sampler
        return [g.text for g in self._sampler.generate(prompt_ids, params, seeds)]
