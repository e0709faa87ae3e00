"""The supervised warm-up: the task's human solutions through the learner with the sft rule, until the policy's
sampled accuracy reaches `warmup.target_accuracy` (a tiny model from scratch needs it before rewards are mixed).

Its result is cached in the store under a key made of everything it depends on, so later runs (and the KL
reference, which is the policy as RL found it) reuse it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.config import AlgoConfig, DashConfig, LearnerConfig
from dash_core.data import Problem, Task
from dash_core.evaluation import evaluate
from dash_core.learner import Learner
from dash_core.models import base_only, load_base_weights, load_policy, save_model
from dash_core.samplers import Sampler, SamplingParams
from dash_core.store import RunStore
from dash_core.traces import as_generations, trace_chunk

WEIGHT_DECAY = 0.01  # AdamW's default, which the warm-up has always used
CHECK_PROBLEMS = 256  # fresh training problems the accuracy check samples


class WarmUp:
    def __init__(
        self,
        config: DashConfig,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        sampler: Sampler,
        encode: Callable[[list[Problem]], list[list[int]]],
        sampling: SamplingParams,
    ):
        self.config, self.policy, self.tokenizer, self.task = config, policy, tokenizer, task
        self.sampler, self.encode, self.sampling = sampler, encode, sampling
        depends_on = [config.model.model_dump(), config.task.model_dump(), config.warmup.model_dump(), config.seed]
        if config.warmup.target_accuracy is not None:  # the check that ends it samples
            depends_on.append(asdict(sampling))
        key = hashlib.sha256(json.dumps(depends_on).encode()).hexdigest()[:16]
        self.cache = RunStore(config.store.url, f"warmup/{key}", config.store.storage_options)

    @property
    def cached(self) -> bool:
        return self.cache.exists("done.json")

    def run(self) -> dict[str, float]:
        """Warm the policy up (or load the cached result); its metrics."""
        start = time.perf_counter()
        if self.cached:
            self.load_into(self.policy)
            losses = self.cache.read_json("done.json")["losses"]
        else:
            losses = self._train()
            with tempfile.TemporaryDirectory() as tmp:
                self.cache.put_dir(save_model(self.policy, self.tokenizer, tmp), "model")
            self.cache.write_json("done.json", {"losses": losses})
        return {"warmup/loss": losses[-1], "warmup/steps": len(losses), "time/warmup_s": time.perf_counter() - start}

    def _train(self) -> list[float]:
        cfg = self.config.warmup
        learner_cfg = LearnerConfig(lr=cfg.lr, weight_decay=WEIGHT_DECAY, micro_batch_size=cfg.batch_size)
        losses = []
        with base_only(self.policy):  # a LoRA run's adapter starts on the warmed-up base
            learner = Learner(self.policy, learner_cfg, AlgoConfig(rule="sft"), self.tokenizer.pad_token_id)
            for step in range(1, cfg.steps + 1):
                problems = self.task.train_problems(step - 1, cfg.batch_size, stream="warmup")
                traces = as_generations(self.tokenizer, [p.solution for p in problems])
                stats = learner.step([trace_chunk(self.encode(problems), traces)])
                losses.append(stats.loss_sum / stats.tokens)
                if self._warm_enough(step):
                    break
        return losses

    def _warm_enough(self, step: int) -> bool:
        target, every = self.config.warmup.target_accuracy, self.config.warmup.check_every
        if target is None or step % every:
            return False
        problems = self.task.train_problems(0, CHECK_PROBLEMS, stream="warmup-check")
        self.sampler.load_weights(self.policy)  # vLLM engines and servers hold their own copy of the weights
        result = evaluate("warmup", problems, self.encode(problems), self.sampler, self.sampling)
        return result.metrics["eval/warmup/sampled_accuracy"] >= target

    def load_into(self, model: torch.nn.Module) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.cache.get_dir("model", tmp)
            cached, _ = load_policy(self.config.model, path=tmp)
        load_base_weights(model, cached.state_dict())

    @property
    def model_url(self) -> str:
        """Where the warmed-up model is kept: the base a LoRA run's adapters name."""
        return f"{self.cache.url}/model"

    def reference(self) -> torch.nn.Module:
        """The frozen KL reference: the policy as RL found it (the base model, after the warm-up if there was one)."""
        reference, _ = load_policy(self.config.model, self.config.seed)
        if self.config.warmup.steps:
            self.load_into(reference)
        return reference.eval().requires_grad_(False)
