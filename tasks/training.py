"""The phases of a training iteration as Prefect tasks.

They run in the flow's process and share the `TrainingRun` held in memory, so nothing big crosses a task
boundary: results are rollouts held in memory, batch manifests and metrics, and none is persisted or cached.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dash_core.run import Rollouts, TrainingRun
from dash_core.serving import VLLMServer
from dash_core.store import BatchManifest


def phase(name: str, **options):
    """A task whose inputs and result stay in memory: never hashed for caching, never persisted."""
    return task(name=name, cache_policy=NO_CACHE, persist_result=False, **options)


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


@phase("sample", task_run_name="sample-{iteration}", tags=["sampler"])
def sample(run: TrainingRun, iteration: int) -> Rollouts:
    return run.sample(iteration)


@phase("reward-and-filter", task_run_name="reward-and-filter-{rollouts.iteration}")
def reward_and_filter(run: TrainingRun, rollouts: Rollouts) -> tuple[BatchManifest, dict[str, float]]:
    return run.score(rollouts)


@phase("learn", task_run_name="learn-{manifest.iteration}", tags=["learner"])
def learn(run: TrainingRun, manifest: BatchManifest) -> dict[str, float]:
    return run.learn(manifest)


@phase("sync-weights")
def sync_weights(run: TrainingRun) -> None:
    run.sync()


@phase("evaluate", task_run_name="evaluate-{iteration}")
def evaluate(run: TrainingRun, iteration: int) -> dict[str, float]:
    return run.evaluate(iteration)


@phase("checkpoint")
def checkpoint(run: TrainingRun) -> str:
    return run.checkpoint()
