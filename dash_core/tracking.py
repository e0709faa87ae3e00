"""MLflow tracking: params once (the resolved config), metrics per iteration, artifacts (config, samples).

Uses `MlflowClient` with an explicit run id rather than the fluent API's active run, so logging from any thread
(Prefect tasks) lands in the right run. Per-iteration metrics go through MLflow's asynchronous logging, so a
database or server round trip never sits on the training loop's path; `flush` waits for them (and raises what
failed), and runs at every artifact, evaluation and at the end.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.async_logging.run_operations import RunOperations

from dash_core.config import ConfigError, DashConfig, TrackingConfig

log = logging.getLogger(__name__)
CONFIG_ARTIFACT = "config.yaml"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (relative to the working directory with three slashes)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def client(uri: str) -> MlflowClient:
    """A client whose database is ready. MLflow creates a sqlite database's tables on first use, and two processes
    doing that at once leave it broken for good, so the first use holds a lock file beside the database."""
    check_reachable(uri)
    path = sqlite_path(uri)
    if path is None:
        return MlflowClient(tracking_uri=uri)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow = MlflowClient(tracking_uri=uri)
            mlflow.search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return mlflow


class Tracker:
    def __init__(self, mlflow: MlflowClient, run_id: str):
        self.client = mlflow
        self.run_id = run_id
        self._in_flight: list[RunOperations] = []

    @classmethod
    def create(cls, config: DashConfig, tags: dict[str, str] | None = None) -> Tracker:
        tracking = config.tracking
        tags = dict(tags or {})
        if tracking.parent_run_id:
            tags |= {"mlflow.parentRunId": tracking.parent_run_id, "dash.preset": tracking.run_name or ""}
        tracker = cls.new_run(tracking, tracking.run_name, tags)
        params = [Param(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value)) for key, value in config.flat().items()]
        for start in range(0, len(params), 100):
            tracker.client.log_batch(tracker.run_id, params=params[start : start + 100])
        tracker.log_text(config.to_yaml(), CONFIG_ARTIFACT)
        return tracker

    @classmethod
    def new_run(cls, cfg: TrackingConfig, name: str | None, tags: dict[str, str]) -> Tracker:
        """A run in `cfg.experiment` (created when missing), without params: e.g. a sweep's parent run."""
        mlflow = client(cfg.uri)
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        try:
            experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(cfg.experiment)
        except MlflowException:  # a run started at the same time created it
            experiment_id = mlflow.get_experiment_by_name(cfg.experiment).experiment_id
        return cls(mlflow, mlflow.create_run(experiment_id, run_name=name, tags=tags).info.run_id)

    @classmethod
    def reopen(cls, cfg: TrackingConfig, run_id: str) -> Tracker:
        tracker = cls(client(cfg.uri), run_id)
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
        """An error in the block ends the run as FAILED (KILLED when stopped: Ctrl-C, SIGTERM) instead of RUNNING."""
        try:
            yield
        except BaseException as exc:
            try:
                self.finish("FAILED" if isinstance(exc, Exception) else "KILLED")
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
    mlflow = client(cfg.uri)
    try:
        mlflow.get_run(run_id)
        path = mlflow.download_artifacts(run_id, CONFIG_ARTIFACT)
    except MlflowException as exc:
        raise ConfigError(f"cannot resume run {run_id!r} from {cfg.uri}: {exc.message}") from None
    with open(path) as f:
        return f.read()
