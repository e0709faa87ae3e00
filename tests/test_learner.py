import copy
import math

import pytest
import torch
from helpers import TINY, chunks_of, make_batch

from dash_core.config import AlgoConfig, LearnerConfig
from dash_core.learner import Learner, NonFiniteLossError, by_length, completion_logprobs
from dash_core.models import load_policy
from dash_core.rules import RULES, objective
from dash_core.samplers import SamplingParams, TransformersSampler

PG = AlgoConfig()


@pytest.fixture(scope="module")
def policy_and_tokenizer():
    return load_policy(TINY, seed=0)


def test_pg_loss_matches_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    chunk = {"advantage": torch.tensor([2.0, -1.0]), "sampler_logprobs": torch.zeros(2, 3)}
    # summed: -(2 * (-1 - 2) + (-1) * (-1.5)) = 4.5; the learner divides by the 5 tokens -> 0.9
    loss, kl, clipped = objective(RULES["pg"], logp, mask, chunk, None, clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(4.5) and kl.item() == 0 and clipped.item() == 0


def test_completion_logprobs_match_a_direct_forward(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    prompt, completion = tokenizer("12+3=")["input_ids"], tokenizer("51")["input_ids"]
    logp, mask = completion_logprobs(policy, [prompt, prompt[:2]], [completion, completion + completion], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = policy(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
    expected = [logits[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion)]
    assert logp[0, :2].tolist() == pytest.approx(expected, abs=1e-5)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def full_logits_logprobs(policy, prompts, completions, pad_id):
    """The computation the lean one replaces: logits at every position over the whole vocabulary, then log-softmax."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    logp = policy(input_ids=ids, attention_mask=attention).logits.log_softmax(-1)
    table = torch.zeros(len(rows), max(map(len, completions)))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        table[i, : len(c)] = logp[i, len(p) - 1 + torch.arange(len(c)), torch.tensor(c)]
    return table


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1024])
def test_lean_logprobs_and_their_gradients_equal_the_full_logits_computation(policy_and_tokenizer, chunk_tokens):
    policy, tokenizer = policy_and_tokenizer
    batch = make_batch(tokenizer)
    lean_policy, full_policy = copy.deepcopy(policy), copy.deepcopy(policy)
    lean, mask = completion_logprobs(lean_policy, batch["prompt_ids"], batch["completion_ids"], tokenizer.pad_token_id, chunk_tokens)
    full = full_logits_logprobs(full_policy, batch["prompt_ids"], batch["completion_ids"], tokenizer.pad_token_id)
    assert torch.allclose(lean, full, atol=1e-5)
    weights = torch.randn(lean.shape, generator=torch.Generator().manual_seed(0)) * mask  # any loss of the log-probs
    (lean * weights).sum().backward()
    (full * weights).sum().backward()
    for a, b in zip(lean_policy.parameters(), full_policy.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4)


def test_packed_sequences_give_the_padded_log_probs_and_gradients(policy_and_tokenizer):
    """No padding: the rows end to end in one sequence, attention kept within each by its position ids."""
    policy, tokenizer = policy_and_tokenizer
    batch = make_batch(tokenizer)
    padded_policy, packed_policy = copy.deepcopy(policy), copy.deepcopy(policy)
    args = (batch["prompt_ids"], batch["completion_ids"], tokenizer.pad_token_id)
    padded, mask = completion_logprobs(padded_policy, *args)
    packed, packed_mask = completion_logprobs(packed_policy, *args, packed=True)
    assert torch.equal(mask, packed_mask) and torch.allclose(packed, padded, atol=1e-5)
    weights = torch.randn(padded.shape, generator=torch.Generator().manual_seed(0)) * mask
    (padded * weights).sum().backward()
    (packed * weights).sum().backward()
    for a, b in zip(padded_policy.parameters(), packed_policy.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4)


def test_chunked_accumulation_gives_the_full_batch_gradient(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    batch = make_batch(tokenizer)
    cfg = LearnerConfig(grad_clip=1e9, lr=1e-3)
    full = Learner(copy.deepcopy(policy), cfg, PG, tokenizer.pad_token_id)
    chunked = Learner(copy.deepcopy(policy), cfg, PG, tokenizer.pad_token_id)
    stats_full = full.step(chunks_of(batch, 8))
    stats_chunked = chunked.step(chunks_of(batch, 3))
    assert stats_chunked.loss_sum == pytest.approx(stats_full.loss_sum, rel=1e-5)
    assert stats_chunked.grad_norm == pytest.approx(stats_full.grad_norm, rel=1e-4)
    for a, b in zip(full.policy.parameters(), chunked.policy.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4)
        assert torch.allclose(a, b, atol=1e-6)


def test_step_changes_weights_and_reports_tokens(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    learner = Learner(copy.deepcopy(policy), LearnerConfig(lr=1e-2), PG, tokenizer.pad_token_id)
    before = [p.detach().clone() for p in learner.policy.parameters()]
    batch = make_batch(tokenizer)
    stats = learner.step(chunks_of(batch, 4))
    assert stats.sequences == 8 and stats.tokens == sum(len(c) for c in batch["completion_ids"])
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters()))


def test_non_finite_loss_stops_without_touching_weights(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    learner = Learner(copy.deepcopy(policy), LearnerConfig(), PG, tokenizer.pad_token_id)
    before = [p.detach().clone() for p in learner.policy.parameters()]
    batch = make_batch(tokenizer, 4)
    batch["advantage"][1] = math.nan
    with pytest.raises(NonFiniteLossError, match="step was not taken.*Lower learner.lr"):
        learner.step(chunks_of(batch, 2))
    assert all(torch.equal(a, b) for a, b in zip(before, learner.policy.parameters()))


@pytest.mark.parametrize("shaping", [{}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}])
def test_sampler_logprobs_match_the_learner_recomputation(policy_and_tokenizer, shaping):
    # Logprobs are of the raw distribution even when temperature / top-k / top-p shape the sampling.
    policy, tokenizer = policy_and_tokenizer
    sampler = TransformersSampler(policy, tokenizer, batch_size=6)
    prompts = [tokenizer(text)["input_ids"] for text in ["1+2=", "33+44=", "5-5="]]
    torch.manual_seed(0)
    gens = sampler.generate(prompts, SamplingParams(n=4, max_new_tokens=6, **shaping))
    assert len(gens) == 12 and all(g.finish_reason in ("stop", "length") for g in gens)
    assert all(len(g.token_ids) == len(g.logprobs) for g in gens)
    prompt_ids = [p for p in prompts for _ in range(4)]
    logp, mask = completion_logprobs(policy, prompt_ids, [g.token_ids for g in gens], tokenizer.pad_token_id)
    for row, g in enumerate(gens):
        assert logp[row, : len(g.logprobs)].tolist() == pytest.approx(g.logprobs, abs=1e-4)


def test_stop_strings_end_completions(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    sampler = TransformersSampler(policy, tokenizer)
    prompts = [tokenizer("12+3=")["input_ids"]]
    torch.manual_seed(0)
    free = sampler.generate(prompts, SamplingParams(n=8, max_new_tokens=12))
    stop = next(c for g in free for c in g.text[1:4] if c.strip())  # a character the model does produce
    torch.manual_seed(0)
    stopped = sampler.generate(prompts, SamplingParams(n=8, max_new_tokens=12, stop=(stop,)))
    hits = [g for g in stopped if g.finish_reason == "stop" and g.text.endswith(stop)]
    assert hits and all(len(g.token_ids) == len(g.logprobs) and tokenizer.pad_token_id not in g.token_ids[-1:] for g in hits)


def _gradients(learner: Learner, batch) -> list[torch.Tensor]:
    learner.step(chunks_of(batch, 3))
    return [p.grad.detach().clone() for p in learner.policy.parameters()]


def test_activation_checkpointing_gives_the_same_gradients(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    batch = make_batch(tokenizer)
    plain = _gradients(Learner(copy.deepcopy(policy), LearnerConfig(grad_clip=1e9), PG, tokenizer.pad_token_id), batch)
    recomputed_cfg = LearnerConfig(grad_clip=1e9, activation_checkpointing=True)
    recomputed = _gradients(Learner(copy.deepcopy(policy), recomputed_cfg, PG, tokenizer.pad_token_id), batch)
    for a, b in zip(plain, recomputed):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_bf16_mixed_keeps_float32_weights_and_state_and_follows_the_fp32_gradient(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    batch = make_batch(tokenizer)
    exact = torch.cat([g.flatten() for g in _gradients(Learner(copy.deepcopy(policy), LearnerConfig(grad_clip=1e9), PG, tokenizer.pad_token_id), batch)])
    mixed_learner = Learner(copy.deepcopy(policy), LearnerConfig(grad_clip=1e9, precision="bf16-mixed"), PG, tokenizer.pad_token_id)
    mixed = torch.cat([g.flatten() for g in _gradients(mixed_learner, batch)])
    assert all(p.dtype == torch.float32 for p in mixed_learner.policy.parameters())
    assert all(v.dtype == torch.float32 for state in mixed_learner.optimizer.state.values() for v in state.values() if v.dim())
    assert torch.nn.functional.cosine_similarity(exact, mixed, dim=0) > 0.99


def test_precision_must_match_the_weights_dtype():
    from dash_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="learner.precision=bf16 keeps bfloat16 weights: set model.dtype=bfloat16"):
        load_config(overrides=["learner.precision=bf16"])
    assert load_config(overrides=["learner.precision=bf16", "model.dtype=bfloat16"]).learner.precision == "bf16"
    assert load_config(overrides=["learner.precision=bf16-mixed"]).model.dtype == "float32"


def test_micro_batches_by_token_budget_stay_within_it_and_keep_every_row():
    rows = {"prompt_ids": [[1] * 5] * 3 + [[1] * 2] * 3, "completion_ids": [[2] * 5, [2], [2] * 3, [2] * 30, [2], [2]]}
    chunks = by_length(rows, 20)
    for chunk in chunks:
        lengths = [len(p) + len(c) for p, c in zip(chunk["prompt_ids"], chunk["completion_ids"])]
        assert len(lengths) * max(lengths) <= 20 or len(lengths) == 1  # a row over the budget goes alone
    assert sorted(map(len, (c for chunk in chunks for c in chunk["completion_ids"]))) == [1, 1, 1, 3, 5, 30]
    for chunk in by_length(rows, 20, packed=True):  # packed: the budget counts the tokens themselves
        lengths = [len(p) + len(c) for p, c in zip(chunk["prompt_ids"], chunk["completion_ids"])]
        assert sum(lengths) <= 20 or len(lengths) == 1


def test_a_token_budget_gives_the_same_step_with_less_padding(policy_and_tokenizer, tmp_path):
    from dash_core.store import RunStore

    policy, tokenizer = policy_and_tokenizer
    batch = make_batch(tokenizer, n=12)
    store = RunStore(str(tmp_path), "run")
    manifest = store.write_batch(1, batch | {"kept": [True] * 12, "reward": [1.0] * 12})
    by_rows = Learner(copy.deepcopy(policy), LearnerConfig(grad_clip=1e9, micro_batch_size=3), PG, tokenizer.pad_token_id)
    by_tokens = Learner(copy.deepcopy(policy), LearnerConfig(grad_clip=1e9, tokens_per_micro_batch=40), PG, tokenizer.pad_token_id)
    rows_metrics, tokens_metrics = by_rows.learn(store, manifest), by_tokens.learn(store, manifest)
    assert tokens_metrics["train/loss"] == pytest.approx(rows_metrics["train/loss"], rel=1e-5)
    assert tokens_metrics["train/padding_fraction"] < rows_metrics["train/padding_fraction"]
    for a, b in zip(by_rows.policy.parameters(), by_tokens.policy.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4)


def test_an_automatic_token_budget_is_found_once_and_fits_a_whole_row(policy_and_tokenizer, tmp_path):
    from dash_core.store import RunStore

    policy, tokenizer = policy_and_tokenizer
    batch = make_batch(tokenizer, n=12)
    store = RunStore(str(tmp_path), "run")
    manifest = store.write_batch(1, batch | {"kept": [True] * 12, "reward": [1.0] * 12})
    learner = Learner(copy.deepcopy(policy), LearnerConfig(grad_clip=1e9, tokens_per_micro_batch="auto"), PG, tokenizer.pad_token_id)
    before = [p.detach().clone() for p in learner.policy.parameters()]
    learner.fit_token_budget(store.kept_rows(manifest))
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, learner.policy.parameters()))  # no step
    metrics = learner.learn(store, manifest)
    budget = learner.token_budget
    longest = max(len(p) + len(c) for p, c in zip(batch["prompt_ids"], batch["completion_ids"]))
    assert budget >= longest and math.isfinite(metrics["train/loss"])
    learner.learn(store, manifest)
    assert learner.token_budget == budget  # found at the first step only
