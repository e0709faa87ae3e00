"""Deployments as a platform team runs them: a real Prefect server on loopback, a process work pool made from
`deployments/process-pool.json`, `prefect deploy` of `prefect.yaml` from a copy of the project (a git repository,
which the pull step clones at run time), a worker started in another folder whose environment names the team's
MLflow and rollout store, and `prefect deployment run`. No mocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import psutil
import pytest

from dash_core.serving import free_port, stop_process, wait_healthy
from dash_core.store import RunStore
from dash_core.tracking import client

PROJECT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
TINY = {
    "iterations": 2, "threads": 1, "task": {"digits": 1, "heldout_fraction": 0.2},
    "sampler": {"prompts_per_iteration": 4, "group_size": 4}, "learner": {"micro_batch_size": 8},
    "warmup": {"steps": 20, "batch_size": 8, "target_accuracy": None}, "eval": {"every": 1, "size": 8},
}  # fmt: skip


@dataclass
class Platform:
    api_url: str
    env: dict[str, str]  # a platform engineer's shell: the Prefect API, nothing about MLflow or the store
    tracking_uri: str  # what the worker's environment names
    store_url: str
    worker: subprocess.Popen
    repository: Path

    def prefect(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.repository)

    def run_deployment(self, name: str, parameters: dict, watch: bool = True) -> tuple[subprocess.CompletedProcess, UUID]:
        done = self.prefect("deployment", "run", name, "--params", json.dumps(parameters), *(["--watch"] if watch else []))
        line = next((line for line in done.stdout.splitlines() if "UUID:" in line), None)
        assert line, done.stdout + done.stderr
        return done, UUID(line.split("UUID:")[1].strip())

    def flow_run(self, flow_run_id: UUID):
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(self.api_url) as prefect:
            return prefect.read_flow_run(flow_run_id)


def project_repository(folder: Path) -> Path:
    """The project's files (tracked and new, as git sees them) committed to a fresh repository: what a team pushes."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (PROJECT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, folder / name)
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "DASH under test"]):
        subprocess.run([*git, *args], cwd=folder, check=True)
    return folder


def started(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Platform:
    root = tmp_path_factory.mktemp("platform")
    repository = project_repository(root / "repository")
    quiet = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DASH_"))} | quiet

    port = free_port(24200)
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = base | {"PREFECT_HOME": str(root / "server-home")}
    server = started([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env, root, root / "server.log")
    worker = None
    try:
        problem = wait_healthy(server, f"{api_url}/health", 180)
        assert problem is None, f"Prefect server {problem}: {(root / 'server.log').read_text()[-2000:]}"
        env = base | {"PREFECT_HOME": str(root / "client-home"), "PREFECT_API_URL": api_url}
        platform = Platform(api_url, env, f"sqlite:///{root}/team/mlflow.db", str(root / "team" / "store"), None, repository)
        (root / "team").mkdir()
        for args in (
            ["variable", "set", "dash_repository", str(repository)],
            ["variable", "set", "dash_branch", "main"],
            ["work-pool", "create", "dash", "--type", "process", "--base-job-template", str(repository / "deployments" / "process-pool.json")],
            ["--no-prompt", "deploy", "--all"],
        ):
            done = platform.prefect(*args)
            assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        (root / "worker").mkdir()
        worker_env = env | {
            "PREFECT_HOME": str(root / "worker-home"), "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
            "MLFLOW_TRACKING_URI": platform.tracking_uri, "DASH_STORE_URL": platform.store_url, "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
        }  # fmt: skip
        worker = started([PREFECT, "worker", "start", "--pool", "dash", "--name", "w1"], worker_env, root / "worker", root / "worker.log")
        platform.worker = worker
        yield platform
    finally:
        if worker is not None:  # before the server: a worker whose server is gone hangs in its shutdown
            stop_process(worker, 30)
        stop_process(server, 30)


def test_a_deployed_training_run_completes_into_the_team_mlflow_and_store(platform):
    done, flow_run_id = platform.run_deployment("dash-train/default", {"config": TINY | {"tracking": {"experiment": "deployed"}}})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert platform.flow_run(flow_run_id).state.is_completed()

    mlflow = client(platform.tracking_uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("deployed").experiment_id])
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "reward/mean")] == [1, 2]
    store = RunStore(platform.store_url, run.info.run_id)
    assert store.has_batch(1) and store.has_batch(2)
    assert run.data.params["tracking.uri"] == platform.tracking_uri and run.data.params["store.url"] == platform.store_url
    cloned = subprocess.run(["git", "rev-parse", "HEAD"], cwd=platform.repository, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == cloned  # the code the pull step cloned is the code that ran
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run_id) and run.data.tags["prefect.deployment"] == "dash-train/default"


def test_a_fanned_out_sweep_trains_each_preset_as_its_own_flow_run_and_reports(platform):
    parameters = {"presets": ["dash", "grpo"], "fan_out": True, "budget_samples": 32, "experiment": "fanned",
                  "base": TINY | {"iterations": 1_000}}  # fmt: skip
    done, sweep_id = platform.run_deployment("dash-sweep/paper-ablations", parameters)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with SyncPrefectClient(platform.api_url) as prefect:
        children = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[sweep_id])))
        deployment_ids = {child.deployment_id for child in children}
        train = prefect.read_deployment_by_name("dash-train/default")
    assert len(children) == 2 and deployment_ids == {train.id}  # each its own flow run of the training deployment
    assert all(child.state.is_completed() for child in children)

    mlflow = client(platform.tracking_uri)
    experiment_id = mlflow.get_experiment_by_name("fanned").experiment_id
    (parent,) = mlflow.search_runs([experiment_id], "tags.`dash.kind` = 'sweep'")
    runs = mlflow.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in runs) == ["dash-seed0", "grpo-seed0"]
    for run in runs:
        assert run.data.metrics["samples/total"] >= 32 and RunStore(platform.store_url, run.info.run_id).has_batch(1)
    assert "report/report.md" in [a.path for a in mlflow.list_artifacts(parent.info.run_id, "report")]


def test_cancelling_a_flow_run_stops_it_like_sigterm(platform):
    """Cancel from the UI (the API call the UI makes): the worker ends the flow run's process; the run keeps a
    checkpoint of what it logged, its MLflow run is marked KILLED and nothing of it keeps running."""
    from dash_core.checkpoint import load_latest

    long_run = TINY | {"iterations": 100_000, "eval": {"every": 100_000, "size": 8}, "tracking": {"experiment": "cancelled"}}
    done, flow_run_id = platform.run_deployment("dash-train/default", {"config": long_run}, watch=False)
    assert done.returncode == 0, done.stderr
    mlflow = client(platform.tracking_uri)
    run_id = None
    for _ in range(1200):
        experiment = mlflow.get_experiment_by_name("cancelled")
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        if runs and len(mlflow.get_metric_history(runs[0].info.run_id, "reward/mean")) >= 2:
            run_id = runs[0].info.run_id
            break
        time.sleep(0.5)
    assert run_id, "the deployed run never logged two iterations"
    flow_processes = psutil.Process(platform.worker.pid).children(recursive=True)
    assert flow_processes

    assert platform.prefect("flow-run", "cancel", str(flow_run_id)).returncode == 0
    for _ in range(600):
        if platform.flow_run(flow_run_id).state.is_final():
            break
        time.sleep(0.5)
    assert platform.flow_run(flow_run_id).state.is_cancelled()
    _, alive = psutil.wait_procs(flow_processes, timeout=60)
    assert not alive, [p.cmdline() for p in alive]

    finished = mlflow.get_run(run_id)
    assert finished.info.status == "KILLED"
    logged = max(m.step for m in mlflow.get_metric_history(run_id, "reward/mean"))
    checkpoint = load_latest(RunStore(platform.store_url, run_id), platform.repository.parent / "restored")
    assert checkpoint is not None and checkpoint.iteration == logged


def test_the_process_pool_template_leaves_outputs_to_the_worker_environment():
    template = json.loads((PROJECT / "deployments" / "process-pool.json").read_text())
    env = template["variables"]["properties"]["env"]["default"]
    assert env["MLFLOW_TRACKING_URI"] is None and env["DASH_STORE_URL"] is None  # null: the worker's own value


@pytest.mark.parametrize("name", ["process-pool.json", "kubernetes-gpu.json"])
def test_base_job_templates_define_every_variable_they_use(name):
    import re

    template = json.loads((PROJECT / "deployments" / name).read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])

