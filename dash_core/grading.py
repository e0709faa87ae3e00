"""Grading completions of any problem kind: exact answers, math answers, or code run against tests."""

from __future__ import annotations

import re

from dash_core.data.problem import Problem
from dash_core.rewards.code import run_many
from dash_core.rewards.math import math_reward

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced code block, or the whole completion when it has none."""
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def grade(problems: list[Problem], completions: list[str], code_timeout_s: float = 10.0) -> list[float]:
    """One reward in [0, 1] per completion; code runs in the sandbox, in parallel."""
    rewards = [0.0] * len(problems)
    code = []
    for i, (problem, text) in enumerate(zip(problems, completions, strict=True)):
        if problem.kind == "exact":
            rewards[i] = float(text.strip() == problem.answer)
        elif problem.kind == "math":
            rewards[i] = math_reward(text, problem.answer)
        elif problem.kind == "code":
            code.append(i)
        else:
            raise ValueError(f"problem {problem.id} has unknown kind {problem.kind!r}")
    results = run_many([(extract_code(completions[i]), problems[i].tests) for i in code], timeout_s=code_timeout_s)
    for i, result in zip(code, results):
        rewards[i] = float(result.passed)
    return rewards
