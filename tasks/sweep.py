"""The Prefect task of a sweep: its report, rebuilt from MLflow once every run has ended."""

from __future__ import annotations

from dash_core.report import build_report
from tasks import phase


@phase("report")
def report(tracking_uri: str, experiment: str, out_dir: str, parent_run_id: str) -> str:
    return str(build_report(tracking_uri, experiment, out_dir, parent_run_id))
