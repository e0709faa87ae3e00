"""Clean stops of `dashrl train`, as users stop it: Ctrl-C from a terminal (SIGINT to the trainer's process group)
and SIGTERM end it with its checkpoint kept, the resume hint printed and no traceback; nothing it started outlives
it, also after kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dash_core.checkpoint import load_latest
from dash_core.store import RunStore
from dash_core.tracking import client

DASHRL = str(Path(sys.executable).with_name("dashrl"))


def start_training(tmp_path: Path) -> tuple[subprocess.Popen, str, str]:
    """`dashrl train` in its own session, as a terminal starts it; returns once it has logged two iterations."""
    config = {
        "iterations": 100_000, "threads": 1, "task": {"digits": 1, "heldout_fraction": 0.2},
        "sampler": {"prompts_per_iteration": 4, "group_size": 4}, "warmup": {"steps": 20, "batch_size": 8, "target_accuracy": None},
        "eval": {"every": 100_000, "size": 8}, "store": {"url": str(tmp_path / "store")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "stops"},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "prefect")}
    trainer = subprocess.Popen([DASHRL, "train", "--config", str(tmp_path / "run.yaml")], env=env, cwd=tmp_path,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    uri = config["tracking"]["uri"]
    for _ in range(1200):
        assert trainer.poll() is None, trainer.communicate()[1][-3000:]
        mlflow = client(uri) if (tmp_path / "mlflow.db").exists() else None  # waits while the trainer creates it
        experiment = mlflow and mlflow.get_experiment_by_name("stops")
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        if runs and len(mlflow.get_metric_history(runs[0].info.run_id, "reward/mean")) >= 2:
            return trainer, runs[0].info.run_id, uri
        time.sleep(0.5)
    raise AssertionError("the run never logged two iterations")


def family(trainer: subprocess.Popen) -> list[psutil.Process]:
    return [psutil.Process(trainer.pid), *psutil.Process(trainer.pid).children(recursive=True)]


def all_gone(processes: list[psutil.Process]) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=30)
    return not alive


# After SIGTERM, Prefect reports the crash, then lets the signal end the process, as the default action would.
@pytest.mark.parametrize(("stop", "code"), [(lambda p: os.killpg(p.pid, signal.SIGINT), 130), (lambda p: p.terminate(), -15)],
                         ids=["ctrl-c", "sigterm"])  # fmt: skip
def test_a_stop_keeps_the_checkpoint_prints_the_hint_and_leaves_nothing(tmp_path, stop, code):
    trainer, run_id, uri = start_training(tmp_path)
    processes = family(trainer)
    assert any("flows.prefect_api" in " ".join(p.cmdline()) for p in processes)  # the run's own Prefect server
    stop(trainer)
    out, err = trainer.communicate(timeout=120)
    assert trainer.returncode == code, err[-3000:]
    assert f"dashrl train --resume {run_id}" in " ".join((out + err).split()) and "Traceback" not in err, err[-3000:]
    assert all_gone(processes)
    logged = max(m.step for m in MlflowClient(uri).get_metric_history(run_id, "reward/mean"))
    assert load_latest(RunStore(str(tmp_path / "store"), run_id), tmp_path / "restored").iteration == logged
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_nothing_outlives_a_killed_trainer(tmp_path):
    trainer, _, _ = start_training(tmp_path)
    processes = family(trainer)
    trainer.kill()
    trainer.communicate()
    assert all_gone(processes)
