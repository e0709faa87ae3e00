"""Held-out evaluation: greedy accuracy, sampled accuracy, unbiased pass@k and completion length."""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from statistics import mean

from transformers import PreTrainedTokenizerBase

from dash_core.data.problem import Problem, Task
from dash_core.prompts import encode_prompts
from dash_core.samplers import Sampler, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[dict]  # one row per problem: prompt, answer, greedy completion and its score, sampled scores


def evaluate(
    name: str,
    task: Task,
    problems: list[Problem],
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    temperature: float = 1.0,
    n: int = 1,
    ks: tuple[int, ...] = (),
) -> EvalResult:
    """Metrics are named `eval/<name>/...`; the sampled accuracy is the mean over all n samples per problem."""
    prompts = encode_prompts(tokenizer, problems)
    greedy = sampler.generate(prompts, SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0))
    sampled = sampler.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature))
    greedy_scores = task.grade(problems, [g.text for g in greedy])
    sampled_scores = task.grade([p for p in problems for _ in range(n)], [g.text for g in sampled])
    correct = [sum(s > 0.5 for s in sampled_scores[i * n : (i + 1) * n]) for i in range(len(problems))]
    metrics = {
        f"eval/{name}/accuracy": mean(greedy_scores),
        f"eval/{name}/sampled_accuracy": mean(sampled_scores),
        f"eval/{name}/length_mean": mean(len(g.token_ids) for g in sampled),
    }
    for k in ks:
        metrics[f"eval/{name}/pass_at_{k}"] = mean(pass_at_k(n, c, k) for c in correct)
    samples = [
        {
            "id": p.id,
            "prompt": p.prompt,
            "answer": p.answer,
            "greedy": g.text,
            "greedy_score": s,
            "sampled": [x.text for x in sampled[i * n : (i + 1) * n]],
            "sampled_correct": correct[i],
        }
        for i, (p, g, s) in enumerate(zip(problems, greedy, greedy_scores))
    ]
    return EvalResult(metrics, samples)
