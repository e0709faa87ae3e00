"""The `dash-train` flow: the library's training loop (`dash_core.loop`) run by the first process of a run, its
parts (warm-up, blocks of iterations, evaluations) as Prefect tasks, its progress drawn in the terminal.

Both UIs tell what a run did: the Prefect flow run holds its lines (evaluations, warnings, resume hints), the
summary as a Markdown artifact and a persisted result (MLflow run id, final metrics); the MLflow run is named and
tagged with the flow run, its deployment and the code's commit. The other processes of a run (`--learners N`,
torchrun) run the same loop without Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypedDict, TypeVar

from prefect import flow
from prefect.runtime import deployment, flow_run
from prefect.utilities.urls import url_for

from dash_core import loop
from dash_core.config import DashConfig
from dash_core.run import TrainingRun
from flows.progress import TrainingProgress, mlflow_link, run_logs
from tasks.training import loop_part

ENTRYPOINT = "flows/train.py:dash_train"  # as prefect.yaml names it; MLflow shows it as the run's source
R = TypeVar("R")


class FlowHooks(loop.Hooks):
    """The loop as the Prefect UI and the terminal show it: each part a task run, progress and evaluations drawn."""

    def __init__(self, progress: TrainingProgress):
        self.progress = progress

    def part(self, name: str, work: Callable[[], R]) -> R:
        return loop_part(name, work)

    def iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        self.progress.iteration(iteration, metrics)

    def evaluation(self, iteration: int, scores: dict[str, float]) -> None:
        self.progress.evaluation(iteration, scores)

    def say(self, line: str, warning: bool = False) -> None:
        self.progress.say(line, "red" if warning else "", logging.WARNING if warning else logging.INFO)


class TrainResult(TypedDict):
    """What a `dash-train` run returns and persists, as plain JSON: any process reads it back as a dict, where a
    class would have to be importable there under the name the worker's entrypoint loader gave it."""

    run_id: str  # the MLflow run; pass it to --resume to continue
    iteration: int  # iterations done
    samples: int  # completions sampled
    metrics: dict[str, float]  # the last iteration's metrics and the last evaluation's


@flow(name="dash-train", persist_result=True, result_serializer="json")
def dash_train(config: DashConfig = DashConfig.form_default(), resume: str | None = None) -> TrainResult:
    """Train a policy with DASH; returns the MLflow run id (pass it to `--resume` to continue) and final metrics."""
    with run_logs():
        return _train(config, resume)


def _train(config: DashConfig, resume: str | None) -> TrainResult:
    config = config.resolved()
    tags = source_tags()
    run = TrainingRun.resume(config, resume, tags) if resume else TrainingRun.start(config, tags)
    earlier = run.tracker.earliest("eval/") if resume else None  # the summary compares the run's first evaluation
    progress = TrainingProgress(config.iterations, run.state.iteration, evals=[earlier] if earlier else [])
    progress.say(f"run {run.run_id}: rollouts and checkpoints in {run.store.url}")
    with progress:
        loop.train(run, FlowHooks(progress))
    link = mlflow_link(config.tracking.uri, run.tracker.experiment_id, run.run_id)
    progress.summary(run.run_id, run.state.samples_total, link)
    metrics = run.metrics | (progress.evals[-1][1] if progress.evals else {})
    return TrainResult(run_id=run.run_id, iteration=run.state.iteration, samples=run.state.samples_total, metrics=metrics)


def source_tags() -> dict[str, str]:
    """Where the MLflow run comes from: this flow, its Prefect run (and the run's page, when the API has a UI) and
    the deployment that started it."""
    tags = {"mlflow.source.name": ENTRYPOINT, "prefect.flow_run_id": flow_run.id}
    if url := url_for("flow-run", obj_id=flow_run.id):
        tags["prefect.flow_run_url"] = url
    if deployment.name:
        tags["prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    return tags
