"""Prefect tasks: thin wrappers around dash_core phases (names, retries, tags). No algorithm lives here.

Every task is declared with `phase`, so all of them treat inputs and results alike (tasks/training.py says which
work is a task at all)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

P = ParamSpec("P")
R = TypeVar("R")


def phase(name: str, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A task whose inputs and result stay in memory: never hashed for caching, never persisted."""
    return task(name=name, cache_policy=NO_CACHE, persist_result=False, **options)
