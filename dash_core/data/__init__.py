"""Problem sources: one shape (`Problem`) for every task, and the task registry the run builds from its config."""

from __future__ import annotations

from dash_core.config import TaskConfig
from dash_core.data.arithmetic import ArithmeticTask
from dash_core.data.problem import Problem, Task

__all__ = ["Problem", "Task", "build_task"]


def build_task(cfg: TaskConfig, seed: int) -> Task:
    return ArithmeticTask(cfg, seed)
