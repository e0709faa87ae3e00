"""The Prefect task of `dash-eval`: a model scored on its evaluation sets."""

from __future__ import annotations

from dash_core import evaluation
from dash_core.config import DashConfig
from dash_core.evaluation import EvalResult
from tasks import phase


@phase("evaluate-model")
def evaluate_model(config: DashConfig) -> dict[str, EvalResult]:
    return evaluation.evaluate_model(config)
