"""The `dash-sweep` flow: the paper's comparisons side by side, every preset x seed a `dash-train` run.

All runs share one MLflow experiment: a parent run for the sweep, one child run per preset and seed (named
`<preset>-seed<seed>`), and the report (mean and spread over seeds, plots) as the parent's artifacts. A run that
fails is recorded (`failed_presets.json`) and the sweep goes on with the others. Every run's config is resolved
before anything starts, so a bad preset, base or override fails the sweep at once.

- In process (the default), one run after another as subflows. Budgets are equal as in the paper: a time or
  sample budget given for all, or else every other preset is truncated to the training wall-clock of the `dash`
  run with the same seed, which runs first. A preset whose teacher is `sweep:<preset>` runs after that preset
  and learns from its final checkpoint.
- `fan_out`: every run is a flow run of the `dash-train` deployment, all submitted at once, so N workers on its
  pool train N runs at a time; the sweep waits for all of them, then reports. As the runs share no clock, the
  budget must be given. Teachers from the sweep are refused: the checkpoint stays where its run trained, which
  another worker may not reach.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from pydantic import Field

from dash_core.checkpoint import load_latest
from dash_core.config import ConfigError, DashConfig, load_config
from dash_core.presets import Preset, preset_path
from dash_core.store import RunStore
from dash_core.tracking import Tracker
from flows.train import dash_train
from tasks.sweep import report

UNBOUNDED_ITERATIONS = 1_000_000  # a budget, not an iteration count, ends budgeted runs
SWEEP_TEACHER = "sweep:"
POLL_SECONDS = 5.0  # how often a fanned-out sweep asks the Prefect API how its runs are doing


@dataclass
class SweepRun:
    """One preset with one seed, and its resolved config."""

    preset: Preset
    seed: int
    config: DashConfig

    @property
    def name(self) -> str:
        return f"{self.preset}-seed{self.seed}"

    @property
    def teacher_source(self) -> str | None:
        """The preset of this sweep whose final checkpoint is the teacher, if any."""
        teacher = self.config.algo.teacher or ""
        return teacher.removeprefix(SWEEP_TEACHER) if teacher.startswith(SWEEP_TEACHER) else None


def budget_overrides(minutes: float | None, samples: int | None) -> list[str]:
    """The sweep's budget as overrides: the budget, not an iteration count, ends every run."""
    budget = [f"budget_minutes={minutes}"] if minutes else []
    budget += [f"budget_samples={samples}"] if samples else []
    return [f"iterations={UNBOUNDED_ITERATIONS}", *budget] if budget else []


def plan(
    presets: list[Preset], seeds: list[int], base: dict, configs: list[str], overrides: list[str], experiment: str
) -> list[SweepRun]:
    """Every preset x seed, resolved. `dash` first (its wall-clock may be the others' budget), and presets that
    learn from a sweep teacher last (the teacher has to be trained)."""
    runs = []
    for preset in presets:
        for seed in seeds:
            names = [f"seed={seed}", f"tracking.experiment={experiment}", f"tracking.run_name={preset}-seed{seed}"]
            config = load_config([*configs, preset_path(preset)], [*overrides, *names], base)
            runs.append(SweepRun(preset, seed, config))
    for run in runs:
        if run.teacher_source and run.teacher_source not in presets:
            raise ConfigError(
                f"{run.preset} learns from algo.teacher {run.config.algo.teacher!r}, the final checkpoint of this sweep's "
                f"{run.teacher_source} run, but {run.teacher_source} is not among the presets: add it, or set "
                "algo.teacher (an override) to a model directory or hub id"
            )
    return sorted(runs, key=lambda run: (run.teacher_source is not None, run.preset != "dash"))


def final_checkpoint(config: DashConfig, run_id: str) -> str:
    """A local copy of a finished run's last checkpoint (what `sweep:<preset>` teachers load)."""
    folder = tempfile.mkdtemp(prefix=f"dash-teacher-{run_id[:8]}-")
    checkpoint = load_latest(RunStore(config.store.url, run_id, config.store.storage_options), folder)
    if checkpoint is None:
        raise FileNotFoundError(f"run {run_id} has no checkpoint to serve as a teacher")
    return str(checkpoint.model_dir)


def run_in_process(runs: list[SweepRun], parent: Tracker, experiment: str, budgeted: bool) -> dict[str, str]:
    """Train the runs one after another as subflows; returns the failures by run name."""
    finished: dict[tuple[str, int], tuple[DashConfig, str]] = {}
    failed: dict[str, str] = {}
    for run in runs:
        config = run.config.model_copy(deep=True)
        if not budgeted and run.preset != "dash" and ("dash", run.seed) in finished:
            _, dash_run = finished["dash", run.seed]
            config.budget_minutes = parent.latest_metrics(dash_run)["time/train_s"] / 60
            config.iterations = UNBOUNDED_ITERATIONS
        if run.teacher_source:
            if (run.teacher_source, run.seed) not in finished:
                failed[run.name] = f"learns from {config.algo.teacher}, whose run with seed {run.seed} did not finish"
                continue
            config.algo.teacher = final_checkpoint(*finished[run.teacher_source, run.seed])
        try:
            result = dash_train.with_options(flow_run_name=f"{experiment}-{run.name}")(config=config)
            finished[run.preset, run.seed] = (config, result["run_id"])
        except Exception as exc:  # one run failing (say, a collapse) must not lose the others
            failed[run.name] = str(exc)
            get_run_logger().error("%s failed: %s", run.name, exc)
    return failed


def check_fan_out(runs: list[SweepRun], deployment: str) -> None:
    """What a fanned-out sweep needs, checked before anything runs."""
    for run in runs:
        if run.teacher_source:
            raise ConfigError(
                f"{run.preset} learns from algo.teacher {run.config.algo.teacher!r}, a checkpoint that stays where its run "
                f"trained, which another worker may not reach: run this sweep with fan_out off, leave {run.preset} out, "
                "or set algo.teacher (an override) to a model directory or hub id every worker can load"
            )
        if run.config.public() != run.config.model_dump(mode="json"):
            raise ConfigError(
                "store.storage_options holds credentials, which fan_out would send as flow-run parameters (shown in "
                "the Prefect UI): remove them and give the workers theirs in the environment, e.g. AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY as job variables of the work pool"
            )
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ConfigError(
                f"no deployment {deployment!r} at the Prefect API {PREFECT_API_URL.value() or '(ephemeral)'}: deploy it "
                "(prefect deploy --all) and start a worker on its pool, or run the sweep with fan_out off"
            ) from None


def run_fanned_out(runs: list[SweepRun], deployment: str, experiment: str) -> dict[str, str]:
    """Submit every run to the deployment's work pool at once, then wait for all; returns the failures by run name."""
    logger = get_run_logger()
    submitted: dict[UUID, SweepRun] = {}
    failed: dict[str, str] = {}
    for run in runs:
        try:
            flow_run = run_deployment(
                deployment, parameters={"config": run.config.model_dump(mode="json")}, timeout=0,
                flow_run_name=f"{experiment}-{run.name}", tags=[f"sweep:{experiment}"],
            )  # fmt: skip
        except Exception as exc:  # e.g. the server rejected the parameters: the other runs still go
            failed[run.name] = f"not submitted to {deployment}: {exc}"
            logger.error("%s was not submitted: %s", run.name, exc)
            continue
        submitted[flow_run.id] = run
        logger.info("%s: flow run %s submitted to %s", run.name, flow_run.name, deployment)
    for flow_run_id, flow_run in ended(list(submitted)):
        name = submitted[flow_run_id].name
        if flow_run is None:
            failed[name] = f"flow run {flow_run_id} was deleted before it ended"
        elif not flow_run.state.is_completed():
            state = flow_run.state
            failed[name] = f"flow run {flow_run.name} ({flow_run_id}) ended {state.name}: {state.message}"
        logger.info("%s: %s", name, failed.get(name, f"flow run {flow_run_id} completed"))
    return failed


def ended(flow_run_ids: list[UUID]) -> Iterator[tuple[UUID, FlowRun | None]]:
    """Each flow run as it reaches a final state (Completed, Failed, Crashed, Cancelled), until all have; None for
    one deleted meanwhile (say, from the UI), which would otherwise be waited for forever."""
    pending = set(flow_run_ids)
    with get_client(sync_client=True) as client:
        while pending:
            ids = FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))
            listed = client.read_flow_runs(flow_run_filter=ids, limit=len(pending))
            found = {flow_run.id: flow_run for flow_run in listed}
            for flow_run_id in list(pending):
                flow_run = found.get(flow_run_id)
                if flow_run is None or (flow_run.state and flow_run.state.is_final()):
                    pending.discard(flow_run_id)
                    yield flow_run_id, flow_run
            if pending:
                time.sleep(POLL_SECONDS)


@flow(name="dash-sweep")
def dash_sweep(
    presets: Annotated[list[Preset], Field(min_length=1)],
    seeds: Annotated[list[int], Field(min_length=1)] = [0],
    budget_minutes: Annotated[float, Field(gt=0)] | None = None,
    budget_samples: Annotated[int, Field(gt=0)] | None = None,
    base: DashConfig = DashConfig.form_default(),
    fan_out: bool = False,
    train_deployment: str = "dash-train/default",
    experiment: str | None = None,
    report_dir: str = "reports",
    configs: list[str] | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Train every preset once per seed over one base config, and report them side by side.

    Returns the folder holding the report.

    Args:
        presets: The algorithms to compare, each a preset in configs/ applied over the base.
        seeds: Each preset runs once per seed (config field `seed`); the report gives mean and spread over them.
        budget_minutes: Training wall-clock per run, the same for all. Required with fan_out (or budget_samples);
            without either, an in-process sweep gives every run the wall-clock of the dash run with its seed.
        budget_samples: Sampled completions per run, the same for all.
        base: The configuration every run starts from (model, task, sizes, tracking, store); configs, the preset
            and overrides apply on top of it.
        fan_out: Run every preset x seed as its own flow run of train_deployment on the work pool, all at once,
            instead of one after another in this flow run. Needs a budget.
        train_deployment: The training deployment fan_out submits to, as flow-name/deployment-name.
        experiment: The sweep's MLflow experiment; empty: sweep-<date>-<time>.
        report_dir: Folder for the report (report.md and plots), also logged to the sweep's MLflow run.
        configs: Advanced. YAML files (paths on the worker) applied over base, before the preset, e.g.
            configs/math.yaml.
        overrides: Advanced. key.path=value overrides applied after the preset, e.g. algo.tau=0.2.
    """
    configs, overrides = list(configs or []), list(overrides or [])
    presets, seeds = list(dict.fromkeys(presets)), list(dict.fromkeys(seeds))  # each preset x seed runs once
    experiment = experiment or time.strftime("sweep-%Y%m%d-%H%M%S")
    budget = budget_overrides(budget_minutes, budget_samples)
    if fan_out and not budget:
        raise ConfigError(
            "fan_out runs every preset at the same time, so no run's wall-clock can be the others' budget: give "
            "budget_minutes or budget_samples (the same for every run)"
        )
    # Only what differs from the defaults: the form always sends every field, and the YAML files may set the rest.
    base_data = base.model_dump(mode="json", exclude_defaults=True)
    tracking = load_config(configs, overrides, base_data).tracking.model_copy(update={"experiment": experiment})
    runs = plan(presets, seeds, base_data, configs, overrides + budget, experiment)
    if fan_out:
        check_fan_out(runs, train_deployment)
    parent = Tracker.new_run(tracking, "sweep", {"dash.kind": "sweep"})
    params = {"presets": ",".join(presets), "seeds": ",".join(map(str, seeds)), "fan_out": str(fan_out)}
    parent.log_params(params)
    try:
        for run in runs:
            run.config.tracking.parent_run_id = parent.run_id
        if fan_out:
            failed = run_fanned_out(runs, train_deployment, experiment)
        else:
            failed = run_in_process(runs, parent, experiment, budgeted=bool(budget))
        if failed:
            parent.log_text(json.dumps(failed, indent=1), "failed_presets.json")
        folder = report(tracking.uri, experiment, str(Path(report_dir) / experiment), parent.run_id)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return folder
