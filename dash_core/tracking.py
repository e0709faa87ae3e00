"""MLflow tracking: params once (the resolved config), metrics per iteration, artifacts (config, samples).

Uses `MlflowClient` with an explicit run id rather than the fluent API's active run, so logging from any thread
(Prefect tasks) lands in the right run. Per-iteration metrics go through MLflow's asynchronous logging, so a
database or server round trip never sits on the training loop's path; `flush` waits for them (and raises what
failed), and runs at every artifact, evaluation and at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.async_logging.run_operations import RunOperations

from dash_core.config import ConfigError, DashConfig, TrackingConfig

log = logging.getLogger(__name__)
CONFIG_ARTIFACT = "config.yaml"


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_id: str):
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.run_id = run_id
        self._in_flight: list[RunOperations] = []

    @classmethod
    def create(cls, config: DashConfig, tags: dict[str, str] | None = None) -> Tracker:
        tracking = config.tracking
        tags = dict(tags or {})
        if tracking.parent_run_id:
            tags |= {"mlflow.parentRunId": tracking.parent_run_id, "dash.preset": tracking.run_name or ""}
        tracker = cls.new_run(tracking, tracking.run_name, tags)
        client = tracker.client
        params = [Param(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value)) for key, value in config.flat().items()]
        for start in range(0, len(params), 100):
            client.log_batch(tracker.run_id, params=params[start : start + 100])
        tracker.log_text(config.to_yaml(), CONFIG_ARTIFACT)
        return tracker

    @classmethod
    def new_run(cls, cfg: TrackingConfig, name: str | None, tags: dict[str, str]) -> Tracker:
        """A run in `cfg.experiment` (created when missing), without params: e.g. a sweep's parent run."""
        check_reachable(cfg.uri)
        client = MlflowClient(tracking_uri=cfg.uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
        return cls(cfg, client.create_run(experiment_id, run_name=name, tags=tags).info.run_id)

    @classmethod
    def reopen(cls, cfg: TrackingConfig, run_id: str) -> Tracker:
        check_reachable(cfg.uri)
        tracker = cls(cfg, run_id)
        try:
            tracker.client.get_run(run_id)
        except MlflowException as exc:
            raise ConfigError(f"no MLflow run {run_id!r} at {cfg.uri}: {exc.message}. Check the run id and tracking.uri.") from None
        tracker.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return tracker

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._in_flight.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def history(self, key: str) -> dict[int, float]:
        """The values of `key` by step, as stored (what a resumed run must not log again)."""
        self.flush()
        return {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}

    def flush(self) -> None:
        """Wait until every metric logged so far is stored."""
        in_flight, self._in_flight = self._in_flight, []
        for operations in in_flight:
            operations.wait()

    def log_text(self, text: str, path: str) -> None:
        self.flush()
        self.client.log_text(self.run_id, text, path)

    def log_jsonl(self, rows: list[dict], path: str) -> None:
        self.log_text("".join(json.dumps(row) + "\n" for row in rows), path)

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)

    @contextmanager
    def failing(self) -> Iterator[None]:
        """An error in the block ends the run as FAILED (KILLED on Ctrl-C) instead of leaving it RUNNING."""
        try:
            yield
        except BaseException as exc:
            try:
                self.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except Exception:  # the original error is the one to report
                log.exception("could not mark MLflow run %s as ended", self.run_id)
            raise


def check_reachable(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"MLflow tracking server {uri} is not reachable ({exc}). Start it (mlflow server ...) or point "
            "tracking.uri elsewhere, e.g. sqlite:///mlflow.db"
        ) from None


def run_config(cfg: TrackingConfig, run_id: str) -> str:
    """The YAML config a run was started with, for `--resume`."""
    check_reachable(cfg.uri)
    client = MlflowClient(tracking_uri=cfg.uri)
    try:
        client.get_run(run_id)
        path = client.download_artifacts(run_id, CONFIG_ARTIFACT)
    except MlflowException as exc:
        raise ConfigError(f"cannot resume run {run_id!r} from {cfg.uri}: {exc.message}") from None
    with open(path) as f:
        return f.read()
