"""The Prefect tasks of a training run.

The rule for what is a task (measured with `dashrl bench orchestration`): only work that takes seconds. A task
costs a few ms in this process, and the server's recording of its state changes competes with torch for the cores:
one task per sub-second iteration made the embedded default's iterations 3-8% slower on two cores. So the
iterations between two evaluations are one `iterations` task (each iteration's phases timed inside it and logged
as `time/<phase>_s`), beside warm-up, evaluation and server launch. No task carries tags: for a tagged task Prefect
asks the server for a concurrency slot before every run, even when no limit exists, and a busy sqlite server
answers with retries seconds long. Inputs are the run held in memory and small values, never collections Prefect
would walk, and no result is persisted or cached.
"""

from __future__ import annotations

from collections.abc import Callable

from dash_core.run import Step, TrainingRun
from dash_core.serving import VLLMServer
from tasks import phase


@phase("launch-vllm-servers")
def launch_servers(run: TrainingRun) -> list[VLLMServer]:
    return run.launch_servers()


@phase("stop-vllm-servers")
def stop_servers(servers: list[VLLMServer]) -> None:
    for server in servers:
        server.stop()


@phase("warm-up")
def warm_up(run: TrainingRun) -> dict[str, float]:
    return run.warm_up()


@phase("sync-weights")
def sync_weights(run: TrainingRun) -> None:
    run.sync()


@phase("iterations", task_run_name="iterations-{first}-{last}")
def train_iterations(run: TrainingRun, first: int, last: int, step: Step, on_iteration: Callable[[int, dict[str, float]], None]) -> int:
    """Iterations `first`..`last` (fewer when a budget runs out), each one `step`; returns the last one done."""
    run.train(last, step, on_iteration)
    return run.iteration


@phase("evaluate", task_run_name="evaluate-{iteration}")
def evaluate(run: TrainingRun, iteration: int) -> dict[str, float]:
    return run.evaluate(iteration)
