"""Update rules against hand computations, their equivalences, KL, the SFT baselines, and a new rule added as one
record plus one preset file."""

import copy

import pytest
import torch
from helpers import TINY, chunks_of, make_batch

from dash_core import loop
from dash_core.config import AlgoConfig, DashConfig, LearnerConfig, load_config
from dash_core.learner import Learner, completion_logprobs
from dash_core.rules import RULES, UpdateRule, clipped_ratio, k3, objective, policy_gradient
from dash_core.run import TrainingRun


@pytest.fixture(scope="module")
def policy_and_tokenizer():
    from dash_core.models import load_policy

    return load_policy(TINY, seed=0)


def test_clipped_ratio_matches_hand_computation():
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.1]]))  # old log-probs are 0, so the ratios are these
    loss, clipped = clipped_ratio(logp, torch.zeros(2, 2), torch.tensor([[1.0], [-2.0]]), clip_eps=0.2)
    # row 0 (A=1): min(1.5, 1.2) = 1.2 (clipped), min(0.5, 0.8) = 0.5 -> -(1.2 + 0.5)
    # row 1 (A=-2): min(-1.0, -1.6) = -1.6 (clipped), min(-2.2, -2.2) = -2.2 -> -(-1.6 - 2.2)
    assert loss.sum().item() == pytest.approx(-(1.2 + 0.5) + (1.6 + 2.2))
    assert clipped.sum().item() == 2


def test_samples_of_an_older_policy_weigh_by_truncated_importance_weights():
    logp = torch.log(torch.tensor([[0.3, 0.6], [0.2, 0.1]])).requires_grad_()
    old = torch.log(torch.tensor([[0.1, 0.6], [0.4, 0.01]]))  # ratios 3, 1 / 0.5, 10
    chunk, mask = {"sampler_logprobs": old, "advantage": torch.tensor([1.0, -2.0])}, torch.ones(2, 2)
    loss, _, _ = objective(RULES["pg"], logp, mask, chunk, None, clip_eps=0.2, beta=0.0, is_cap=2.0)
    loss.backward()
    weights = torch.tensor([[2.0, 1.0], [0.5, 2.0]])  # the ratios truncated at 2, constants of the gradient
    assert torch.allclose(logp.grad, -weights * torch.tensor([[1.0], [-2.0]]))
    assert loss.item() == pytest.approx(-(weights * torch.tensor([[1.0], [-2.0]]) * logp.detach()).sum().item())
    clipped, _, _ = objective(RULES["grpo"], logp.detach(), mask, chunk, None, clip_eps=0.2, beta=0.0, is_cap=2.0)
    assert clipped == objective(RULES["grpo"], logp.detach(), mask, chunk, None, clip_eps=0.2, beta=0.0)[0]  # its ratio corrects


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3(logp, logp), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    expected = torch.exp(ref - logp) - (ref - logp) - 1
    assert torch.allclose(k3(logp, ref), expected) and (k3(logp, ref)[:2] > 0).all()


def test_optimizer_steps_per_rule():
    pg, multi, mini = RULES["pg"], RULES["ppo_multi"], RULES["ppo_mini"]
    assert pg.optimizer_steps(10, 3) == [range(10)]
    assert multi.optimizer_steps(10, 3) == [range(10)] * 3
    assert mini.optimizer_steps(10, 3) == [range(0, 3), range(3, 7), range(7, 10)]
    assert mini.optimizer_steps(2, 4) == [range(0, 1), range(1, 2)]
    assert multi.optimizer_steps(10, 1) == mini.optimizer_steps(10, 1) == pg.optimizer_steps(10, 1)


def on_policy_batch(policy, tokenizer):
    batch = make_batch(tokenizer)
    with torch.no_grad():
        logp, mask = completion_logprobs(policy, batch["prompt_ids"], batch["completion_ids"], tokenizer.pad_token_id)
    batch["sampler_logprobs"] = [row[: int(m.sum())].tolist() for row, m in zip(logp, mask)]
    return batch


def grads_after_step(policy, tokenizer, algo, batch, reference=None):
    learner = Learner(copy.deepcopy(policy), LearnerConfig(grad_clip=1e9), algo, tokenizer.pad_token_id, reference)
    stats = learner.step(chunks_of(batch, 3))
    return [p.grad.clone() for p in learner.policy.parameters()], stats


@pytest.mark.parametrize("rule", ["grpo", "ppo_multi", "ppo_mini"])
def test_ratio_rules_with_one_step_equal_pg(policy_and_tokenizer, rule):
    policy, tokenizer = policy_and_tokenizer
    batch = on_policy_batch(policy, tokenizer)
    pg_grads, _ = grads_after_step(policy, tokenizer, AlgoConfig(rule="pg"), batch)
    rule_grads, stats = grads_after_step(policy, tokenizer, AlgoConfig(rule=rule, ppo_steps=1), batch)
    for a, b in zip(pg_grads, rule_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert stats.clipped == 0


def test_kl_is_zero_at_the_reference_weights(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    batch = on_policy_batch(policy, tokenizer)
    pg_grads, _ = grads_after_step(policy, tokenizer, AlgoConfig(), batch)
    kl_grads, stats = grads_after_step(policy, tokenizer, AlgoConfig(beta=0.5), batch, reference=copy.deepcopy(policy))
    assert stats.kl_sum == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(pg_grads, kl_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_kl_without_a_reference_is_an_error(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    learner = Learner(copy.deepcopy(policy), LearnerConfig(), AlgoConfig(beta=0.1), tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="needs a reference model"):
        learner.step(chunks_of(make_batch(tokenizer), 4))


def learned(run, manifest):
    run.metrics = {}
    loop.learn(run, manifest)
    return run.metrics


def one_iteration(config):
    run = TrainingRun.start(config)
    loop.warm_up(run)
    manifest = loop.produce(run, 1)  # sampled, graded, filtered and stored; the scores in its metrics
    return run, manifest, manifest.metrics, learned(run, manifest)


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_a_reference_model_is_loaded_only_with_a_kl_term(small_config, beta):
    config = small_config.model_copy(deep=True)
    config.algo.beta = beta
    config.algo.tau = 0.0  # keep every sample so the learner runs
    run, _, _, learned = one_iteration(config)
    assert (run.learner.reference is None) == (beta == 0)
    assert ("train/kl" in learned) == (beta > 0)
    if beta:
        assert learned["train/kl"] < 1e-6  # one step from the reference: the estimate was taken before it


def test_ppo_multi_takes_k_steps_and_reports_clipping(small_config):
    config = small_config.model_copy(deep=True)
    config.algo = AlgoConfig(rule="ppo_multi", ppo_steps=3, tau=0.0)
    config.learner.lr = 3e-2  # big steps, so later steps move the ratio past the clip range
    run, manifest, _, learned = one_iteration(config)
    assert learned["train/clip_fraction"] > 0
    assert "time/forward_s" in learned and "time/backward_s" in learned


def test_sft_on_human_solutions_lowers_their_loss(small_config):
    config = small_config.model_copy(deep=True)
    config.algo = AlgoConfig(rule="sft")
    config.warmup.steps = 0
    config.learner.lr = 3e-3
    run = TrainingRun.start(config)
    losses = []
    for iteration in range(1, 9):
        rollouts = loop.sample(run, iteration, iteration - 1)
        assert rollouts.group == 1 and rollouts.generations[0].text == rollouts.problems[0].solution
        manifest = loop.produce(run, iteration)
        assert manifest.kept == manifest.rows and manifest.metrics["reward/mean"] == 1.0  # human solutions are right
        losses.append(learned(run, manifest)["train/loss"])
    assert losses[-1] < losses[0]


def test_sft_from_a_teacher_keeps_only_correct_traces(small_config, tmp_path):
    teacher_run = TrainingRun.start(small_config)
    loop.warm_up(teacher_run)  # 150 supervised steps: right on some 1-digit sums, wrong on others
    teacher_dir = teacher_run.save_policy(str(tmp_path / "teacher"))

    config = small_config.model_copy(deep=True)
    config.algo = AlgoConfig(rule="sft", sft_source="teacher", teacher=teacher_dir)
    config.warmup.steps = 0
    run = TrainingRun.start(config)
    manifest = loop.produce(run, 1)
    table = run.store.read_batch(1).to_pydict()
    assert 0 < manifest.kept < manifest.rows
    assert table["kept"] == [r == 1.0 for r in table["reward"]]
    assert all(a == 1.0 for a in table["advantage"])
    assert "logprob_gap/mean" not in learned(run, manifest)


def doubled_policy_gradient(logp, old, advantage, clip_eps):
    loss, clipped = policy_gradient(logp, old, advantage, clip_eps)
    return 2 * loss, clipped


def test_a_new_rule_is_one_record_and_one_preset_file(small_config, tmp_path, monkeypatch):
    monkeypatch.setitem(RULES, "toy", UpdateRule(doubled_policy_gradient))  # the record
    (tmp_path / "toy.yaml").write_text("algo:\n  rule: toy\n  tau: 0.0\n")  # the preset
    assert "toy" in DashConfig.model_json_schema()["$defs"]["AlgoConfig"]["properties"]["rule"]["enum"]
    base = small_config.model_dump(mode="json") | {"warmup": {"steps": 0}}
    losses = {}
    for rule, presets in [("pg", []), ("toy", [tmp_path / "toy.yaml"])]:
        config = load_config(presets, [f"store.url={tmp_path / rule}", "algo.tau=0.0"], base=base)
        run = TrainingRun.start(config)
        loop.iterations(run, 1)
        losses[rule] = run.tracker.history("train/loss")[1]
    assert losses["toy"] == pytest.approx(2 * losses["pg"], rel=1e-5)  # the same samples, twice the loss
