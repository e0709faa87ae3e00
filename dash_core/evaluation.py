"""Evaluation on a held-out set: greedy accuracy, sampled accuracy, unbiased pass@k and completion length."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from math import comb
from statistics import mean

from dash_core.config import DashConfig
from dash_core.data import build_task, eval_sets
from dash_core.data.problem import Problem
from dash_core.preflight import check_sandbox
from dash_core.prompts import encode_prompts
from dash_core.rewards.grading import grade
from dash_core.samplers import Sampler, SamplingParams, policy_sampler

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples per problem")
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict]  # per problem: prompt, answer, greedy completion and score, sampled completions and scores


def score(
    problems: list[Problem],
    prompt_ids: list[list[int]],
    sampler: Sampler,
    sampling: SamplingParams,
    seeds: list[int] | None = None,
) -> list[dict]:
    """Each problem's greedy completion and `sampling.n` sampled ones, graded: one row per problem (what a process
    scores of its share of a set; `summary` turns all the rows into metrics). `seeds`: one per problem."""
    n = sampling.n
    greedy = sampler.generate(prompt_ids, replace(sampling, n=1, temperature=0.0))
    sampled = sampler.generate(prompt_ids, sampling, seeds)
    greedy_scores = grade(problems, [g.text for g in greedy]).rewards
    sampled_scores = grade([p for p in problems for _ in range(n)], [g.text for g in sampled]).rewards
    rows = []
    for i, problem in enumerate(problems):
        scores, completions = sampled_scores[i * n : (i + 1) * n], sampled[i * n : (i + 1) * n]
        rows.append({
            "id": problem.id, "prompt": problem.prompt, "answer": problem.answer,
            "greedy": greedy[i].text, "greedy_score": greedy_scores[i],
            "sampled": [g.text for g in completions], "sampled_scores": scores,
            "sampled_lengths": [len(g.token_ids) for g in completions], "correct": sum(s >= 0.5 for s in scores),
        })  # fmt: skip
    return rows


def summary(name: str, rows: list[dict], ks: tuple[int, ...] = ()) -> dict[str, float]:
    """Metrics named `eval/<name>/...` of a set's rows; the sampled accuracy is the mean over all samples."""
    n = len(rows[0]["sampled_scores"])
    metrics = {
        f"eval/{name}/accuracy": mean(row["greedy_score"] for row in rows),
        f"eval/{name}/sampled_accuracy": mean(s for row in rows for s in row["sampled_scores"]),
        f"eval/{name}/length_mean": mean(length for row in rows for length in row["sampled_lengths"]),
    }
    for k in ks:
        metrics[f"eval/{name}/pass_at_{k}"] = mean(pass_at_k(n, row["correct"], k) for row in rows)
    return metrics


def evaluate(
    name: str,
    problems: list[Problem],
    prompt_ids: list[list[int]],
    sampler: Sampler,
    sampling: SamplingParams,
    ks: tuple[int, ...] = (),
) -> EvalResult:
    """A whole set scored in this process."""
    rows = score(problems, prompt_ids, sampler, sampling)
    return EvalResult(summary(name, rows, ks), rows)


def evaluate_sets(
    sets: dict[str, list[Problem]],
    encode: Callable[[list[Problem]], list[list[int]]],
    sampler: Sampler,
    sampling: SamplingParams,
    ks: tuple[int, ...] = (),
) -> dict[str, EvalResult]:
    return {name: evaluate(name, problems, encode(problems), sampler, sampling, ks) for name, problems in sets.items()}


def eval_sampling(config: DashConfig) -> SamplingParams:
    """The sampler's shaping at the evaluation's temperature, length and samples per problem."""
    e = config.eval
    return SamplingParams.from_config(config.sampler, e.n, temperature=e.temperature, max_new_tokens=e.max_new_tokens)


def evaluation_sets(config: DashConfig) -> dict[str, list[Problem]]:
    """What `dashrl eval` scores: `config.eval.datasets`, or when that is empty the task's held-out set."""
    return eval_sets(config, None if config.eval.datasets else build_task(config.task, config.seed))


def evaluate_model(config: DashConfig) -> dict[str, EvalResult]:
    """Score `config.model` on `config.eval.datasets` (or, when that is empty, the task's held-out set)."""
    sync_dir = tempfile.mkdtemp(prefix="dash-eval-")
    _, tokenizer, sampler = policy_sampler(
        config.model, config.sampler, config.seed, sync_dir, storage_options=config.store.storage_options
    )  # a LoRA checkpoint brings its base (say, a warm-up in the store)
    sets = evaluation_sets(config)
    check_sandbox(config, list(sets.values()))
    sampling = eval_sampling(config)
    for name, problems in sets.items():
        log.info("evaluating %s: %d problems, greedy and %d samples each, up to %d new tokens", name, len(problems), sampling.n,
                 sampling.max_new_tokens)  # fmt: skip
    encode = lambda problems: encode_prompts(tokenizer, problems, config.model.use_chat_template)  # noqa: E731
    return evaluate_sets(sets, encode, sampler, sampling, tuple(config.eval.ks))
