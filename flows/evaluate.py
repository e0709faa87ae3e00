"""The `dash-eval` flow: score a model on evaluation sets, write per-problem results, log everything to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dash_core.config import DashConfig
from dash_core.evaluation import EvalResult, evaluate_model
from dash_core.preflight import check_device, check_model
from dash_core.tracking import Tracker


@task(name="evaluate-model", cache_policy=NO_CACHE, persist_result=False)
def evaluate_model_task(config: DashConfig) -> dict[str, EvalResult]:
    return evaluate_model(config)


@flow(name="dash-eval")
def dash_eval(config: DashConfig, out_dir: str = "eval_results") -> dict[str, float]:
    """Metrics of every set; per-problem JSONL under `out_dir/<run id>/` and in the MLflow run."""
    check_model(config.model)
    check_device(config.model.device)
    tracker = Tracker.create(config, tags={"dash.kind": "eval", "dash.model": config.model.name})
    with tracker.failing():
        results = evaluate_model_task(config)
    folder = Path(out_dir) / tracker.run_id
    folder.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    for name, result in results.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in result.rows))
        tracker.client.log_artifact(tracker.run_id, str(path), "results")
        metrics |= result.metrics
    tracker.log_metrics(metrics, step=0)
    tracker.finish()
    return metrics
