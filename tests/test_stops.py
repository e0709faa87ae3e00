"""Clean stops of `dashrl train`, as users stop it: Ctrl-C from a terminal (SIGINT to the trainer's process group)
and SIGTERM end it with its checkpoint kept, the resume hint printed and no traceback; nothing it started outlives
it, also after kill -9."""

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import start_dashrl, wait_logged
from mlflow.tracking import MlflowClient

from dash_core.checkpoint import load_latest
from dash_core.store import RunStore


def start_training(tmp_path: Path, learners: int = 1) -> tuple[subprocess.Popen, str, str]:
    """`dashrl train` as a terminal starts it, with `learners` learner processes; returns once it has logged two
    iterations (with several learners, after a warm-up long enough that the iterations have something to learn)."""
    config = {
        "iterations": 100_000, "threads": 1, "task": {"digits": 1, "heldout_fraction": 0.2},
        "sampler": {"prompts_per_iteration": 4, "group_size": 4}, "warmup": {"steps": 20, "batch_size": 8, "target_accuracy": None},
        "eval": {"every": 100_000, "size": 8}, "store": {"url": str(tmp_path / "store")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "stops"},
    }  # fmt: skip
    if learners > 1:
        config["warmup"] |= {"steps": 150, "batch_size": 16}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    trainer = start_dashrl(["train", "--config", str(tmp_path / "run.yaml"), "--learners", str(learners)], tmp_path)
    return trainer, wait_logged(trainer, tmp_path / "mlflow.db", "stops", 2), config["tracking"]["uri"]


def family(trainer: subprocess.Popen) -> list[psutil.Process]:
    return [psutil.Process(trainer.pid), *psutil.Process(trainer.pid).children(recursive=True)]


def all_gone(processes: list[psutil.Process]) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=30)
    return not alive


# After SIGTERM, Prefect reports the crash, then lets the signal end the process, as the default action would.
CTRL_C, SIGTERM = (lambda p: os.killpg(p.pid, signal.SIGINT), 130), (lambda p: p.terminate(), -15)


@pytest.mark.parametrize(("stop", "code", "learners"), [(*CTRL_C, 1), (*SIGTERM, 1), (*CTRL_C, 2)],
                         ids=["ctrl-c", "sigterm", "ctrl-c-2-learners"])  # fmt: skip
def test_a_stop_keeps_the_checkpoint_prints_the_hint_and_leaves_nothing(tmp_path, stop, code, learners):
    trainer, run_id, uri = start_training(tmp_path, learners)
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


@pytest.mark.parametrize("learners", [1, 2])
def test_nothing_outlives_a_killed_trainer(tmp_path, learners):
    trainer, _, _ = start_training(tmp_path, learners)
    processes = family(trainer)
    trainer.kill()
    trainer.communicate()
    assert all_gone(processes)


@pytest.mark.parametrize("delay_s", [0.3, 1.5, 4.0, 8.0])
def test_ctrl_c_during_start_up_is_one_line(tmp_path, delay_s):
    """Imports, config checks, the Prefect server's start, the flow's start: a Ctrl-C at any of them is one line."""
    trainer = start_dashrl(["train", "--set", f"store.url={tmp_path / 'store'}", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], tmp_path)
    time.sleep(delay_s)  # a moment of start-up, not a bound on anything
    os.killpg(trainer.pid, signal.SIGINT)
    _, err = trainer.communicate(timeout=120)
    assert trainer.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "dashrl: interrupted", err[-3000:]
