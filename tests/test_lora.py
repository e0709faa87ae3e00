"""LoRA runs (learner.lora): only the adapter trains and moves to the samplers, checkpoints hold the adapter and name
its base, a killed run resumes to the uninterrupted weights, and the KL reference is the base with the adapter off."""

import json
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from dash_core import loop
from dash_core.config import DashConfig, LoraConfig
from dash_core.evaluation import evaluate_model
from dash_core.learner import Learner
from dash_core.models import adapted, adapter_weights, base_weights, load_policy
from dash_core.run import TrainingRun
from dash_core.samplers import SamplingParams
from tests.helpers import TINY, max_gap
from tests.test_resume import killed_run, resumed, steps

LORA = {"rank": 8, "alpha": 16.0}


@pytest.fixture
def config(small_config) -> DashConfig:
    small_config.iterations = 4
    small_config.checkpoint.every = 2
    small_config.algo.tau = 0.0  # every iteration updates the weights
    small_config.learner.lora = LoraConfig(**LORA)
    small_config.learner.lr = 3e-3
    return small_config


def uninterrupted(config: DashConfig, iterations: int) -> TrainingRun:
    run = TrainingRun.start(config)
    loop.warm_up(run)
    base = {name: tensor.clone() for name, tensor in base_weights(run.policy).items()}
    loop.iterations(run, iterations)
    run.save()
    run.finish()
    assert all(torch.equal(base[name], tensor) for name, tensor in base_weights(run.policy).items()), "the base moved"
    return run


def test_a_lora_run_trains_only_the_adapter_checkpoints_it_and_resumes_to_the_same_weights(config):
    expected = uninterrupted(config.model_copy(deep=True), 4)
    gaps = MlflowClient(config.tracking.uri).get_metric_history(expected.run_id, "logprob_gap/max")
    assert len(gaps) == 4 and max(m.value for m in gaps) < 1e-4  # the sampler samples the adapted policy itself
    adapter = adapter_weights(expected.policy)
    assert any(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name), (
        "the adapter never learned"
    )
    trainable = sum(p.numel() for p in expected.learner.optimizer.param_groups[0]["params"])
    assert (
        trainable == sum(t.numel() for t in adapter.values()) < sum(p.numel() for p in expected.policy.parameters()) / 5
    )

    run_id = killed_run(config, "loop.iterations(run, 3); run.checkpointer.wait(); kill()")
    checkpoint = os.path.join(config.store.url, run_id, "checkpoints", "iter_000002")
    files = set(os.listdir(checkpoint))
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "base.json",
    } <= files and "model.safetensors" not in files
    base = json.load(open(os.path.join(checkpoint, "base.json")))
    assert base["source"].endswith("/model") and len(base["sha256"]) == 64  # the warm-up this run started from

    run = resumed(config, run_id, 4)
    assert steps(config, run_id, "train/loss") == [1, 2, 3, 4]
    assert adapted(run.policy)
    assert all(torch.equal(adapter[name], tensor) for name, tensor in adapter_weights(run.policy).items())

    policy, _ = load_policy(config.model, config.seed, path=checkpoint)  # the base it names, then the adapter
    assert adapted(policy) and set(adapter_weights(policy)) == set(adapter)
    scored = config.model_copy(update={"model": config.model.model_copy(update={"name": checkpoint})})
    assert evaluate_model(scored)["arithmetic"].metrics["eval/arithmetic/accuracy"] >= 0  # what `dashrl eval` runs


def test_only_the_adapter_moves_to_a_private_sampler(config):
    config.iterations = 2
    config.sampler.max_staleness = 1  # rollouts run ahead: the sampler keeps its own copy of the weights
    run = TrainingRun.start(config)
    loop.warm_up(run)
    loop.iterations(run, 2)
    run.finish()
    synced = MlflowClient(config.tracking.uri).get_metric_history(run.run_id, "sync/bytes")
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter_weights(run.policy).values())
    assert [m.value for m in synced] == [adapter_bytes, adapter_bytes]
    # the private copy samples the adapted policy after an adapter-only sync
    with torch.no_grad():
        for name, param in run.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    run.sampler.load_weights(run.policy, adapter_only=True)
    prompts = [run.tokenizer("1+2=")["input_ids"], run.tokenizer("3+4=")["input_ids"]]
    generations = run.sampler.generate(prompts, SamplingParams(n=2, max_new_tokens=6))
    assert max_gap(run.policy, prompts, generations, 2, run.tokenizer.pad_token_id) < 1e-4


def test_the_kl_reference_of_a_lora_policy_is_its_base_with_the_adapter_off():
    policy, tokenizer = load_policy(TINY)
    from dash_core.config import AlgoConfig, LearnerConfig
    from dash_core.models import add_lora

    add_lora(policy, LoraConfig(**LORA))
    learner = Learner(policy, LearnerConfig(micro_batch_size=8), AlgoConfig(beta=0.1), tokenizer.pad_token_id)
    assert not learner.needs_reference  # no second copy of the model
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids = tokenizer("12+3=")["input_ids"]
    with learner._reference() as reference:
        off = reference(torch.tensor([ids])).logits
    on = policy(torch.tensor([ids])).logits
    policy.disable_adapters()
    base = policy(torch.tensor([ids])).logits
    policy.enable_adapters()
    assert torch.equal(off, base) and not torch.allclose(on, base)
    assert all(p.requires_grad == (".lora_" in n) for n, p in policy.named_parameters())
