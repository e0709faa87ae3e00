"""The sampler protocol and the data it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from transformers import PreTrainedModel


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 8
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    stop: tuple[str, ...] = ()  # stop strings, beside the end-of-sequence token


@dataclass
class Generation:
    """One completion. `logprobs[i]` is the sampler's log-probability of `token_ids[i]` at temperature 1."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]


class Sampler(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """`params.n` completions per prompt, prompt-major: completion j of prompt i is at i * n + j."""
        ...

    def load_weights(self, policy: PreTrainedModel) -> None:
        """Make the next `generate` sample from `policy`'s current weights."""
        ...
