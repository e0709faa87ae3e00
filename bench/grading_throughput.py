"""Reward throughput: the math grader on MATH-500 answers and the code sandbox on MBPP+ programs, each graded as a
training batch is (`dash_core.rewards.grading.grade`).

    dashrl bench grading_throughput [--rounds 3]

The answers and programs come from the project's test excerpts (tests/data: 20 MATH-500 problems, 20 MBPP+
tasks), which every checkout has, so figures compare across machines and nights. Math: each problem's reference
solution (right) and the next problem's (wrong; most of these reach math-verify's symbolic check, the grader's
costly step). Code: each task's reference program against its MBPP+ tests, in parallel sandboxes. One untimed round
first (it starts the grader's worker processes), then --rounds timed ones. Printed: items per second, and the
fraction graded as expected (a broken grader is fast, so speed alone says little).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from dash_core.data.datasets import load_problems
from dash_core.data.problem import Problem
from dash_core.rewards.grading import grade

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
SETS = {"math": ("math500", "math500_test.jsonl"), "code": ("mbppplus", "mbppplus_originfmt.jsonl.gz")}


@dataclass(frozen=True)
class Throughput:
    items: int
    seconds: float
    as_expected: float  # fraction of rewards equal to the expected ones

    @property
    def per_s(self) -> float:
        return self.items / self.seconds


def batch(kind: str) -> tuple[list[Problem], list[str], list[float]]:
    """Problems, completions and the rewards they should get: every problem with its own solution, and for math
    also with the next problem's (right only where both answers are the same)."""
    name, file = SETS[kind]
    problems = load_problems(name, path=str(DATA / file), split="all" if kind == "code" else None)
    pairs = [(p, p.solution, 1.0) for p in problems]
    if kind == "math":
        shifted = problems[1:] + problems[:1]
        pairs += [(p, q.solution, float(p.answer == q.answer)) for p, q in zip(problems, shifted)]
    return [p for p, _, _ in pairs], [c for _, c, _ in pairs], [r for _, _, r in pairs]


def throughput(kind: str, rounds: int) -> Throughput:
    """Grade `kind`'s batch once untimed, then `rounds` times timed."""
    problems, completions, expected = batch(kind)
    grade(problems, completions)
    start = time.perf_counter()
    agree = 0
    for _ in range(rounds):
        rewards = grade(problems, completions).rewards
        agree += sum(r == e for r, e in zip(rewards, expected))
    seconds = time.perf_counter() - start
    return Throughput(rounds * len(problems), seconds, agree / (rounds * len(problems)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"grading throughput, {args.rounds} timed rounds")
    for column in ["reward", "items", "seconds", "items/s", "as expected"]:
        table.add_column(column, justify="left" if column == "reward" else "right")
    for kind, label in [("math", "math grader (MATH-500 answers)"), ("code", "code sandbox (MBPP+ programs)")]:
        result = throughput(kind, args.rounds)
        table.add_row(
            label, str(result.items), f"{result.seconds:.2f}", f"{result.per_s:.1f}", f"{result.as_expected:.3f}"
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
