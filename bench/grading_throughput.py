"""Reward throughput: the math grader on MATH-500 answers and the code sandbox on MBPP+ programs, each graded as a
training batch is (`dash_core.rewards.grading.grade`).

    dashrl bench grading_throughput [--rounds 3]

The answers and programs come from the project's test excerpts (tests/data: 20 MATH-500 problems, 20 MBPP+
tasks), which every checkout has, so figures compare across machines and nights. Math: each problem's reference
solution (right) and the next problem's (wrong; most of these reach math-verify's symbolic check, the grader's
costly step). Code: each task's reference program (right) and the next task's program under this task's function
name (wrong), against this task's MBPP+ tests, in parallel sandboxes; a judge that passes everything scores 0.5
as expected. One untimed round
first (it starts the grader's worker processes), then --rounds timed ones. Printed: items per second, and the
fraction graded as expected (a broken grader is fast, so speed alone says little). Then a hostile batch: 512
pathological math answers (repeated pieces, nesting, lengths up to and past the 1,000-character cap) graded with the
training default's batch deadline (10 s), which it must keep to within a second.
"""

from __future__ import annotations

import argparse
import re
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
    """Problems, completions and the rewards they should get: every problem with its own solution, and with the
    next problem's (math: right only where both answers are the same; code: wrong, under this one's name)."""
    name, file = SETS[kind]
    problems = load_problems(name, path=str(DATA / file), split="all" if kind == "code" else None)
    pairs = [(p, p.solution, 1.0) for p in problems]
    shifted = problems[1:] + problems[:1]
    if kind == "math":
        pairs += [(p, q.solution, float(p.answer == q.answer)) for p, q in zip(problems, shifted)]
    else:
        pairs += [(p, _posing_as(q, p), 0.0) for p, q in zip(problems, shifted)]
    return [p for p, _, _ in pairs], [c for _, c, _ in pairs], [r for _, _, r in pairs]


def _posing_as(program_of: Problem, task: Problem) -> str:
    """`program_of`'s reference program, with `task`'s function name bound to its function."""
    own, theirs = (re.search(r"assertion\((\w+)\(\*inp\)", p.tests).group(1) for p in (program_of, task))
    return program_of.solution.removesuffix("```") + f"{theirs} = {own}\n```"


# Pieces a policy repeats on its own or on purpose, answers up to the grader's 1,000-character cap and past it.
HOSTILE_PIECES = ["x\\cdot", "\\alpha", "\\frac{1}{", "{", "(", "1 ", "1,", " 000", "\\sqrt{", "^{2}", "a=", "\\text{ a"]
HOSTILE_ENDS = ["", "b", "=", " = 3", "\\in 3", "}"]
HOSTILE_LENGTHS = [40, 80, 200, 1000, 1001, 4000]


def hostile_batch(size: int = 512) -> tuple[list[Problem], list[str]]:
    """`size` pathological answers (repetitions, nesting, pathological lengths) against MATH-500 references."""
    name, file = SETS["math"]
    problems = load_problems(name, path=str(DATA / file))
    answers = [
        piece * (length // len(piece)) + end
        for piece in HOSTILE_PIECES for end in HOSTILE_ENDS for length in HOSTILE_LENGTHS
    ]  # fmt: skip
    answers = [answers[i % len(answers)] for i in range(size)]
    return [problems[i % len(problems)] for i in range(size)], [f"\\boxed{{{a}}}" for a in answers]


def hostile(deadline_s: float = 10.0) -> tuple[float, int]:
    """Seconds to grade the hostile batch of 512 with a batch deadline of `deadline_s` (the training default), and
    how many of its answers the deadline cut off."""
    problems, completions = hostile_batch()
    grade(problems[:2], completions[:2])  # the grader's worker processes start
    start = time.perf_counter()
    grades = grade(problems, completions, math_deadline_s=deadline_s)
    return time.perf_counter() - start, grades.cut_off


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
    seconds, cut_off = hostile()
    print(f"hostile math batch: 512 pathological answers graded in {seconds:.2f} s (batch deadline 10 s; "
          f"{cut_off} cut off by it)")


if __name__ == "__main__":
    main()
