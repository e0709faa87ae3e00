"""The data that flows from a problem source into sampling, grading and supervised warm-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the text the policy sees
    answer: str | None = None  # reference answer (math, arithmetic)
    tests: str | None = None  # test code (code tasks)
    solution: str | None = None  # a human-written solution, the target of supervised warm-up
    kind: str = "exact"  # how completions are graded: "exact" (string match), "math" (answer), "code" (tests)
    metadata: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """A source of training problems: batch `index` of a named stream, the same for the same seed."""

    name: str

    def train_problems(self, index: int, count: int, stream: str = "rl") -> list[Problem]: ...
