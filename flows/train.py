"""The `dash-train` flow: warm-up, then blocks of iterations (each sample -> reward + filter -> learn -> sync ->
checkpoint, see `TrainingRun.step`) with an evaluation after each block. Every phase is timed; all metrics go to
MLflow.
"""

from __future__ import annotations

import logging

from prefect import flow

from dash_core.config import DashConfig
from dash_core.run import TrainingRun
from dash_core.timing import steady_heap
from flows.progress import TrainingProgress
from tasks.training import evaluate, launch_servers, stop_servers, sync_weights, train_iterations, warm_up

log = logging.getLogger(__name__)


@flow(name="dash-train")
def dash_train(config: DashConfig = DashConfig(), resume: str | None = None) -> str:
    """Train a policy with DASH; returns the MLflow run id (pass it to `--resume` to continue)."""
    run = TrainingRun.resume(config, resume) if resume else TrainingRun.start(config)
    progress = TrainingProgress(config.iterations, run.iteration)
    progress.console.print(f"run {run.run_id}: rollouts and checkpoints in {run.store.url}")
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
                    done = train_iterations(run, run.iteration + 1, next_eval, progress.iteration)
                    scores = evaluate(run, done)
                    run.log(scores, done)
                    progress.evaluation(done, scores)
            run.save()
        except BaseException:
            _save_what_is_learned(run)
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


def _save_what_is_learned(run: TrainingRun) -> None:
    """After a failure, keep every complete update, so `--resume` loses at most the interrupted iteration."""
    if run.updating:  # part of an iteration's optimizer steps is in the weights; resume from the last checkpoint
        try:
            run.checkpointer.wait()
        except Exception:
            log.exception("the checkpoint being written when the run failed is lost")
        log.warning("the failure came mid-update: resume starts after iteration %d, the last checkpoint", run.checkpointed)
        return
    try:
        run.save()
    except Exception:
        log.exception("could not save a checkpoint after the failure; resume starts after iteration %d", run.checkpointed)
    try:
        if run.iteration and run.iteration not in run.logged:  # the last complete update's sync or logging failed
            run.log(run.metrics, run.iteration)
    except Exception:
        log.exception("could not log the metrics of iteration %d after the failure", run.iteration)
