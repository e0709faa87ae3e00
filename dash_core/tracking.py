"""MLflow tracking: params once (the resolved config), metrics per iteration, artifacts (config, samples), the
code's git commit, the training and evaluation sets as dataset inputs, and system metrics sampled on a thread.

Uses `MlflowClient` with an explicit run id rather than the fluent API's active run, so logging from any thread
(Prefect tasks) lands in the right run. Per-iteration metrics go through MLflow's asynchronous logging, so a
database or server round trip never sits on the training loop's path; `flush` waits for them (and raises what
failed), and runs at every artifact, evaluation and at the end.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.async_logging.run_operations import RunOperations

from dash_core.config import ArithmeticTaskConfig, ConfigError, DashConfig, DatasetConfig, TrackingConfig
from dash_core.data.datasets import DATASETS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dash_core.data import Problem, Task

log = logging.getLogger(__name__)
# MLflow's system metrics monitor announces its start and stop at INFO on MLflow's own console handler, which would
# print them amid a terminal run's progress display.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
CONFIG_ARTIFACT = "config.yaml"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own name: its UI shows the commit beside the source
GENERATED_SAMPLE = 256  # problems of a generated training stream that its digest is taken from
PROBLEM_FIELDS = ("prompt", "answer", "tests", "solution")
PROBLEM_SCHEMA = json.dumps({"mlflow_colspec": [{"type": "string", "name": field} for field in PROBLEM_FIELDS]})


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (relative to the working directory with three slashes)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite-tracked experiment go beside the database, not into the working directory of whichever
    process created the experiment (a worker's flow run works in a temporary folder deleted after the run)."""
    path = sqlite_path(uri)
    return (path.resolve().parent / "mlruns").as_uri() if path else None


def client(uri: str) -> MlflowClient:
    """A client whose database is ready. MLflow creates a sqlite database's tables on first use, and two processes
    doing that at once leave it broken for good, so the first use holds a lock file beside the database."""
    check_scheme(uri)
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
        self._system: SystemMetricsMonitor | None = None

    @classmethod
    def create(cls, config: DashConfig, tags: dict[str, str] | None = None, default_name: str | None = None) -> Tracker:
        """A run holding `config` as params; named `tracking.run_name`, else `default_name` (else MLflow picks)."""
        tracking = config.tracking
        tags = code_tags() | (tags or {})
        if tracking.parent_run_id:
            tags |= {"mlflow.parentRunId": tracking.parent_run_id, "dash.preset": tracking.run_name or ""}
        tracker = cls.new_run(tracking, tracking.run_name or default_name, tags)
        tracker.log_params(config.flat())
        tracker.log_text(config.to_yaml(), CONFIG_ARTIFACT)
        return tracker

    @classmethod
    def new_run(cls, cfg: TrackingConfig, name: str | None, tags: dict[str, str]) -> Tracker:
        """A run in `cfg.experiment` (created when missing), without params: e.g. a sweep's parent run."""
        mlflow = client(cfg.uri)
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        try:
            experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(cfg.experiment, artifact_root(cfg.uri))
        except MlflowException:  # a run started at the same time created it
            experiment_id = mlflow.get_experiment_by_name(cfg.experiment).experiment_id
        return cls(mlflow, mlflow.create_run(experiment_id, run_name=name, tags=tags).info.run_id)

    @classmethod
    def reopen(cls, cfg: TrackingConfig, run_id: str, tags: dict[str, str] | None = None) -> Tracker:
        """`run_id` running again; `tags` replace the values they had (say, the flow run that now continues it)."""
        tracker = cls(client(cfg.uri), run_id)
        try:
            tracker.client.get_run(run_id)
        except MlflowException as exc:
            raise ConfigError(
                f"no MLflow run {run_id!r} at {cfg.uri}: {exc.message}. Check the run id and tracking.uri."
            ) from None
        tracker.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        for key, value in (code_tags() | (tags or {})).items():
            tracker.client.set_tag(run_id, key, value)
        return tracker

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def watch_system(self, every_s: float | None, resumed: bool) -> None:
        """Sample CPU, memory, disk, network (and NVIDIA GPUs, with nvidia-ml-py) as `system/*` metrics every
        `every_s` seconds until `finish`. MLflow's monitor samples on its own thread and logs with its own client,
        so the training loop never waits on it; a resumed run's samples continue its steps."""
        if every_s is None:
            return
        self._system = SystemMetricsMonitor(
            self.run_id, every_s, resume_logging=resumed, tracking_uri=self.client.tracking_uri
        )
        if shutil.which("nvidia-smi") and not any(isinstance(m, GPUMonitor) for m in self._system.monitors):
            log.warning(
                "no GPU system metrics: MLflow reads NVIDIA GPUs through nvidia-ml-py (pip install nvidia-ml-py)"
            )
        self._system.start()

    def log_datasets(self, inputs: list[DatasetInput]) -> None:
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._in_flight.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def history(self, key: str) -> dict[int, float]:
        """The values of `key` by step, as stored (what a resumed run must not log again)."""
        self.flush()
        return {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}

    def earliest(self, prefix: str) -> tuple[int, dict[str, float]] | None:
        """The metrics named `prefix...` at the first step any of them was logged (a resumed run's first
        evaluation, logged by an earlier process); None when none was."""
        self.flush()
        keys = [key for key in self.client.get_run(self.run_id).data.metrics if key.startswith(prefix)]
        histories = {key: self.history(key) for key in keys}
        first = min((min(h) for h in histories.values() if h), default=None)
        if first is None:
            return None
        return first, {key: h[first] for key, h in histories.items() if first in h}

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

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """A local file, copied into the run's artifacts (under `folder`, when given)."""
        self.flush()
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_figure(self, figure: Figure, path: str) -> None:
        """A matplotlib figure, saved as the run's artifact `path` (its suffix picks the format)."""
        self.flush()
        self.client.log_figure(self.run_id, figure, path)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params of the run, lists and dicts as JSON; sent 100 at a time, the most MLflow takes in one request."""
        entries = [
            Param(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
            for key, value in params.items()
        ]
        for start in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[start : start + 100])

    def latest_metrics(self, run_id: str | None = None) -> dict[str, float]:
        """The last value of every metric of this run, or of `run_id`: another run in the same tracking store
        (say, a sweep's child run, read from the sweep's run)."""
        self.flush()
        return dict(self.client.get_run(run_id or self.run_id).data.metrics)

    def tags(self, run_id: str | None = None) -> dict[str, str]:
        """The tags of this run, or of `run_id`, another run in the same tracking store."""
        return dict(self.client.get_run(run_id or self.run_id).data.tags)

    def finish(self, status: str = "FINISHED") -> None:
        try:
            if self._system:
                self._system.finish()
                self._system = None
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


def check_scheme(uri: str) -> None:
    """Fail before anything starts when MLflow has no tracking store for the URI's scheme (plugins included); MLflow
    itself fails only once the run starts, with a model-registry traceback."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # the registry MLflow resolves by

    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        scheme = uri.partition(":")[0]
        known = ", ".join(sorted(s for s in _tracking_store_registry._registry if s))
        raise ConfigError(
            f"tracking.uri {uri!r}: MLflow has no tracking store for the scheme {scheme!r} (it knows {known}). Use e.g. "
            "sqlite:///mlflow.db, a folder, or http://host:5000"
        ) from None


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
    path = sqlite_path(cfg.uri)
    if path is not None and not path.exists():  # MLflow would create an empty database to look in
        raise ConfigError(
            f"cannot resume run {run_id!r}: the tracking database {path.resolve()} does not exist; point tracking.uri "
            "(or --set tracking.uri=...) at the database the run was tracked in"
        )
    mlflow = client(cfg.uri)
    try:
        mlflow.get_run(run_id)
        path = mlflow.download_artifacts(run_id, CONFIG_ARTIFACT)
    except MlflowException as exc:
        raise ConfigError(f"cannot resume run {run_id!r} from {cfg.uri}: {exc.message}") from None
    with open(path) as f:
        return f.read()


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in a tracking server's UI; None for a local store, which no server shows."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(uri: str) -> str:
    """The command that shows a local store's runs (`mlflow ui`), with the database's absolute path, so it works
    from any folder."""
    path = sqlite_path(uri)
    return f"mlflow ui --backend-store-uri {f'sqlite:///{path.resolve()}' if path else uri}"


def code_tags() -> dict[str, str]:
    """The git commit of the code, when it runs from a git checkout (an installed package has none)."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {GIT_COMMIT_TAG: found.stdout.strip()} if found.returncode == 0 else {}


def dataset_inputs(config: DashConfig, task: Task, eval_sets: dict[str, list[Problem]]) -> list[DatasetInput]:
    """The training set and every evaluation set, as MLflow shows a run's data: a public set by its local path or
    hub id, the generated arithmetic task by its config and seed. Digests come from the problems themselves, so
    runs on the same data show the same digest."""
    cfg = config.task
    if isinstance(cfg, ArithmeticTaskConfig):
        name = f"arithmetic-{cfg.digits}d-seed{config.seed}"
        source = {"generator": "dash_core.data.arithmetic", "seed": config.seed, **cfg.model_dump()}
        generated = {"rows": "generated per iteration", "digest_of_first": GENERATED_SAMPLE}
        sample = task.train_problems(0, GENERATED_SAMPLE)
        inputs = [_dataset(name, "code", source, sample, "train", task.name, generated)]
        inputs.append(_dataset(f"{name}-heldout", "code", source, eval_sets[task.name], "eval", task.name))
    else:
        inputs = [_public_dataset(cfg, task.problems, "train")]
    by_name = {d.name: d for d in config.eval.datasets}
    return inputs + [
        _public_dataset(by_name[name], problems, "eval") for name, problems in eval_sets.items() if name in by_name
    ]


def _public_dataset(cfg: DatasetConfig, problems: list[Problem], context: str) -> DatasetInput:
    if cfg.path:
        return _dataset(cfg.path, "local", {"uri": cfg.path}, problems, context, cfg.name)
    spec = DATASETS[cfg.name]
    source = {"path": spec.hub, "config_name": spec.hub_config, "split": cfg.split}
    return _dataset(spec.hub, "hugging_face", source, problems, context, cfg.name)


def _dataset(
    name: str,
    source_type: str,
    source: dict,
    problems: list[Problem],
    context: str,
    set_name: str,
    profile: dict | None = None,
) -> DatasetInput:
    """`context` (train / eval) is MLflow's input tag; `dash.set` is the set's name in DASH's config and in its
    metrics (`eval/<set>/...`)."""
    content = json.dumps([[p.id, *(getattr(p, field) for field in PROBLEM_FIELDS)] for p in problems]).encode()
    digest = hashlib.sha256(content).hexdigest()[:16]
    tags = [InputTag("mlflow.data.context", context), InputTag("dash.set", set_name)]
    profile = profile or {"num_rows": len(problems)}
    dataset = Dataset(name, digest, source_type, json.dumps(source), PROBLEM_SCHEMA, json.dumps(profile))
    return DatasetInput(dataset, tags)
