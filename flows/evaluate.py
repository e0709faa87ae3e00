"""The `dash-eval` flow: score a model on evaluation sets, write per-problem results, log everything to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from dash_core.config import DashConfig
from dash_core.preflight import check_device, check_model
from dash_core.tracking import Tracker
from tasks.evaluate import evaluate_model


@flow(name="dash-eval")
def dash_eval(config: DashConfig, out_dir: str = "eval_results") -> dict[str, float]:
    """Metrics of every set; per-problem JSONL under `out_dir/<run id>/` and in the MLflow run."""
    check_model(config.model)
    check_device(config.model.device)
    tracker = Tracker.create(config, tags={"dash.kind": "eval", "dash.model": config.model.name})
    with tracker.failing():
        results = evaluate_model(config)
    folder = Path(out_dir) / tracker.run_id
    folder.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    for name, result in results.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in result.rows))
        tracker.log_artifact(path, "results")
        metrics |= result.metrics
    tracker.log_metrics(metrics, step=0)
    tracker.finish()
    return metrics
