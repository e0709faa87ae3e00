"""Synthetic addition and subtraction, generated from a seed, with an exact checker.

Numbers are zero-padded to a fixed width (operands `digits`, answer `digits + 1`) and written least-significant
digit first by default: every digit then sits at a fixed position and the answer comes out in the order its digits
are computed, which is what lets a tiny model learn the task in seconds (normal order stays near 0%).
Held-out problems are chosen by a hash of the problem, so the two splits are disjoint for every seed. Completions
are graded by exact match with the answer (kind "exact").
"""

from __future__ import annotations

import random
import zlib

from dash_core.config import ArithmeticTaskConfig
from dash_core.data.problem import Problem


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, cfg: ArithmeticTaskConfig, seed: int):
        self.cfg = cfg
        self.seed = seed

    def train_problems(self, index: int, count: int, stream: str = "rl") -> list[Problem]:
        """Problems for batch `index` of a stream ('rl', 'warmup'): the same for the same seed, never held-out."""
        rng = random.Random(f"{self.seed}:{stream}:{index}")
        problems: list[Problem] = []
        for _ in range(self._attempts(count)):
            problem = self._draw(rng)
            if not self._is_heldout(problem):
                problems.append(problem)
                if len(problems) == count:
                    return problems
        raise ValueError(f"task.heldout_fraction={self.cfg.heldout_fraction} leaves almost no training problems; lower it")

    def heldout_problems(self, count: int) -> list[Problem]:
        rng = random.Random(f"{self.seed}:heldout")
        found: dict[str, Problem] = {}
        for _ in range(self._attempts(count)):
            problem = self._draw(rng)
            if self._is_heldout(problem):
                found.setdefault(problem.id, problem)
                if len(found) == count:
                    return list(found.values())
        raise ValueError(
            f"only {len(found)} distinct held-out problems found for task.digits={self.cfg.digits}, "
            f"but eval.size={count}: lower eval.size or raise task.heldout_fraction"
        )

    def _attempts(self, count: int) -> int:
        """Draws allowed before concluding that the problem space is too small (50x the expected need)."""
        return int(50 * count / min(self.cfg.heldout_fraction, 1 - self.cfg.heldout_fraction)) + 1000

    def _draw(self, rng: random.Random) -> Problem:
        limit = 10**self.cfg.digits
        a, b = rng.randrange(limit), rng.randrange(limit)
        op = rng.choice(self.cfg.ops)
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b
        width = self.cfg.digits
        answer = self._write(result, width + 1)
        return Problem(
            id=f"{a}{op}{b}",
            prompt=f"{self._write(a, width)}{op}{self._write(b, width)}=",
            answer=answer,
            solution=answer,
            metadata={"a": a, "b": b, "op": op},
        )

    def _write(self, number: int, width: int) -> str:
        text = str(number).zfill(width)
        return text[::-1] if self.cfg.reverse_digits else text

    def _is_heldout(self, problem: Problem) -> bool:
        return zlib.crc32(problem.id.encode()) % 10_000 < self.cfg.heldout_fraction * 10_000
