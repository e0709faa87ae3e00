"""Problem sources: one shape (`Problem`) for every task; the training task and evaluation sets a config names."""

from __future__ import annotations

import random
from functools import lru_cache

from dash_core.config import DashConfig, DatasetConfig, TaskConfig
from dash_core.data.arithmetic import ArithmeticTask
from dash_core.data.datasets import load_problems
from dash_core.data.problem import Problem, Task

__all__ = ["Problem", "Task", "build_task", "eval_sets"]


class DatasetTask:
    """Training problems from a fixed set, in a fresh seeded order each epoch of each stream."""

    def __init__(self, cfg: DatasetConfig, seed: int):
        self.name = cfg.name
        self.seed = seed
        self.problems = load_problems(cfg.name, cfg.path, cfg.split or "train", cfg.size, seed, cfg.prompt_template, cfg.prompt_tests)

    def train_problems(self, index: int, count: int, stream: str = "rl") -> list[Problem]:
        n = len(self.problems)
        return [self.problems[self._order(stream, pos // n)[pos % n]] for pos in range(index * count, (index + 1) * count)]

    @lru_cache(maxsize=4)
    def _order(self, stream: str, epoch: int) -> list[int]:
        return random.Random(f"{self.seed}:{stream}:{epoch}").sample(range(len(self.problems)), len(self.problems))


def build_task(cfg: TaskConfig, seed: int) -> Task:
    return ArithmeticTask(cfg, seed) if cfg.name == "arithmetic" else DatasetTask(cfg, seed)


def eval_sets(config: DashConfig, task: Task | None) -> dict[str, list[Problem]]:
    """Held-out sets by name: the task's own (generated tasks) and every set in eval.datasets.

    The training set named again without a split is evaluated on its test split, never on what it trains on."""
    sets = {task.name: task.heldout_problems(config.eval.size)} if isinstance(task, ArithmeticTask) else {}
    for d in config.eval.datasets:
        split = d.split or ("test" if task is not None and d.name == task.name else None)
        sets[d.name] = load_problems(d.name, d.path, split, d.size, config.seed, d.prompt_template, d.prompt_tests)
    return sets
