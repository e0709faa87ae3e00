"""The `dash-bench` flow: the nightly benchmark, which fails when a figure regresses.

Each figure is measured by the benchmark in bench/ that prints it as a table (`dashrl bench <name>`), at the sizes
of the profile (bench/_profiles.py), and goes to the night's MLflow run as soon as it is measured:
- iteration_phases: preemptive vs small-batch iteration time, and their ratio;
- learner_throughput: the learner's tokens/s;
- grading_throughput: math answers and sandboxed programs graded per second (and whether graded right);
- learning_curve: the embedded default trained as a `dash-train` subflow (its MLflow run nested under the night's):
  training time to the profile's gain in held-out accuracy, final accuracy;
- weight_sync: seconds per weight sync, full and LoRA adapter only, per installed backend (the embedded default's
  model), and the adapter's share of the bytes;
- sampling_throughput: tokens/s per installed backend (last: vLLM pins torch's threads in the process).
Then the night is judged (bench/_regression.py) against the median of earlier nights of the same profile on the
same machine and against the committed baseline: the summary (Markdown, an MLflow and a Prefect artifact) and a
trend plot (MLflow) are published, and a figure outside its band fails the flow run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from prefect import flow
from prefect.runtime import flow_run

from bench import _history, _profiles, learning_curve
from dash_core.config import DEFAULT_TRACKING_URI
from flows.progress import run_logs
from tasks.nightly import (
    NightReport,
    check,
    grading_figures,
    iteration_figures,
    learner_figures,
    sampling_figures,
    sync_figures,
)  # fmt: skip

log = logging.getLogger(__name__)


def curve_figures(curve: learning_curve.Curve, workdir: str, tracking: dict[str, str]) -> dict[str, float]:
    """Train (a subflow, so it shows as its own run in both UIs), then read its evaluations back."""
    evaluations = learning_curve.points(*learning_curve.train(curve, Path(workdir), tracking))
    last = evaluations[-1]
    figures = {
        "curve/final_sampled_accuracy": last.sampled_accuracy,
        "curve/final_greedy_accuracy": last.greedy_accuracy,
    }
    if hit := learning_curve.reached(evaluations, curve.gain):  # never reached: the check reports the figure missing
        figures |= {"curve/train_s_to_gain": hit.train_s, "curve/iterations_to_gain": hit.iteration}
    return figures


@flow(name="dash-bench", persist_result=True, result_serializer="json")
def dash_bench(
    profile: _profiles.ProfileName = "full",
    tracking_uri: str | None = None,
    experiment: str = "dash-nightly",
    baseline: str | None = None,
) -> NightReport:
    """Measure the nightly figures, log them to MLflow, and fail when one regresses against the earlier nights or the
    baseline.

    Args:
        profile: quick: a CI smoke test (under a minute on 2 CPU cores); full: the nightly figures (about 4 minutes
            on 2 CPU cores, with vLLM where installed; on a GPU, larger models and batches).
        tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI on the worker, else sqlite:///mlflow.db.
        experiment: MLflow experiment of the nights (earlier nights are looked up there).
        baseline: JSON file of baseline figures, by profile and machine; empty: bench/baseline.json of the code
            that runs.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    settings = _profiles.for_machine(profile, gpu=torch.cuda.is_available(), threads=torch.get_num_threads())
    with run_logs():
        night = _history.start(uri, experiment, profile, {"prefect.flow_run_id": str(flow_run.id)})
        figures: dict[str, float] = {}

        def record(measured: dict[str, float]) -> None:
            night.log_metrics(measured, step=0)
            figures.update(measured)
            log.info("measured %s", ", ".join(f"{k} {v:.4g}" for k, v in measured.items()))

        with night.failing():  # a crash or a regression ends the night's MLflow run as FAILED
            with tempfile.TemporaryDirectory(prefix="dash-bench-") as workdir:
                record(iteration_figures(settings.phases, workdir))
                record(learner_figures(settings.learner))
                record(grading_figures(settings.math_rounds, settings.code_rounds))
                tracking = {
                    "uri": uri,
                    "experiment": experiment,
                    "parent_run_id": night.run_id,
                    "run_name": "learning-curve",
                }
                record(curve_figures(settings.curve, workdir, tracking))
                record(sync_figures(settings.backends, settings.sync_repeats))
                record(sampling_figures(settings.backends, settings.sampling, workdir))
            report = check(night, figures, profile, Path(baseline) if baseline else _history.BASELINE)
        night.finish()
    return report
