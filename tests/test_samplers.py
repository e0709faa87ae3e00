"""The sampler interface and its builders: sampling parameters from config, a policy with its sampler, and what
an in-process backend answers to the calls only inference servers serve."""

import pytest
import torch
from helpers import TINY
from transformers.cache_utils import DynamicLayer

from dash_core.config import DashConfig, ModelConfig, SamplerConfig
from dash_core.evaluation import eval_sampling
from dash_core.models import load_policy
from dash_core.samplers import SamplingParams, TransformersSampler, policy_sampler
from dash_core.samplers.transformers_backend import _GrowingLayer


def test_sampling_params_come_from_the_sampler_config():
    cfg = SamplerConfig(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=5, stop=["\n"])
    assert SamplingParams.from_config(cfg, 4) == SamplingParams(4, 24, 0.7, 0.9, 5, ("\n",))
    assert SamplingParams.from_config(cfg, 2, temperature=1.0, max_new_tokens=8) == SamplingParams(2, 8, 1.0, 0.9, 5, ("\n",))


def test_an_evaluation_samples_at_its_own_temperature_and_length():
    config = DashConfig.model_validate(
        {"sampler": {"max_new_tokens": 24, "temperature": 0.7, "top_k": 5}, "eval": {"n": 3, "temperature": 1.0}}
    )
    assert eval_sampling(config) == SamplingParams(3, 24, 1.0, 1.0, 5, ())
    config.eval.max_new_tokens = 40
    assert eval_sampling(config).max_new_tokens == 40


def test_policy_sampler_samples_from_the_policy_it_loads(tmp_path):
    policy, tokenizer, sampler = policy_sampler(ModelConfig(), SamplerConfig(batch_size=16), 0, str(tmp_path))
    assert isinstance(sampler, TransformersSampler) and sampler.policy is policy and sampler.batch_size == 16
    (generation,) = sampler.generate([tokenizer.encode("1+2=")], SamplingParams(max_new_tokens=4))
    assert len(generation.token_ids) == len(generation.logprobs) <= 4


def test_an_in_process_backend_has_no_servers_to_add_list_or_drop(tmp_path):
    sampler = policy_sampler(ModelConfig(), SamplerConfig(), 0, str(tmp_path)).sampler
    assert sampler.servers is None and not sampler.events
    with pytest.raises(TypeError, match="sampler.backend=remote"):
        sampler.add_servers(["http://127.0.0.1:8000"])


def test_the_fixed_shape_decode_loop_of_gpus_samples_what_the_pruning_one_does():
    """The GPU path (static KV cache, a prefill per completion, finished rows kept, full-length mask), run here
    without compilation: greedy completions and their log-probabilities equal the default loop's."""
    policy, tokenizer = load_policy(TINY, 0)
    prompts = [tokenizer(f"{i}+{3 * i}=")["input_ids"] for i in range(5)] + [tokenizer("123+4=")["input_ids"]]
    greedy = SamplingParams(n=3, temperature=0, max_new_tokens=12)
    pruning = TransformersSampler(policy, tokenizer).generate(prompts, greedy)
    fixed = TransformersSampler(policy, tokenizer, static=True).generate(prompts, greedy)
    assert [g.token_ids for g in fixed] == [g.token_ids for g in pruning]
    assert [g.finish_reason for g in fixed] == [g.finish_reason for g in pruning]
    for a, b in zip(fixed, pruning):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_the_growing_kv_cache_holds_what_transformers_dynamic_cache_holds():
    """The CPU decode loop's preallocated cache against the concatenating one it replaces, through a prompt
    prefill, a copy per completion, a decode step, the pruning of finished rows and another step."""
    growing, dynamic = _GrowingLayer(capacity=8), DynamicLayer()
    prompt, step, after_pruning = torch.randn(2, 2, 3, 5, 16), torch.randn(2, 6, 3, 1, 16), torch.randn(2, 3, 3, 1, 16)
    for layer in (growing, dynamic):
        layer.update(*prompt)  # 2 prompts, 3 heads, 5 positions, head dim 16
        layer.batch_repeat_interleave(3)
        layer.update(*step)
        layer.batch_select_indices(torch.tensor([0, 2, 5]))
        keys, values = layer.update(*after_pruning)
    assert growing.get_seq_length() == dynamic.get_seq_length() == 7
    assert torch.equal(keys, dynamic.keys) and torch.equal(values, dynamic.values)
    assert torch.equal(growing.keys, dynamic.keys) and torch.equal(growing.values, dynamic.values)
