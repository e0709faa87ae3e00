"""Helpers shared by the tests."""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from dash_core.config import ModelConfig, TinyModelConfig
from dash_core.learner import completion_logprobs

TINY = ModelConfig(tiny=TinyModelConfig(hidden_size=64, num_heads=1, intermediate_size=128))


def max_gap(policy, prompts, generations, n, pad_id) -> float:
    """Largest |sampler logprob - learner logprob| over all completion tokens (completion i*n+j is prompt i's)."""
    completions = [g.token_ids for g in generations]
    with torch.no_grad():
        logp, mask = completion_logprobs(policy, [p for p in prompts for _ in range(n)], completions, pad_id)
    sampled = torch.zeros_like(logp)
    for i, g in enumerate(generations):
        sampled[i, : len(g.logprobs)] = torch.tensor(g.logprobs)
    return ((logp - sampled).abs() * mask).max().item()


def assert_on_policy_run(tracking_uri: str, run_id: str, backend: str) -> None:
    """A finished 2-iteration run logged a tiny sampler-vs-learner logprob gap at every iteration."""
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    gaps = client.get_metric_history(run_id, "logprob_gap/mean")
    assert sorted(m.step for m in gaps) == [1, 2]
    print(f"flow logprob_gap/mean on {backend}: {[m.value for m in gaps]}")
    assert all(m.value < 1e-3 for m in gaps)


def make_batch(tokenizer, n=8):
    prompts = [tokenizer(f"{i}{i}+{i}=")["input_ids"] for i in range(n)]
    completions = [tokenizer("1" * (1 + i % 4))["input_ids"] for i in range(n)]
    return {
        "prompt_ids": prompts,
        "completion_ids": completions,
        "advantage": [(-1.0) ** i * (0.5 + i / 10) for i in range(n)],
        "sampler_logprobs": [[-1.0] * len(c) for c in completions],
    }


def chunks_of(batch, size):
    n = len(batch["prompt_ids"])
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


DASHRL = str(Path(sys.executable).with_name("dashrl"))


def start_dashrl(args: list[str], cwd: Path) -> subprocess.Popen:
    """`dashrl` in its own session, as a terminal starts it, with its own Prefect home and private API server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(cwd / "prefect")}
    return subprocess.Popen([DASHRL, *args], env=env, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_logged(trainer: subprocess.Popen, database: Path, experiment: str, iterations: int) -> str:
    """The id of the trainer's MLflow run, once it has logged `iterations` iterations."""
    from dash_core.tracking import client

    for _ in range(2400):
        assert trainer.poll() is None, trainer.communicate()[1][-3000:]
        mlflow = client(f"sqlite:///{database}") if database.exists() else None  # waits while the trainer creates it
        found = mlflow and mlflow.get_experiment_by_name(experiment)
        runs = mlflow.search_runs([found.experiment_id]) if found else []
        if runs and len(mlflow.get_metric_history(runs[0].info.run_id, "reward/mean")) >= iterations:
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"the run never logged {iterations} iterations")
