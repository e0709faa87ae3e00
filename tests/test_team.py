"""Several processes, one loop (SPMD), over gloo: two processes take the step one process takes, sample the batch one
process samples, and `dashrl train --learners 2` fails with the rank named when a process dies and resumes with
another number of processes, every iteration once."""

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

from dash_core import loop
from dash_core.checkpoint import load_latest
from dash_core.config import DashConfig
from dash_core.learner import Learner
from dash_core.models import add_lora, load_policy
from dash_core.run import TrainingRun
from dash_core.serving import unused_port
from dash_core.store import RunStore
from dash_core.team import Team, team

CASES = {
    "rows": ({"micro_batch_size": 2}, "pg", 7),
    "token-budget": ({"tokens_per_micro_batch": 30}, "pg", 7),
    "two-minibatches": ({"micro_batch_size": 3}, "ppo_mini", 7),
    "a-process-without-rows": ({"micro_batch_size": 2}, "pg", 1),
    "fsdp": ({"micro_batch_size": 2, "data_parallel": "fsdp"}, "pg", 7),
    "fsdp-two-minibatches": ({"tokens_per_micro_batch": 30, "data_parallel": "fsdp"}, "ppo_mini", 7),
    "lora": ({"micro_batch_size": 2, "lora": {"rank": 4, "alpha": 8.0}, "lr": 1e-2}, "pg", 7),
}


def config_of(learner: dict, rule: str) -> DashConfig:
    return DashConfig.model_validate(
        {"model": TINY.model_dump(), "learner": learner, "algo": {"rule": rule, "ppo_steps": 2}}
    )


def write_batch(store: RunStore, kept: int) -> None:
    _, tokenizer = load_policy(TINY)
    batch = make_batch(tokenizer, n=8)
    store.write_batch(1, batch | {"kept": [i < kept for i in range(8)], "reward": [float(i % 2) for i in range(8)]})


def learn(config: DashConfig, store: RunStore, member: Team) -> tuple[dict, dict]:
    """A process's learner after one batch: its whole policy's weights and the metrics."""
    policy, tokenizer = load_policy(config.model, config.seed)
    if config.learner.lora:
        add_lora(policy, config.learner.lora)  # its random init is the same in every process: one seed
    learner = Learner(policy, config.learner, config.algo, tokenizer.pad_token_id, team=member)
    metrics = learner.learn(store, store.manifest(1))
    learner.export_weights(policy)  # sharded weights are gathered into every process's whole policy
    return {k: v.clone() for k, v in policy.state_dict().items()}, metrics


def join_team(rank: int, port: int) -> Team:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    return team()


def team_member(rank: int, port: int, case: str, store_root: str, out: str) -> None:
    member = join_team(rank, port)
    torch.save(learn(config_of(*CASES[case][:2]), RunStore(store_root, "run"), member), f"{out}.{rank}")
    member.disband()


@pytest.mark.parametrize("case", CASES)
def test_two_processes_hold_the_weights_one_process_holds(tmp_path, case):
    learner, rule, kept = CASES[case]
    store = RunStore(str(tmp_path), "run")
    write_batch(store, kept)
    alone_weights, alone_metrics = learn(config_of(learner, rule), store, team())
    mp.spawn(team_member, args=(unused_port(), case, str(tmp_path), str(tmp_path / "team.pt")), nprocs=2)
    (first_weights, team_metrics), (second_weights, _) = (torch.load(tmp_path / f"team.pt.{rank}") for rank in (0, 1))
    initial, _ = load_policy(TINY)
    if learner.get("lora"):  # the step moved the adapter (B starts at 0) and no base weight
        base = {name.replace(".base_layer.", "."): w for name, w in alone_weights.items() if ".lora_" not in name}
        assert all(torch.equal(w, initial.state_dict()[name]) for name, w in base.items())
        assert all(w.abs().sum() > 0 for name, w in alone_weights.items() if "lora_B" in name)
    else:
        assert all(
            not torch.equal(w, initial.state_dict()[name]) for name, w in alone_weights.items()
        )  # the step moved all
    for name, w in first_weights.items():  # every process holds the same whole weights
        assert torch.equal(second_weights[name], w), name
    gaps = torch.cat([(first_weights[name] - w).abs().flatten() for name, w in alone_weights.items()])
    # Adam divides each gradient entry by its own size, so an entry whose gradient is float32 noise (|g| ~ Adam's
    # eps) moves by up to lr either way; one process with another micro-batch size shows the same few entries.
    assert (gaps > 1e-6).sum() <= gaps.numel() * 1e-4 and gaps.max() <= config_of(learner, rule).learner.lr
    assert team_metrics.keys() == alone_metrics.keys()
    for name, value in alone_metrics.items():
        if not name.startswith(("time/", "train/padding_fraction")):  # padding: the processes' micro-batches differ
            assert team_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def small_run(tmp_path, name: str) -> DashConfig:
    return DashConfig.model_validate({
        "iterations": 3, "task": {"digits": 1, "heldout_fraction": 0.2}, "sampler": {"prompts_per_iteration": 5, "group_size": 4},
        "learner": {"micro_batch_size": 6}, "warmup": {"steps": 150, "batch_size": 16, "target_accuracy": None},
        "eval": {"every": 2, "size": 7, "n": 2}, "store": {"url": str(tmp_path / name)},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": name},
    })  # fmt: skip


def run_loop(rank: int, port: int, config: DashConfig) -> None:
    """One process of a 2-process run of the library's loop, as `dashrl train --learners 2` runs it, less Prefect."""
    member = join_team(rank, port)
    run = TrainingRun.start(config) if member.leads else TrainingRun.join()
    loop.train(run)
    del run
    member.disband()


def in_order(table) -> list[tuple]:
    """A stored batch's rows, each group's samples in a canonical order (kept rows come first in each part)."""
    columns = ["group", "completion_ids", "reward", "advantage", "kept", "prompt_ids", "policy_version"]
    rows = zip(*(table.column(c).to_pylist() for c in columns))
    return sorted((g, tuple(c), r, round(a, 5), k, tuple(p), v) for g, c, r, a, k, p, v in rows)


def test_the_batch_and_the_steps_do_not_depend_on_the_number_of_processes(tmp_path):
    alone, pair = small_run(tmp_path, "alone"), small_run(tmp_path, "pair")
    loop.train(TrainingRun.start(alone))
    mp.spawn(run_loop, args=(unused_port(), pair), nprocs=2)
    mlflow = MlflowClient(alone.tracking.uri)
    (alone_id,), (pair_id,) = (
        [r.info.run_id for r in mlflow.search_runs([mlflow.get_experiment_by_name(n).experiment_id])]
        for n in ("alone", "pair")
    )
    stores = RunStore(alone.store.url, alone_id), RunStore(pair.store.url, pair_id)
    for iteration in (1, 2, 3):
        one, two = (store.read_batch(iteration) for store in stores)
        assert len(stores[1].manifest(iteration).parts) == 2  # each process wrote its groups
        assert in_order(two) == in_order(one), iteration
        assert stores[1].manifest(iteration).metrics == pytest.approx(stores[0].manifest(iteration).metrics, rel=1e-6)
    for key in ("train/loss", "logprob_gap/mean", "eval/arithmetic/accuracy", "eval/arithmetic/sampled_accuracy"):
        values = [{m.step: m.value for m in mlflow.get_metric_history(i, key)} for i in (alone_id, pair_id)]
        assert values[1] == pytest.approx(values[0], rel=1e-5, abs=1e-6), key  # the gap: float noise, ~1e-7
    weights = [load_file(load_latest(s, tmp_path / s.run_id).model_dir / "model.safetensors") for s in stores]
    gaps = torch.cat([(weights[1][name] - w).abs().flatten() for name, w in weights[0].items()])
    assert (gaps > 1e-6).sum() <= gaps.numel() * 1e-4 and gaps.max() <= 3 * alone.learner.lr


def test_learners_2_train_the_embedded_default_and_resume_alone_after_losing_a_process(tmp_path):
    trainer = start_dashrl(["train", "--learners", "2"], tmp_path)
    run_id = wait_logged(trainer, tmp_path / "mlflow.db", "dash", 30)
    others = [p for p in psutil.Process(trainer.pid).children() if "flows.cli" in " ".join(p.cmdline())]
    assert [p.environ()["RANK"] for p in others] == ["1"]
    others[0].send_signal(signal.SIGKILL)
    out, err = trainer.communicate(timeout=300)
    said = " ".join((out + err).split())
    assert trainer.returncode == 1, err[-3000:]
    assert f"process 1 (pid {others[0].pid}) stopped (killed by SIGKILL)" in said, err[-3000:]
    assert f"dashrl train --resume {run_id}" in said

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "prefect")}
    resumed = subprocess.run(
        [DASHRL, "train", "--resume", run_id], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
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
    straight, interrupted = (
        run.info.run_id
        for run in mlflow.search_runs(mlflow.get_experiment_by_name("fsdp").experiment_id, order_by=["start_time"])
    )
    train("--resume", interrupted)
    assert [m.step for m in mlflow.get_metric_history(interrupted, "reward/mean")] == [1, 2, 3, 4]
    for name, tensor in weights(straight).items():
        torch.testing.assert_close(weights(interrupted)[name], tensor, rtol=0, atol=0, msg=name)
