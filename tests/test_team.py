"""Data-parallel learners: two gloo processes (the leader and a real follower) take the step one process takes;
`dashrl train --learners 2` runs the embedded default, fails with a clear message when a learner dies, and resumes."""

import os
import signal
import subprocess

import psutil
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from helpers import DASHRL, TINY, make_batch, start_dashrl, wait_logged
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from dash_core.checkpoint import load_latest
from dash_core.config import DashConfig
from dash_core.follower import follow, start
from dash_core.learner import Learner
from dash_core.models import load_policy
from dash_core.serving import unused_port
from dash_core.store import RunStore
from dash_core.team import Team, dismiss, team

CASES = {
    "rows": ({"micro_batch_size": 2}, "pg", 7),
    "token-budget": ({"tokens_per_micro_batch": 30}, "pg", 7),
    "two-minibatches": ({"micro_batch_size": 3}, "ppo_mini", 7),
    "a-process-without-rows": ({"micro_batch_size": 2}, "pg", 1),
    "fsdp": ({"micro_batch_size": 2, "data_parallel": "fsdp"}, "pg", 7),
    "fsdp-two-minibatches": ({"tokens_per_micro_batch": 30, "data_parallel": "fsdp"}, "ppo_mini", 7),
}


def config_of(learner: dict, rule: str) -> DashConfig:
    return DashConfig.model_validate({"model": TINY.model_dump(), "learner": learner, "algo": {"rule": rule, "ppo_steps": 2}})


def write_batch(store: RunStore, kept: int) -> None:
    _, tokenizer = load_policy(TINY)
    batch = make_batch(tokenizer, n=8)
    store.write_batch(1, batch | {"kept": [i < kept for i in range(8)], "reward": [float(i % 2) for i in range(8)]})


def learn(config: DashConfig, store: RunStore, member: Team | None) -> tuple[dict, dict]:
    """The leader's (or the only) learner after one batch: its weights and metrics."""
    if member:
        start(member, config)
    policy, tokenizer = load_policy(config.model, config.seed)
    learner = Learner(policy, config.learner, config.algo, tokenizer.pad_token_id, team=member)
    metrics = learner.learn(store, store.manifest(1))
    learner.export_weights(policy)  # sharded weights are gathered into the leader's whole policy
    return {k: v.clone() for k, v in policy.state_dict().items()}, metrics


def team_member(rank: int, port: int, case: str, store_root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    member = team()
    torch.set_num_threads(1)
    if rank:
        follow(member)
        return
    torch.save(learn(config_of(*CASES[case][:2]), RunStore(store_root, "run"), member), out)
    dismiss()


@pytest.mark.parametrize("case", CASES)
def test_two_processes_hold_the_weights_one_process_holds(tmp_path, case):
    learner, rule, kept = CASES[case]
    store = RunStore(str(tmp_path), "run")
    write_batch(store, kept)
    alone_weights, alone_metrics = learn(config_of(learner, rule), store, None)
    mp.spawn(team_member, args=(unused_port(), case, str(tmp_path), str(tmp_path / "team.pt")), nprocs=2)
    team_weights, team_metrics = torch.load(tmp_path / "team.pt")
    initial, _ = load_policy(TINY)
    assert all(not torch.equal(w, initial.state_dict()[name]) for name, w in alone_weights.items())  # the step moved all
    gaps = torch.cat([(team_weights[name] - w).abs().flatten() for name, w in alone_weights.items()])
    # Adam divides each gradient entry by its own size, so an entry whose gradient is float32 noise (|g| ~ Adam's
    # eps) moves by up to lr either way; one process with another micro-batch size shows the same few entries.
    assert (gaps > 1e-6).sum() <= gaps.numel() * 1e-4 and gaps.max() <= config_of(learner, rule).learner.lr
    assert team_metrics.keys() == alone_metrics.keys()
    for name, value in alone_metrics.items():
        if not name.startswith(("time/", "train/padding_fraction")):  # padding: the processes' micro-batches differ
            assert team_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_learners_2_train_the_embedded_default_and_resume_after_losing_a_learner(tmp_path):
    trainer = start_dashrl(["train", "--learners", "2"], tmp_path)
    run_id = wait_logged(trainer, tmp_path / "mlflow.db", "dash", 30)
    followers = [p for p in psutil.Process(trainer.pid).children() if "flows.cli" in " ".join(p.cmdline())]
    assert [p.environ()["RANK"] for p in followers] == ["1"]
    followers[0].send_signal(signal.SIGKILL)
    out, err = trainer.communicate(timeout=300)
    said = " ".join((out + err).split())
    assert trainer.returncode == 1, err[-3000:]
    assert f"learner process 1 (pid {followers[0].pid}) stopped (killed by SIGKILL)" in said, err[-3000:]
    assert f"dashrl train --resume {run_id}" in said

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "prefect")}
    resumed = subprocess.run([DASHRL, "train", "--resume", run_id, "--learners", "2"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mlflow = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in mlflow.get_metric_history(run_id, "reward/mean")]
    assert sorted(steps) == list(range(1, 201))  # every iteration once: none lost, none twice
    assert mlflow.get_metric_history(run_id, "eval/arithmetic/accuracy")[-1].value >= 0.8


def test_sharded_learners_resume_to_the_weights_of_an_uninterrupted_run(tmp_path):
    config = {
        "iterations": 4, "task": {"digits": 1, "heldout_fraction": 0.2}, "sampler": {"prompts_per_iteration": 4, "group_size": 4},
        "learner": {"micro_batch_size": 6, "data_parallel": "fsdp"}, "warmup": {"steps": 150, "batch_size": 16, "target_accuracy": None},
        "eval": {"every": 100, "size": 8}, "store": {"url": str(tmp_path / "store")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "fsdp"},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    def train(*args: str) -> None:
        trainer = start_dashrl(["train", "--config", str(tmp_path / "run.yaml"), "--learners", "2", *args], tmp_path)
        _, err = trainer.communicate(timeout=600)
        assert trainer.returncode == 0, err[-3000:]

    def weights(run_id: str) -> dict[str, torch.Tensor]:
        checkpoint = load_latest(RunStore(str(tmp_path / "store"), run_id), tmp_path / run_id)
        assert checkpoint.iteration == 4
        return load_file(checkpoint.model_dir / "model.safetensors")

    train()
    train("--set", "iterations=2")
    mlflow = MlflowClient(config["tracking"]["uri"])
    straight, interrupted = (run.info.run_id for run in mlflow.search_runs(mlflow.get_experiment_by_name("fsdp").experiment_id, order_by=["start_time"]))
    train("--resume", interrupted)
    assert [m.step for m in mlflow.get_metric_history(interrupted, "reward/mean")] == [1, 2, 3, 4]
    for name, tensor in weights(straight).items():
        torch.testing.assert_close(weights(interrupted)[name], tensor, rtol=0, atol=0, msg=name)
