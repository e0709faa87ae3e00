"""The Prefect task of a sweep: its report, rebuilt from MLflow once every run has ended."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dash_core.report import build_report


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report(tracking_uri: str, experiment: str, out_dir: str, parent_run_id: str) -> str:
    return str(build_report(tracking_uri, experiment, out_dir, parent_run_id))
