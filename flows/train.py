"""The `dash-train` flow: warm-up, then per iteration sample -> reward+filter -> learn -> sync, with periodic
evaluation and checkpoints. Every phase is a Prefect task and every phase is timed; all metrics go to MLflow.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from prefect import flow

from dash_core.config import DashConfig
from dash_core.run import TrainingRun
from flows.progress import TrainingProgress
from tasks.training import (
    checkpoint,
    evaluate,
    launch_servers,
    learn,
    reward_and_filter,
    sample,
    stop_servers,
    sync_weights,
    warm_up,
)

log = logging.getLogger(__name__)


@contextmanager
def timed(metrics: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    metrics[name] = time.perf_counter() - start


@flow(name="dash-train")
def dash_train(config: DashConfig = DashConfig(), resume: str | None = None) -> str:
    """Train a policy with DASH; returns the MLflow run id (pass it to `--resume` to continue)."""
    run = TrainingRun.resume(config, resume) if resume else TrainingRun.start(config)
    progress = TrainingProgress(config.iterations, run.iteration)
    progress.console.print(f"run {run.run_id}: rollouts and checkpoints in {run.store.url}")
    servers = []
    iteration, metrics = run.iteration, {}  # the current iteration and its metrics, until they are logged
    with run.tracker.failing():
        try:
            if config.sampler.backend == "remote" and config.sampler.remote.launch:
                servers = launch_servers(run)
            sync_weights(run)  # samplers holding their own weights (servers given by URL, a resumed run) catch up
            if run.iteration == 0:
                if config.warmup.steps:
                    run.log(warm_up(run), 0)
                scores = evaluate(run, 0)
                run.log(scores, 0)
                progress.evaluation(0, scores)
            with progress:
                for iteration in range(run.iteration + 1, config.iterations + 1):
                    if run.budget_spent():  # a resumed run that had already stopped on its budget
                        break
                    start = time.perf_counter()
                    with timed(metrics, "time/sample_s"):
                        rollouts = sample(run, iteration)
                    with timed(metrics, "time/reward_s"):
                        manifest, scores = reward_and_filter(run, rollouts)
                    metrics |= scores
                    with timed(metrics, "time/learn_s"):
                        metrics |= learn(run, manifest)
                    with timed(metrics, "time/sync_s"):
                        sync_weights(run)
                    metrics["time/iteration_s"] = time.perf_counter() - start
                    run.train_seconds += metrics["time/iteration_s"]
                    metrics["time/train_s"] = run.train_seconds
                    run.log(metrics, iteration)
                    progress.iteration(iteration, metrics)
                    metrics = {}
                    last = iteration == config.iterations or run.budget_spent()
                    if iteration % config.eval.every == 0 or last:
                        scores = evaluate(run, iteration)
                        run.log(scores, iteration)
                        progress.evaluation(iteration, scores)
                    if iteration % config.checkpoint.every == 0 or last:
                        checkpoint(run)
                    if last:
                        break
        except BaseException:
            _save_what_is_learned(run, metrics if run.iteration == iteration else {})
            progress.console.print(f"[red]stopped at iteration {run.iteration}[/]: resume with  dashrl train --resume {run.run_id}")
            raise
        finally:
            if servers:
                stop_servers(servers)
            if getattr(run.sampler, "events", None):
                run.tracker.log_jsonl(run.sampler.events, "sampler_events.jsonl")
    run.tracker.finish()
    progress.summary(run.run_id, run.samples_total)
    return run.run_id


def _save_what_is_learned(run: TrainingRun, unlogged: dict[str, float]) -> None:
    """After a failure, keep every complete update, so `--resume` loses at most the interrupted iteration.

    `unlogged`: metrics of the last complete update, when its sync or logging did not finish."""
    if run.updating:  # part of an iteration's optimizer steps is in the weights; resume from the last checkpoint
        log.warning("the failure came mid-update: resume starts after iteration %d, the last checkpoint", run.checkpointed)
        return
    try:
        if run.iteration > run.checkpointed:
            run.checkpoint()
    except Exception:
        log.exception("could not save a checkpoint after the failure; resume starts after iteration %d", run.checkpointed)
    try:
        if unlogged:
            run.log(unlogged, run.iteration)
    except Exception:
        log.exception("could not log the metrics of iteration %d after the failure", run.iteration)
