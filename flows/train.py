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
    progress = TrainingProgress(config.iterations, run.iteration, run.task.name)
    progress.console.print(f"run {run.run_id}: rollouts and checkpoints in {run.store.url}")
    servers = []
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
                metrics: dict[str, float] = {}
                with timed(metrics, "time/iteration_s"):
                    with timed(metrics, "time/sample_s"):
                        rollouts = sample(run, iteration)
                    with timed(metrics, "time/reward_s"):
                        manifest, scores = reward_and_filter(run, rollouts)
                    with timed(metrics, "time/learn_s"):
                        learned = learn(run, manifest)
                    with timed(metrics, "time/sync_s"):
                        sync_weights(run)
                run.train_seconds += metrics["time/iteration_s"]
                metrics |= scores | learned | {"time/train_s": run.train_seconds}
                progress.iteration(iteration, metrics)
                last = iteration == config.iterations or run.budget_spent()
                if iteration % config.eval.every == 0 or last:
                    scores = evaluate(run, iteration)
                    metrics |= scores
                    progress.evaluation(iteration, scores)
                run.log(metrics, iteration)
                if iteration % config.checkpoint.every == 0 or last:
                    checkpoint(run)
                if last:
                    break
    except BaseException as exc:
        # Keep what the weights already hold, so `--resume` loses at most the interrupted iteration.
        if run.iteration > run.checkpointed:
            try:
                run.checkpoint()
            except Exception:
                log.exception("could not save a checkpoint after the failure; resume starts from iteration %d", run.checkpointed)
        run.tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
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
