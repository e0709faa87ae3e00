"""Grading completions of any problem kind: exact answers, math answers, or code run against tests."""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

from dash_core.data.problem import Problem
from dash_core.rewards.code import run_many
from dash_core.rewards.math import math_reward

log = logging.getLogger(__name__)

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced code block, or the whole completion when it has none."""
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def grade(problems: list[Problem], completions: list[str], code_timeout_s: float = 10.0) -> list[float]:
    """One reward in [0, 1] per completion; math answers are checked in parallel, code runs in parallel sandboxes."""
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
    if math:  # the symbolic checks run in math_reward's worker processes; threads keep all of them busy
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for i, reward in zip(math, pool.map(lambda i: math_reward(completions[i], problems[i].answer), math)):
                rewards[i] = reward
    if code:
        start = time.perf_counter()
        results = run_many([(extract_code(completions[i]), problems[i].tests) for i in code], timeout_s=code_timeout_s)
        seconds = time.perf_counter() - start
        log.info("code sandbox: %d programs in %.1f s (%.1f programs/s)", len(code), seconds, len(code) / seconds)
        for i, result in zip(code, results):
            rewards[i] = float(result.passed)
    return rewards
