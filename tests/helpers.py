"""Helpers shared by the learner, rule and sampler tests."""

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
