"""Grading completions of any problem kind: exact answers, math answers, or code run against tests."""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dash_core.data.problem import Problem
from dash_core.rewards.code import run_many
from dash_core.rewards.math import math_verdict

log = logging.getLogger(__name__)

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
# A batch's symbolic checks all get these time limits first, one try at a time, before `math_timeout_s`: an ordinary
# check takes under 0.1 s, so a few pathological answers cannot spend the deadline the ordinary ones behind them need.
_MATH_TRIES_S = (0.25, 1.0)


@dataclass(frozen=True)
class Grades:
    """One reward in [0, 1] per completion, and how many math answers were cut off (scored 0) by the per-answer
    limit or the batch deadline: a training loop logs it, as a rise means the policy drifts to pathological answers."""

    rewards: list[float]
    cut_off: int


def extract_code(completion: str) -> str:
    """The last fenced code block, or the whole completion when it has none."""
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def grade(
    problems: list[Problem],
    completions: list[str],
    code_timeout_s: float = 10.0,
    math_timeout_s: float = 5.0,
    math_deadline_s: float = 10.0,
) -> Grades:
    """One reward per completion. Code runs in parallel sandboxes; math answers are checked in parallel, each symbolic
    check within `math_timeout_s` and all of them within `math_deadline_s`, so that a batch of pathological answers
    costs seconds, not minutes (answers settled without a symbolic check are graded whatever the time). A failure of
    the code grader's own raises GraderError: the batch gets no rewards rather than wrong ones."""
    rewards = [0.0] * len(problems)
    math, code = [], []
    for i, (problem, text) in enumerate(zip(problems, completions, strict=True)):
        if problem.kind == "exact":
            rewards[i] = float(text.strip() == problem.answer)
        elif problem.kind == "math":
            math.append(i)
        elif problem.kind == "code":
            code.append(i)
        else:
            raise ValueError(f"problem {problem.id} has unknown kind {problem.kind!r}")
    cut_off = 0
    if math:
        deadline = time.monotonic() + math_deadline_s
        jobs = [(completions[i], problems[i].answer, problems[i].metadata.get("question", problems[i].prompt)) for i in math]
        verdicts = _math_verdicts(jobs, math_timeout_s, deadline)
        for i, verdict in zip(math, verdicts):
            rewards[i] = 0.0 if verdict is None else verdict
        cut_off = verdicts.count(None)
        if cut_off:
            log.warning("math grading: %d of %d answers cut off and scored 0", cut_off, len(math))
    if code:
        start = time.perf_counter()
        results = run_many([(extract_code(completions[i]), problems[i].tests) for i in code], timeout_s=code_timeout_s)
        seconds = time.perf_counter() - start
        log.info("code sandbox: %d programs in %.1f s (%.1f programs/s)", len(code), seconds, len(code) / seconds)
        for i, result in zip(code, results):
            rewards[i] = float(result.passed)
    return Grades(rewards, cut_off)


def _math_verdicts(jobs: list[tuple[str, str, str]], timeout_s: float, deadline: float) -> list[float | None]:
    """math_verdict of each (completion, reference, question), None where cut off. The symbolic checks run in
    math_verdict's worker processes; threads keep all of them busy."""
    verdicts: list[float | None] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for limit in [*(t for t in _MATH_TRIES_S if t < timeout_s), timeout_s]:
            checked = pool.map(lambda i: math_verdict(jobs[i][0], jobs[i][1], limit, deadline, question=jobs[i][2]), pending)
            for i, verdict in zip(pending, checked):
                verdicts[i] = verdict
            pending = [i for i in pending if verdicts[i] is None]
    return verdicts
