"""The `dash-train` flow: warm-up, then blocks of iterations with an evaluation after each block. One iteration is
`dash_step` below: sample -> grade -> advantages + gradient filter -> write the batch -> learn -> sync, each phase
timed; `TrainingRun.train` runs it with the bookkeeping around it (budgets, checkpoints, logging to MLflow).

Both UIs tell what a run did: the Prefect flow run holds its lines (evaluations, warnings, resume hints), the
summary as a Markdown artifact and a persisted result (MLflow run id, final metrics); the MLflow run is named and
tagged with the flow run, its deployment and the code's commit.
"""

from __future__ import annotations

import logging
from typing import TypedDict

from prefect import flow
from prefect.runtime import deployment, flow_run
from prefect.utilities.urls import url_for

from dash_core.config import DashConfig
from dash_core.run import TrainingRun
from dash_core.timing import steady_heap
from flows.progress import TrainingProgress, mlflow_link, run_logs
from tasks.training import evaluate, launch_servers, stop_servers, sync_weights, train_iterations, warm_up

ENTRYPOINT = "flows/train.py:dash_train"  # as prefect.yaml names it; MLflow shows it as the run's source


def dash_step(run: TrainingRun, iteration: int) -> None:
    """One DASH iteration, each phase timed as time/<phase>_s (then `TrainingRun.train` checkpoints and logs)."""
    with run.phase("sample"):
        rollouts = run.sample(iteration)  # the preemptive batch: M prompts x G completions in one go
    with run.phase("reward"):
        with run.phase("grade"):
            grades = run.grade(rollouts)  # 1 for a right answer or passing program, else 0
        with run.phase("advantages"):
            batch = run.advantages(rollouts, grades)  # group-normalised; the gradient filter keeps |A| >= tau
        with run.phase("write"):
            manifest = run.write(batch)  # the rollout store, kept rows first: the run's write-ahead log
    with run.phase("learn"):
        run.learn(manifest)  # the learner reads the kept rows in its micro-batches: the rule's optimizer steps
    with run.phase("sync"):
        run.sync()  # the samplers take the new weights


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
    progress = TrainingProgress(config.iterations, run.iteration, evals=[earlier] if earlier else [])
    progress.say(f"run {run.run_id}: rollouts and checkpoints in {run.store.url}")
    servers = []
    with run.tracker.failing():
        try:
            if config.sampler.backend == "remote" and config.sampler.remote.launch:
                servers = launch_servers(run)
            sync_weights(run)  # samplers holding their own weights (servers given by URL, a resumed run) catch up
            if config.warmup.steps and not run.warm:
                run.log(warm_up(run), 0)
            if run.evaluation_due():  # the start, or an evaluation a crash interrupted
                scores = evaluate(run, run.iteration)
                run.log(scores, run.iteration)
                progress.evaluation(run.iteration, scores)
            with progress, steady_heap():
                while run.iteration < config.iterations and not run.budget_spent():
                    next_eval = min((run.iteration // config.eval.every + 1) * config.eval.every, config.iterations)
                    done = train_iterations(run, run.iteration + 1, next_eval, dash_step, progress.iteration)
                    scores = evaluate(run, done)
                    run.log(scores, done)
                    progress.evaluation(done, scores)
            run.save()
        except BaseException:
            run.save_what_is_learned()
            stop = f"stopped at iteration {run.iteration}: resume with  dashrl train --resume {run.run_id}"
            progress.say(stop, "red", logging.WARNING)
            raise
        finally:
            if servers:
                stop_servers(servers)
            if run.sampler.events:
                run.tracker.log_jsonl(list(run.sampler.events), "sampler_events.jsonl")
    run.tracker.finish()
    link = mlflow_link(config.tracking.uri, run.tracker.experiment_id, run.run_id)
    progress.summary(run.run_id, run.samples_total, link)
    metrics = run.metrics | (progress.evals[-1][1] if progress.evals else {})
    return TrainResult(run_id=run.run_id, iteration=run.iteration, samples=run.samples_total, metrics=metrics)


def source_tags() -> dict[str, str]:
    """Where the MLflow run comes from: this flow, its Prefect run (and the run's page, when the API has a UI) and
    the deployment that started it."""
    tags = {"mlflow.source.name": ENTRYPOINT, "prefect.flow_run_id": flow_run.id}
    if url := url_for("flow-run", obj_id=flow_run.id):
        tags["prefect.flow_run_url"] = url
    if deployment.name:
        tags["prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    return tags
