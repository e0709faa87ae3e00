"""The data that flows between the phases of an iteration: sampled rollouts, then the scored batch the rollout
store keeps (its columns are the store's schema)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dash_core.data import Problem
from dash_core.samplers import Generation


@dataclass
class Rollouts:
    """This process's groups of one preemptive batch: problems and their `group` completions each, prompt-major."""

    iteration: int
    problems: list[Problem]
    prompt_ids: list[list[int]]
    generations: list[Generation]
    group: int
    first_group: int = 0  # the batch's index of this process's first group
    policy_version: int = 0  # the iteration whose weights sampled them (iteration - 1 when exactly on-policy)

    def problem_of_each(self) -> list[Problem]:
        return [p for p in self.problems for _ in range(self.group)]


@dataclass
class ScoredBatch:
    """Rollouts with their rewards, group advantages and the gradient filter's verdict."""

    rollouts: Rollouts
    rewards: torch.Tensor
    advantages: torch.Tensor
    kept: torch.Tensor  # bool per completion

    def columns(self) -> dict[str, list]:
        """One row per completion: what the learner needs (kept rows first, see RunStore) and what analysis reads."""
        r, gens, group = self.rollouts, self.rollouts.generations, self.rollouts.group
        problems = r.problem_of_each()
        return {
            "iteration": [r.iteration] * len(gens),
            "problem_id": [p.id for p in problems],
            "group": [r.first_group + i // group for i in range(len(gens))],
            "prompt": [p.prompt for p in problems],
            "completion": [g.text for g in gens],
            "prompt_ids": [r.prompt_ids[i // group] for i in range(len(gens))],
            "completion_ids": [g.token_ids for g in gens],
            "sampler_logprobs": [g.logprobs for g in gens],
            "finish_reason": [g.finish_reason for g in gens],
            "policy_version": [r.policy_version] * len(gens),
            "reward": self.rewards.tolist(),
            "advantage": self.advantages.tolist(),
            "kept": self.kept.tolist(),
        }
