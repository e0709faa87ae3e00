"""A training run's working parts and the phases of one iteration, free of any orchestration.

`TrainingRun` holds what lives in memory for the whole run (policy, sampler, learner, task, store, tracker);
each phase method takes and returns small values (rollouts, a batch manifest, metrics), so an orchestrator can
wrap every phase as a task and the phases stay testable alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from dash_core.advantages import gradient_filter, group_advantages
from dash_core.checkpoint import Checkpointer, load_latest, set_rng_state
from dash_core.config import DashConfig
from dash_core.data import Problem, Task
from dash_core.evaluation import eval_sampling, evaluate, evaluate_sets
from dash_core.grading import grade
from dash_core.learner import Learner, LearnStats, NonFiniteLossError
from dash_core.models import load_policy, save_model
from dash_core.preflight import check_run
from dash_core.prompts import encode_prompts
from dash_core.rules import optimizer_steps
from dash_core.samplers import Generation, Sampler, SamplingParams, build_sampler
from dash_core.sft import solution_ids, train_supervised
from dash_core.store import BatchManifest, RunStore
from dash_core.timing import timed
from dash_core.tracking import Tracker, dataset_inputs

log = logging.getLogger(__name__)
ITERATION_KEY = "reward/mean"  # logged by every iteration: the steps MLflow holds iterations for
LEARNER_COLUMNS = ["prompt_ids", "completion_ids", "advantage", "sampler_logprobs"]


def run_name(config: DashConfig) -> str:
    """A run's name when the config gives none: update rule, model, task and seed (a sweep names runs by preset)."""
    return f"{config.algo.rule}-{config.model.name.rstrip('/').rsplit('/', 1)[-1]}-{config.task.name}-seed{config.seed}"


class EverythingFilteredError(RuntimeError):
    """Every group had equal rewards for too long: no gradient is left and the run cannot recover."""


class ResumeError(RuntimeError):
    """The run's store cannot rebuild what its MLflow history shows: resuming would log iterations twice."""


def _nothing_left(iterations: int, reward_mean: float) -> str:
    why = f"{iterations} iterations in a row had every group all-right or all-wrong (mean reward {reward_mean:.2f}), "
    if reward_mean >= 1.0:
        return (
            why + "so the policy solves its training problems: nothing is left to learn; stop, or use harder problems."
        )
    if reward_mean <= 0.0:
        return why + (
            "so the policy gets nothing right and has likely collapsed: resume from an earlier checkpoint with a "
            "lower learner.lr (or fewer algo.ppo_steps), or use a larger sampler.group_size."
        )
    return why + "so no sample carries a gradient: use a larger sampler.group_size or a lower algo.tau."


@dataclass
class Rollouts:
    """One preemptive batch: M problems and their M x `group` completions, prompt-major."""

    iteration: int
    problems: list[Problem]
    prompt_ids: list[list[int]]
    generations: list[Generation]
    group: int


class TrainingRun:
    def __init__(
        self,
        config: DashConfig,
        tracker: Tracker,
        store: RunStore,
        data: tuple[Task, dict[str, list[Problem]]],
        checkpoint_dir: str | None = None,
    ):
        """`data`: the training task and the evaluation sets, as `check_run` loaded them."""
        self.config = config
        self.tracker = tracker
        self.store = store
        if config.threads:
            torch.set_num_threads(config.threads)
        self.task, self.eval_sets = data
        self.policy, self.tokenizer = load_policy(config.model, config.seed, path=checkpoint_dir)
        self.sync_dir = self._sync_dir()
        self.sampler = build_sampler(config.sampler, self.policy, self.tokenizer, config.seed, self.sync_dir)
        self.learner = Learner(self.policy, config.learner, config.algo, self.tokenizer.pad_token_id)
        self.teacher: Sampler | None = None  # loaded on first use, by sft from a teacher only
        self.checkpointer = Checkpointer(store, self.tokenizer, config.checkpoint.keep)
        self.checkpoint_clock = time.monotonic()  # when the last checkpoint was taken (checkpoint.every_minutes)
        self.iteration = 0  # iterations whose update is in the weights
        self.updating = False  # an optimizer step of the next iteration may be in the weights: not a state to save
        self.samples_total = 0  # samples of the iterations counted in `iteration`
        self.train_seconds = 0.0  # whole iterations (sample .. checkpoint), summed: what budgets count
        self.empty_iterations = 0
        self.metrics: dict[str, float] = {}  # the iteration in progress (or last done), filled phase by phase
        self.logged: set[int] = set()  # iterations whose metrics are in MLflow
        self.evaluated: set[int] = set()  # iterations whose evaluation is in MLflow
        self.warm = False  # the policy holds the warm-up's result
        self.cycle_start: float | None = None  # when the training loop's clock last started (see `step`)

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @property
    def checkpointed(self) -> int:
        """The newest iteration with a complete checkpoint in the store."""
        return self.checkpointer.saved

    def _sync_dir(self) -> str:
        """A local folder for weight files that samplers (and local inference servers) read."""
        if self.config.sampler.remote.sync_dir:
            path = os.path.join(self.config.sampler.remote.sync_dir, self.run_id)
        elif "file" in self.store.fs.protocol:  # a local (or shared network) folder
            path = self.store.path("sampler_weights")
        else:
            path = tempfile.mkdtemp(prefix="dash-sync-")
        os.makedirs(path, exist_ok=True)
        return path

    def launch_servers(self) -> list:
        """Start `sampler.remote.launch` local vLLM servers on the current policy and sample from them too."""
        from dash_core.serving import launch_servers

        cfg = self.config.sampler
        model_dir = self.save_policy(os.path.join(self.sync_dir, "initial"))
        servers = launch_servers(
            model_dir, cfg.remote.launch, cfg.remote.base_port, cfg.remote.server_args,
            dtype=self.config.model.dtype, max_model_len=cfg.vllm.max_model_len, enforce_eager=cfg.vllm.enforce_eager,
            gpu_memory_utilization=cfg.vllm.gpu_memory_utilization / cfg.remote.launch,  # the servers share one GPU
        )  # fmt: skip
        self.sampler.add_servers([server.url for server in servers])
        return servers

    def save_policy(self, path: str) -> str:
        """The current policy as a model directory (what an inference server starts from)."""
        return save_model(self.policy, self.tokenizer, path)

    @classmethod
    def start(cls, config: DashConfig, tags: dict[str, str] | None = None) -> TrainingRun:
        """A new run, its MLflow run tagged with `tags` (say, the orchestrator's run); a bad model, data file,
        device, store or tracking URI fails before anything is created."""
        config.require_standalone()
        data = check_run(config)
        tracker = Tracker.create(config, tags, default_name=run_name(config))
        with tracker.failing():
            tracker.watch_system(config.tracking.system_metrics_every_s, resumed=False)
            tracker.log_datasets(dataset_inputs(config, *data))
            store = RunStore(config.store.url, tracker.run_id, config.store.storage_options)
            store.write_bytes("config.yaml", config.to_yaml().encode())
            return cls(config, tracker, store, data)

    @classmethod
    def resume(cls, config: DashConfig, run_id: str, tags: dict[str, str] | None = None) -> TrainingRun:
        """Continue `run_id`: restore its newest valid checkpoint (or its start), then replay the updates of the
        rollout batches stored since, so no completed iteration is lost and none is logged twice."""
        data = check_run(config)
        tracker = Tracker.reopen(config.tracking, run_id, tags)
        store = RunStore(config.store.url, run_id, config.store.storage_options)
        with tempfile.TemporaryDirectory() as tmp, tracker.failing():
            tracker.watch_system(config.tracking.system_metrics_every_s, resumed=True)
            checkpoint = load_latest(store, tmp)
            run = cls(config, tracker, store, data, checkpoint_dir=str(checkpoint.model_dir) if checkpoint else None)
            run.logged = set(tracker.history(ITERATION_KEY))
            run.evaluated = set(tracker.history(run.eval_key))
            if checkpoint:
                run.restore(checkpoint.iteration, checkpoint.trainer_state)
            elif config.warmup.steps and run._warmup_cache().exists("done.json"):
                run._load_warmup(run.policy)
                run.warm = True
            run.replay()
        log.info("resumed run %s at iteration %d", run_id, run.iteration)
        return run

    def restore(self, iteration: int, state: dict) -> None:
        self.learner.load_optimizer_state(state["optimizer"])
        set_rng_state(state["rng"])
        self.iteration = self.checkpointer.saved = self.checkpointer.requested = iteration
        self.samples_total = state["samples_total"]
        self.train_seconds = state["train_seconds"]
        self.empty_iterations = state["empty_iterations"]
        self.warm = True

    def replay(self) -> None:
        """Redo the updates of the stored batches newer than the weights (the store is the run's write-ahead log);
        deterministic, so the weights are those the lost run had. Metrics MLflow lacks are logged, once."""
        restored = self.iteration
        while self.store.has_batch(self.iteration + 1):
            manifest = self.store.manifest(self.iteration + 1)
            metrics = manifest.metrics | self.learn(manifest)
            if manifest.iteration not in self.logged:  # timings are the replay's, not the iteration's: left out
                self.log({k: v for k, v in metrics.items() if not k.startswith("time/")}, manifest.iteration)
        if self.iteration > restored:
            log.info("replayed iterations %d-%d from the rollout store", restored + 1, self.iteration)
        newest = max(self.logged, default=0)
        if newest > self.iteration:
            raise ResumeError(
                f"MLflow run {self.run_id} holds iterations up to {newest}, but its store {self.store.url} can rebuild "
                f"only up to {self.iteration} (checkpoints and rollout batches): resuming would log iterations "
                f"{self.iteration + 1}-{newest} twice. Restore the run's checkpoints/ and rollouts/ folders, or start "
                "a new run (dashrl train without --resume)."
            )
        train_s = self.tracker.history("time/train_s")
        self.train_seconds = max(self.train_seconds, train_s[max(train_s)] if train_s else 0.0)

    def budget_spent(self) -> bool:
        cfg = self.config
        return bool(
            (cfg.budget_minutes and self.train_seconds >= 60 * cfg.budget_minutes)
            or (cfg.budget_samples and self.samples_total >= cfg.budget_samples)
        )

    def train(self, until: int, on_iteration: Callable[[int, dict[str, float]], None] = lambda *_: None) -> None:
        """Iterations up to `until`, or until a budget is spent; each is logged to MLflow as it ends."""
        while self.iteration < until and not self.budget_spent():
            iteration = self.iteration + 1
            metrics = self.step(iteration)
            self.log(metrics, iteration)
            on_iteration(iteration, metrics)

    def step(self, iteration: int) -> dict[str, float]:
        """One DASH iteration: sample the preemptive batch -> reward, group advantages and the gradient filter (the
        batch goes to the rollout store) -> learn from the kept samples -> sync the samplers -> checkpoint when due.

        Every phase is timed as `time/<phase>_s`. `time/iteration_s` is the iteration's whole wall-clock on the
        loop, from the end of the previous one (or of an evaluation): its phases plus whatever the orchestration and
        logging around them cost. Budgets count it."""
        cycle_start = self.cycle_start or time.perf_counter()
        self.metrics = metrics = {}
        with timed(metrics, "time/sample_s"):
            rollouts = self.sample(iteration)
        with timed(metrics, "time/reward_s"):
            manifest, scores = self.score(rollouts)
        metrics |= scores
        with timed(metrics, "time/learn_s"):
            metrics |= self.learn(manifest)
        with timed(metrics, "time/sync_s"):
            self.sync()
        self.train_seconds += time.perf_counter() - cycle_start  # before the snapshot, which holds it
        with timed(metrics, "time/checkpoint_s"):
            if self.checkpoint_due():
                self.checkpoint()
        self.train_seconds += metrics["time/checkpoint_s"]
        self.cycle_start = time.perf_counter()
        metrics["time/iteration_s"] = self.cycle_start - cycle_start
        metrics["time/train_s"] = self.train_seconds
        return metrics

    # -- phases ------------------------------------------------------------------------------------------------
    def warm_up(self) -> dict[str, float]:
        """Supervised warm-up on the task's human solutions, cached in the store by everything it depends on."""
        cfg = self.config
        cache = self._warmup_cache()
        start = time.perf_counter()
        if cache.exists("done.json"):
            self._load_warmup(self.policy)
            losses = cache.read_json("done.json")["losses"]
        else:
            batches = (
                self.task.train_problems(step, cfg.warmup.batch_size, stream="warmup")
                for step in range(cfg.warmup.steps)
            )
            losses = train_supervised(
                self.policy, self.tokenizer, batches, cfg.warmup.lr, cfg.model.use_chat_template, done=self._warm_enough
            )
            with tempfile.TemporaryDirectory() as tmp:
                cache.put_dir(self.save_policy(tmp), "model")
            cache.write_json("done.json", {"losses": losses})
        self.sync()
        self.warm = True
        return {"warmup/loss": losses[-1], "warmup/steps": len(losses), "time/warmup_s": time.perf_counter() - start}

    def _warmup_cache(self) -> RunStore:
        cfg = self.config
        depends_on = [cfg.model.model_dump(), cfg.task.model_dump(), cfg.warmup.model_dump(), cfg.seed]
        if cfg.warmup.target_accuracy is not None:  # the check that ends it samples
            depends_on.append(asdict(self.sampling(1)))
        key = hashlib.sha256(json.dumps(depends_on).encode()).hexdigest()[:16]
        return RunStore(cfg.store.url, f"warmup/{key}", cfg.store.storage_options)

    def _load_warmup(self, model: torch.nn.Module) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self._warmup_cache().get_dir("model", tmp)
            cached, _ = load_policy(self.config.model, path=tmp)
        model.load_state_dict(cached.state_dict())

    def _reference(self) -> torch.nn.Module:
        """The frozen KL reference: the policy as RL found it (the base model, after the warm-up if there was one)."""
        reference, _ = load_policy(self.config.model, self.config.seed)
        if self.config.warmup.steps:
            self._load_warmup(reference)
        return reference.eval().requires_grad_(False)

    def _warm_enough(self, step: int) -> bool:
        target, every = self.config.warmup.target_accuracy, self.config.warmup.check_every
        if target is None or step % every:
            return False
        problems = self.task.train_problems(0, 256, stream="warmup-check")
        self.sync()  # vLLM engines and servers hold their own copy of the weights
        result = evaluate("warmup", problems, self.encode(problems), self.sampler, self.sampling(1))
        return result.metrics["eval/warmup/sampled_accuracy"] >= target

    def encode(self, problems: list[Problem]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, problems, self.config.model.use_chat_template)

    def sampling(self, n: int) -> SamplingParams:
        cfg = self.config.sampler
        return SamplingParams(n, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, tuple(cfg.stop))

    def sample(self, iteration: int) -> Rollouts:
        """M prompts x G completions from the policy (sft: human solutions, or a teacher's completions)."""
        cfg, algo = self.config.sampler, self.config.algo
        problems = self.task.train_problems(iteration, cfg.prompts_per_iteration)
        prompt_ids = self.encode(problems)
        torch.manual_seed(self.config.seed * 1_000_003 + iteration)
        if algo.rule != "sft":
            gens = self.sampler.generate(prompt_ids, self.sampling(cfg.group_size))
            return Rollouts(iteration, problems, prompt_ids, gens, cfg.group_size)
        if algo.sft_source == "human":
            return Rollouts(iteration, problems, prompt_ids, self._traces([p.solution for p in problems]), 1)
        texts = [g.text for g in self._teacher().generate(prompt_ids, self.sampling(cfg.group_size))]
        return Rollouts(iteration, problems, prompt_ids, self._traces(texts), cfg.group_size)

    def _traces(self, texts: list[str]) -> list[Generation]:
        """Supervised targets in the policy's own tokens; they have no sampler log-probabilities."""
        ids = solution_ids(self.tokenizer, texts)
        return [Generation(t, [0.0] * len(t), text, "stop") for t, text in zip(ids, texts)]

    def _teacher(self) -> Sampler:
        """The sft teacher shares the policy's tokenizer, so its prompts are the policy's."""
        if self.teacher is None:
            model_cfg = self.config.model.model_copy(update={"name": self.config.algo.teacher})
            teacher, tokenizer = load_policy(model_cfg, self.config.seed)
            sampler_cfg = self.config.sampler
            if sampler_cfg.backend == "remote":  # remote servers serve the policy, not the teacher
                sampler_cfg = sampler_cfg.model_copy(update={"backend": "transformers"})
            self.teacher = build_sampler(sampler_cfg, teacher.eval(), tokenizer, self.config.seed, tempfile.mkdtemp())
        return self.teacher

    def score(self, rollouts: Rollouts) -> tuple[BatchManifest, dict[str, float]]:
        """Reward, group advantages and the gradient filter; the batch is written to the rollout store once.

        For sft every kept trace gets advantage 1 (the loss is then the NLL); a teacher's traces are kept only
        when they are correct, human solutions always."""
        group, algo = rollouts.group, self.config.algo
        problems = [p for p in rollouts.problems for _ in range(group)]
        gens = rollouts.generations
        grades = grade(problems, [g.text for g in gens])
        rewards = torch.tensor(grades.rewards, dtype=torch.float32)
        if algo.rule == "sft":
            advantages = torch.ones_like(rewards)
            kept = rewards >= 0.5 if algo.sft_source == "teacher" else torch.ones_like(rewards, dtype=torch.bool)
        else:
            advantages = group_advantages(rewards.view(-1, group), algo.scale_std).flatten()
            kept = gradient_filter(advantages, algo.tau)
        columns = {
            "iteration": [rollouts.iteration] * len(gens),
            "problem_id": [p.id for p in problems],
            "group": [i // group for i in range(len(gens))],
            "prompt": [p.prompt for p in problems],
            "completion": [g.text for g in gens],
            "prompt_ids": [rollouts.prompt_ids[i // group] for i in range(len(gens))],
            "completion_ids": [g.token_ids for g in gens],
            "sampler_logprobs": [g.logprobs for g in gens],
            "finish_reason": [g.finish_reason for g in gens],
            "reward": rewards.tolist(),
            "advantage": advantages.tolist(),
            "kept": kept.tolist(),
        }
        metrics = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(gens) > 1 else 0.0,
            "reward/cut_off": float(grades.cut_off),
            "train/kept_fraction": kept.float().mean().item(),
            "train/abs_adv_mean": advantages.abs().mean().item(),
            "train/abs_adv_kept_mean": advantages[kept].abs().mean().item() if kept.any() else 0.0,
            "gen/length_mean": sum(len(g.token_ids) for g in gens) / len(gens),
            "samples/total": self.samples_total + len(gens),
        } | ({"sampler/servers": len(self.sampler.servers)} if hasattr(self.sampler, "servers") else {})
        return self.store.write_batch(rollouts.iteration, columns, metrics), metrics

    def learn(self, manifest: BatchManifest) -> dict[str, float]:
        """Request the kept samples from the store chunk by chunk; one optimizer step (K for ppo_*)."""
        if manifest.kept == 0:
            self.empty_iterations += 1
            if self.empty_iterations >= self.config.algo.max_empty_iterations:
                raise EverythingFilteredError(_nothing_left(self.empty_iterations, manifest.reward_mean))
            log.warning("iteration %d: every group had equal rewards; nothing to learn from", manifest.iteration)
            self._commit(manifest)
            return {"train/loss": 0.0, "train/grad_norm": 0.0}
        self.empty_iterations = 0
        algo, size = self.config.algo, self.config.learner.micro_batch_size
        if algo.beta > 0 and self.learner.reference is None:
            self.learner.reference = self._reference()
        steps: list[LearnStats] = []
        self.updating = True
        for rows in optimizer_steps(algo.rule, manifest.kept, algo.ppo_steps):
            try:
                steps.append(self.learner.step(self.store.kept_chunks(manifest, size, LEARNER_COLUMNS, rows)))
            except NonFiniteLossError:
                self.updating = bool(steps)  # the guard takes no step: without earlier steps the weights are clean
                raise
        self._commit(manifest)
        metrics = LearnStats.combine(steps).metrics()
        irrelevant = {"train/kl"} if algo.beta == 0 else set()
        if algo.rule in ("pg", "sft"):
            irrelevant.add("train/clip_fraction")
        if algo.rule == "sft":  # traces were not sampled from the policy: there is no on-policy gap to check
            irrelevant |= {"logprob_gap/mean", "logprob_gap/max"}
        return {k: v for k, v in metrics.items() if k not in irrelevant}

    def _commit(self, manifest: BatchManifest) -> None:
        """The iteration's update is complete: it and its samples count, and the run is a state worth saving."""
        self.iteration = manifest.iteration
        self.samples_total += manifest.rows
        self.updating = False

    def sync(self) -> None:
        self.sampler.load_weights(self.policy)

    def evaluate(self, iteration: int) -> dict[str, float]:
        """Every evaluation set (in and out of distribution); a sample of completions goes to MLflow."""
        cfg = self.config.eval
        results = evaluate_sets(self.eval_sets, self.encode, self.sampler, eval_sampling(self.config), tuple(cfg.ks))
        metrics: dict[str, float] = {}
        for name, result in results.items():
            metrics |= result.metrics
            if cfg.log_samples:
                self.tracker.log_jsonl(
                    result.rows[: cfg.log_samples], f"samples/{name}/eval_iter_{iteration:06d}.jsonl"
                )
        self.cycle_start = time.perf_counter()  # evaluation is not training time
        return metrics

    def checkpoint_due(self) -> bool:
        cfg = self.config.checkpoint
        by_count = cfg.every and self.iteration % cfg.every == 0
        by_time = cfg.every_minutes and time.monotonic() - self.checkpoint_clock >= 60 * cfg.every_minutes
        return bool(by_count or by_time)

    def checkpoint(self) -> None:
        """Snapshot the current iteration (once), to be written in the background."""
        if self.iteration == self.checkpointer.requested:
            return
        state = {
            "optimizer": self.learner.optimizer.state_dict(),
            "samples_total": self.samples_total,
            "train_seconds": self.train_seconds,
            "empty_iterations": self.empty_iterations,
        }
        self.checkpointer.save(self.iteration, self.policy, state)
        self.checkpoint_clock = time.monotonic()

    def save(self) -> None:
        """Checkpoint the current iteration and wait until it is in the store."""
        self.checkpoint()
        self.checkpointer.wait()

    @property
    def eval_key(self) -> str:
        """A metric every evaluation logs: the steps MLflow holds evaluations for."""
        return f"eval/{next(iter(self.eval_sets))}/accuracy"

    def evaluation_due(self) -> bool:
        """The current iteration is an evaluation point (the start, every eval.every, the end) not yet evaluated."""
        cfg = self.config
        point = self.iteration % cfg.eval.every == 0 or self.iteration >= cfg.iterations or self.budget_spent()
        return point and self.iteration not in self.evaluated

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        if ITERATION_KEY in metrics:
            self.logged.add(step)
        if self.eval_key in metrics:
            self.evaluated.add(step)
