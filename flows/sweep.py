"""The `dash-sweep` flow: the paper's comparisons side by side, each preset a `dash-train` subflow.

All presets share one MLflow experiment: a parent run for the sweep, one child run per preset, and the report
(table + plots) as the parent's artifacts. A preset that fails is recorded (its run keeps status FAILED) and the
sweep goes on with the others. Budgets are equal as in the paper: a time or sample budget given for
all, or else every other preset is truncated to the training wall-clock of the `dash` preset, which runs first.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dash_core.checkpoint import load_latest
from dash_core.config import DashConfig, load_config
from dash_core.report import build_report
from dash_core.store import RunStore
from dash_core.tracking import Tracker
from flows.train import dash_train

PRESET_DIRS = [Path("configs"), Path(__file__).resolve().parents[1] / "configs"]
UNBOUNDED_ITERATIONS = 1_000_000  # a budget, not an iteration count, ends budgeted runs


def preset_path(name: str) -> Path:
    """`dash` -> configs/dash.yaml (in the working directory, else the project's); a .yaml path is itself."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    for folder in PRESET_DIRS:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise FileNotFoundError(f"no preset {name!r}: looked for {name}.yaml in {', '.join(map(str, PRESET_DIRS))}")


def preset_config(name: str, configs: list[str], overrides: list[str], parent: Tracker, experiment: str) -> DashConfig:
    return load_config(
        [*configs, preset_path(name)],
        [*overrides, f"tracking.experiment={experiment}", f"tracking.parent_run_id={parent.run_id}", f"tracking.run_name={name}"],
    )


def final_checkpoint(config: DashConfig, run_id: str) -> str:
    """A local copy of a finished run's last checkpoint (what `sweep:<preset>` teachers load)."""
    folder = tempfile.mkdtemp(prefix=f"dash-teacher-{run_id[:8]}-")
    checkpoint = load_latest(RunStore(config.store.url, run_id, config.store.storage_options), folder)
    if checkpoint is None:
        raise FileNotFoundError(f"run {run_id} has no checkpoint to serve as a teacher")
    return str(checkpoint.model_dir)


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report(tracking_uri: str, experiment: str, out_dir: str, parent_run_id: str) -> str:
    return str(build_report(tracking_uri, experiment, out_dir, parent_run_id))


@flow(name="dash-sweep")
def dash_sweep(
    presets: list[str],
    configs: list[str] | None = None,
    overrides: list[str] | None = None,
    budget_minutes: float | None = None,
    budget_samples: int | None = None,
    experiment: str | None = None,
    report_dir: str = "reports",
) -> str:
    """Run each preset over the base `configs` + `overrides`; returns the folder holding the report."""
    configs, overrides = list(configs or []), list(overrides or [])
    experiment = experiment or time.strftime("sweep-%Y%m%d-%H%M%S")
    base = load_config(configs, overrides)  # fail on a bad base before anything runs
    for name in presets:
        preset_path(name)
    parent = Tracker.new_run(base.tracking.model_copy(update={"experiment": experiment}), "sweep", {"dash.kind": "sweep"})
    parent.client.log_param(parent.run_id, "presets", ",".join(presets))
    order = sorted(presets, key=lambda name: name != "dash")  # dash first: its wall-clock is the others' budget
    finished: dict[str, tuple[DashConfig, str]] = {}
    failed: dict[str, str] = {}
    try:
        for name in order:
            extra = []
            if budget_minutes or budget_samples:
                extra = [f"iterations={UNBOUNDED_ITERATIONS}"]
                extra += [f"budget_minutes={budget_minutes}"] if budget_minutes else []
                extra += [f"budget_samples={budget_samples}"] if budget_samples else []
            elif "dash" in finished:
                _, dash_run = finished["dash"]
                seconds = parent.client.get_run(dash_run).data.metrics["time/train_s"]
                extra = [f"budget_minutes={seconds / 60}", f"iterations={UNBOUNDED_ITERATIONS}"]
            config = preset_config(name, configs, overrides + extra, parent, experiment)
            if config.algo.teacher and config.algo.teacher.startswith("sweep:"):
                source = config.algo.teacher.removeprefix("sweep:")
                if source not in finished:
                    failed[name] = f"learns from sweep:{source}, which must run (and finish) earlier in the sweep"
                    continue
                config.algo.teacher = final_checkpoint(*finished[source])
            try:
                finished[name] = (config, dash_train.with_options(flow_run_name=f"{experiment}-{name}")(config=config))
            except Exception as exc:  # one preset failing (say, a collapse) must not lose the others
                failed[name] = str(exc)
                get_run_logger().error("preset %s failed: %s", name, exc)
        if failed:
            parent.log_text(json.dumps(failed, indent=1), "failed_presets.json")
        folder = report(base.tracking.uri, experiment, str(Path(report_dir) / experiment), parent.run_id)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return folder
