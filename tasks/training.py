"""The Prefect task of a training run: one part of the library's loop (`dash_core.loop`).

The rule for what is a task (measured with `dashrl bench orchestration`): only work that takes seconds. A task
costs a few ms in this process, and the server's recording of its state changes competes with torch for the cores:
one task per sub-second iteration made the embedded default's iterations 3-8% slower on two cores. So the loop's
parts are the tasks: the iterations between two evaluations (each iteration's phases timed inside it and logged as
`time/<phase>_s`), evaluations, warm-up, server launch. No task carries tags: for a tagged task Prefect asks the
server for a concurrency slot before every run, even when no limit exists, and a busy sqlite server answers with
retries seconds long. Inputs are a name and the work held in memory, never collections Prefect would walk, and no
result is persisted or cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tasks import phase

R = TypeVar("R")


@phase("dash-train-part", task_run_name="{name}")
def loop_part(name: str, work: Callable[[], R]) -> R:
    """One part of the training loop, as a task run named for it (e.g. `iterations-26-50`, `evaluate-50`)."""
    return work()
