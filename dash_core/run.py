"""A training run's working parts and the phases of one iteration, free of any orchestration.

`TrainingRun` holds what lives in memory for the whole run (policy, sampler, learner, task, store, tracker) and
its counters (iteration, samples, training time, what MLflow holds). Each phase method takes and returns small
values (rollouts, a scored batch, a batch manifest) and adds its metrics to the iteration's, so the flow writes
the algorithm as a sequence of named, timed phases (`flows/train.py`); `train` runs that sequence with the
bookkeeping around it: budgets, checkpoints, timing and logging.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from dash_core.advantages import gradient_filter, group_advantages
from dash_core.batch import Rollouts, ScoredBatch
from dash_core.checkpoint import Checkpointer, load_latest, set_rng_state
from dash_core.config import DashConfig
from dash_core.data import Problem, Task
from dash_core.evaluation import eval_sampling, evaluate_sets
from dash_core.follower import start as start_followers
from dash_core.learner import Learner
from dash_core.models import save_model
from dash_core.preflight import check_run
from dash_core.prompts import encode_prompts
from dash_core.rewards.grading import Grades, grade
from dash_core.rules import RULES
from dash_core.samplers import SamplingParams, policy_sampler
from dash_core.store import BatchManifest, RunStore
from dash_core.team import team
from dash_core.timing import timed
from dash_core.traces import Teacher, as_generations
from dash_core.tracking import Tracker, dataset_inputs
from dash_core.warmup import WarmUp

log = logging.getLogger(__name__)
ITERATION_KEY = "reward/mean"  # logged by every iteration: the steps MLflow holds iterations for
Step = Callable[["TrainingRun", int], None]  # one iteration's phases, as the flow writes them


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
        self.sync_dir = self._sync_dir()
        self.policy, self.tokenizer, self.sampler = policy_sampler(
            config.model, config.sampler, config.seed, self.sync_dir, path=checkpoint_dir
        )
        self.team = team()  # other learner processes, which this one (the leader) tells what to learn
        if self.team:
            start_followers(self.team, config)
        self.learner = Learner(self.policy, config.learner, config.algo, self.tokenizer.pad_token_id, team=self.team)
        self.rule = RULES[config.algo.rule]
        self.warmup = WarmUp(config, self.policy, self.tokenizer, self.task, self.sampler, self.encode, self.sampling(1))
        self.teacher = Teacher(config)
        self.checkpointer = Checkpointer(store, self.tokenizer, config.checkpoint.keep)
        self.checkpoint_clock = time.monotonic()  # when the last checkpoint was taken (checkpoint.every_minutes)
        self.iteration = 0  # iterations whose update is in the weights
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
            elif config.warmup.steps and run.warmup.cached:
                run.warmup.load_into(run.policy)
                run.learner.share_weights(run.policy)
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
            self.metrics = dict(manifest.metrics)
            self.learn(manifest)
            if manifest.iteration not in self.logged:  # timings are the replay's, not the iteration's: left out
                self.log({k: v for k, v in self.metrics.items() if not k.startswith("time/")}, manifest.iteration)
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

    def train(self, until: int, step: Step, on_iteration: Callable[[int, dict[str, float]], None] = lambda *_: None) -> None:
        """Iterations up to `until`, or until a budget is spent: each runs `step` (the phases), then a checkpoint
        when one is due; its metrics go to MLflow as it ends.

        `time/iteration_s` is an iteration's whole wall-clock on the loop, from the end of the previous one (or of
        an evaluation): its phases plus whatever the orchestration and logging around them cost. Budgets count it."""
        while self.iteration < until and not self.budget_spent():
            iteration = self.iteration + 1
            cycle_start = self.cycle_start or time.perf_counter()
            self.metrics = {}
            step(self, iteration)
            self.train_seconds += time.perf_counter() - cycle_start  # before the snapshot, which holds it
            with self.phase("checkpoint"):
                if self.checkpoint_due():
                    self.checkpoint()
            self.train_seconds += self.metrics["time/checkpoint_s"]
            self.cycle_start = time.perf_counter()
            self.metrics |= {"time/iteration_s": self.cycle_start - cycle_start, "time/train_s": self.train_seconds}
            self.log(self.metrics, iteration)
            on_iteration(iteration, self.metrics)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the iteration as `time/<name>_s` (verl's marked timer)."""
        with timed(self.metrics, f"time/{name}_s"):
            yield

    # -- phases ------------------------------------------------------------------------------------------------
    def warm_up(self) -> dict[str, float]:
        """Supervised warm-up (see `WarmUp`); the samplers then hold the warmed-up weights."""
        metrics = self.warmup.run()
        self.learner.share_weights(self.policy)
        self.sync()
        self.warm = True
        return metrics

    def encode(self, problems: list[Problem]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, problems, self.config.model.use_chat_template)

    def sampling(self, n: int) -> SamplingParams:
        return SamplingParams.from_config(self.config.sampler, n)

    def sample(self, iteration: int) -> Rollouts:
        """M prompts x G completions from the policy; for a rule that learns from traces, human solutions or a
        teacher's completions instead."""
        cfg, algo = self.config.sampler, self.config.algo
        problems = self.task.train_problems(iteration, cfg.prompts_per_iteration)
        prompt_ids = self.encode(problems)
        torch.manual_seed(self.config.seed * 1_000_003 + iteration)
        if self.rule.learns_from == "samples":
            gens = self.sampler.generate(prompt_ids, self.sampling(cfg.group_size))
            return Rollouts(iteration, problems, prompt_ids, gens, cfg.group_size)
        if algo.sft_source == "human":
            return Rollouts(iteration, problems, prompt_ids, as_generations(self.tokenizer, [p.solution for p in problems]), 1)
        texts = self.teacher.complete(prompt_ids, self.sampling(cfg.group_size))
        return Rollouts(iteration, problems, prompt_ids, as_generations(self.tokenizer, texts), cfg.group_size)

    def grade(self, rollouts: Rollouts) -> Grades:
        """Each completion against its problem's reference (math answer or code tests), in a bounded time."""
        gens = rollouts.generations
        grades = grade(rollouts.problem_of_each(), [g.text for g in gens])
        rewards = torch.tensor(grades.rewards, dtype=torch.float32)
        self.metrics |= {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(gens) > 1 else 0.0,
            "reward/cut_off": float(grades.cut_off),
            "gen/length_mean": sum(len(g.token_ids) for g in gens) / len(gens),
        }
        return grades

    def advantages(self, rollouts: Rollouts, grades: Grades) -> ScoredBatch:
        """Group-normalised advantages and the gradient filter (|A| >= tau), before any learner forward pass.

        Traces get advantage 1 (the loss is then their NLL); a teacher's are kept only when correct, human
        solutions always."""
        algo = self.config.algo
        rewards = torch.tensor(grades.rewards, dtype=torch.float32)
        if self.rule.learns_from == "traces":
            advantages = torch.ones_like(rewards)
            kept = rewards >= 0.5 if algo.sft_source == "teacher" else torch.ones_like(rewards, dtype=torch.bool)
        else:
            advantages = group_advantages(rewards.view(-1, rollouts.group), algo.scale_std).flatten()
            kept = gradient_filter(advantages, algo.tau)
        self.metrics |= {
            "train/kept_fraction": kept.float().mean().item(),
            "train/abs_adv_mean": advantages.abs().mean().item(),
            "train/abs_adv_kept_mean": advantages[kept].abs().mean().item() if kept.any() else 0.0,
        }
        return ScoredBatch(rollouts, rewards, advantages, kept)

    def write(self, batch: ScoredBatch) -> BatchManifest:
        """The batch into the rollout store, once, with the iteration's scores: the run's write-ahead log."""
        self.metrics |= {"samples/total": self.samples_total + len(batch.rewards)}
        if self.sampler.servers:
            self.metrics["sampler/servers"] = len(self.sampler.servers)
        scores = {k: v for k, v in self.metrics.items() if not k.startswith("time/")}
        return self.store.write_batch(batch.rollouts.iteration, batch.columns(), scores)

    def learn(self, manifest: BatchManifest) -> None:
        """The learner's optimizer steps over the batch's kept rows; the iteration then counts."""
        if manifest.kept == 0:
            self.empty_iterations += 1
            if self.empty_iterations >= self.config.algo.max_empty_iterations:
                raise EverythingFilteredError(_nothing_left(self.empty_iterations, manifest.reward_mean))
            log.warning("iteration %d: every group had equal rewards; nothing to learn from", manifest.iteration)
            self.metrics |= {"train/loss": 0.0, "train/grad_norm": 0.0}
        else:
            self.empty_iterations = 0
            if self.config.algo.beta > 0 and self.learner.reference is None:
                self.learner.use_reference(self.warmup.reference())
            self.metrics |= self.learner.learn(self.store, manifest)
        self.iteration = manifest.iteration
        self.samples_total += manifest.rows

    def sync(self) -> None:
        self.learner.export_weights(self.policy)
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
            "optimizer": self.learner.optimizer_state(),
            "samples_total": self.samples_total,
            "train_seconds": self.train_seconds,
            "empty_iterations": self.empty_iterations,
        }
        self.learner.export_weights(self.policy)
        self.checkpointer.save(self.iteration, self.policy, state)
        self.checkpoint_clock = time.monotonic()

    def save(self) -> None:
        """Checkpoint the current iteration and wait until it is in the store."""
        self.checkpoint()
        self.checkpointer.wait()

    def save_what_is_learned(self) -> None:
        """After a failure, keep every complete update, so `--resume` loses at most the interrupted iteration."""
        if self.learner.partial:  # part of an iteration's optimizer steps is in the weights: resume from the last checkpoint
            try:
                self.checkpointer.wait()
            except Exception:
                log.exception("the checkpoint being written when the run failed is lost")
            log.warning("the failure came mid-update: resume starts after iteration %d, the last checkpoint", self.checkpointed)
            return
        try:
            self.save()
        except Exception:
            log.exception("could not save a checkpoint after the failure; resume starts after iteration %d", self.checkpointed)
        try:
            if self.iteration and self.iteration not in self.logged:  # the last complete update's sync or logging failed
                self.log(self.metrics, self.iteration)
        except Exception:
            log.exception("could not log the metrics of iteration %d after the failure", self.iteration)

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
