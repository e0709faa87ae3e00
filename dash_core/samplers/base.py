"""The sampler interface every backend implements, and the data it takes and returns."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedModel

from dash_core.config import SamplerConfig


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 8
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    stop: tuple[str, ...] = ()  # stop strings, beside the end-of-sequence token

    @classmethod
    def from_config(
        cls, cfg: SamplerConfig, n: int, temperature: float | None = None, max_new_tokens: int | None = None
    ) -> SamplingParams:
        """`n` completions per prompt, shaped as `cfg` says; an evaluation sets its own temperature and length
        (None keeps the config's)."""
        return cls(
            n=n,
            max_new_tokens=cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=cfg.temperature if temperature is None else temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop=tuple(cfg.stop),
        )


def prompt_seed(seed: int, batch: str, index: int) -> int:
    """The seed of prompt `index` of a batch (`batch` names it, e.g. 'rl:12' for iteration 12): its completions'
    randomness comes from this alone, so a batch is the same however its prompts are split across processes."""
    digest = hashlib.blake2b(f"{seed}:{batch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid torch, vLLM and OpenAI API seed


@dataclass
class Generation:
    """One completion. `logprobs[i]` is the sampler's log-probability of `token_ids[i]` at temperature 1."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]


class Sampler(ABC):
    """What callers may use on any backend. The defaults are an in-process backend's (transformers, vLLM engine):
    it samples on no inference server, so it has none to add, list or drop; the remote backend overrides them."""

    servers: list[str] | None = None  # the live inference servers sampled on; None: sampling runs in this process
    events: Sequence[dict[str, Any]] = ()  # what the run should log about the sampler, e.g. a dropped server

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        """`params.n` completions per prompt, prompt-major: completion j of prompt i is at i * n + j. `seeds`, one
        per prompt, make each prompt's completions a function of its seed, whatever else the batch holds."""

    synced_bytes: int = 0  # what the last `load_weights` moved to the sampler (0: it samples from the policy itself)

    @abstractmethod
    def load_weights(self, policy: PreTrainedModel, adapter_only: bool = False) -> None:
        """Make the next `generate` sample from `policy`'s current weights; `adapter_only`: only its LoRA adapter
        changed since the last call, so only the adapter need move."""

    def add_servers(self, urls: list[str]) -> None:
        """Sample on these inference servers too (say, servers launched once the sampler exists)."""
        raise TypeError(
            f"{type(self).__name__} samples in this process and takes no inference servers: "
            "servers need sampler.backend=remote"
        )
