"""The DASH training loop, which every process of a run runs (SPMD), top to bottom.

One iteration t:
  sample     this process's whole prompt groups of the preemptive batch (M prompts x G completions); each group's
             randomness comes from (seed, t, its index), so the batch does not depend on how many processes split it
  grade      1 for a right answer or passing program, else 0
  advantages A = (r - mean_group) / (std_group + eps); the gradient filter keeps |A| >= tau
  write      this process's part into the rollout store, then the manifest naming every part (the write-ahead log)
  learn      each process its token-balanced share of the kept rows, gradients summed across processes: one step,
             the step one process would take (loss over the whole step's kept tokens)
  sync       the samplers take the new weights
Around it: a warm-up, evaluations every `eval.every` iterations (each process scoring its share of the problems),
checkpoints, budgets; on resume, the stored batches newer than the checkpoint are learned again first.

With `sampler.max_staleness: k` (default 0: exactly on-policy, the paper's DASH) a thread samples, grades and writes
batches t+1..t+k while iteration t learns (`SamplingAhead`); the rule corrects for the older policy (see rules.py).

Orchestration adds itself through `Hooks` (Prefect tasks, a progress display); only the first process talks to
MLflow, Prefect and the checkpoint store, and tells the others what they must agree on (stop? checkpoint now?).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from dash_core.advantages import gradient_filter, group_advantages
from dash_core.batch import Rollouts, ScoredBatch
from dash_core.evaluation import eval_sampling, score, summary
from dash_core.rewards.grading import Grades, grade
from dash_core.run import TrainingRun
from dash_core.samplers import prompt_seed
from dash_core.store import BatchManifest, BatchPart
from dash_core.timing import steady_heap
from dash_core.traces import as_generations

log = logging.getLogger(__name__)
R = TypeVar("R")
AUTO_IDLE = 0.05  # the learner's idle fraction above which `auto` lets rollouts run further ahead


class EverythingFilteredError(RuntimeError):
    """Every group had equal rewards for too long: no gradient is left and the run cannot recover."""


class ResumeError(RuntimeError):
    """The run's store cannot rebuild what its MLflow history shows: resuming would log iterations twice."""


class Hooks:
    """What orchestration adds to the loop. The defaults (the processes after the first, benchmarks, tests) run
    every part in place and show nothing; the `dash-train` flow makes each part a Prefect task and draws progress."""

    def part(self, name: str, work: Callable[[], R]) -> R:
        """Run one part of the run: a warm-up, a block of iterations, an evaluation."""
        return work()

    def iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        """An iteration ended with these metrics (logged to MLflow)."""

    def evaluation(self, iteration: int, scores: dict[str, float]) -> None:
        """An evaluation ended with these scores (logged to MLflow)."""

    def say(self, line: str, warning: bool = False) -> None:
        log.log(logging.WARNING if warning else logging.INFO, line)


# -- the run ---------------------------------------------------------------------------------------------------
def train(run: TrainingRun, hooks: Hooks | None = None) -> None:
    """The whole run in this process: resume's replay, a warm-up, then blocks of iterations with an evaluation
    after each, until `iterations` or a budget; on a failure, the first process keeps what is learned."""
    hooks, cfg, team = hooks or Hooks(), run.config, run.team
    servers: list = []
    with run.failing():
        try:
            replay(run)
            if cfg.sampler.backend == "remote" and cfg.sampler.remote.launch:
                servers = hooks.part("launch-vllm-servers", run.launch_servers)
            hooks.part("sync-weights", lambda: sync(run))  # samplers holding their own weights catch up
            if cfg.warmup.steps and not run.state.warm:
                run.log(hooks.part("warm-up", lambda: warm_up(run)), 0)
            if team.agree(run.evaluation_due()):  # the start, or an evaluation a crash interrupted
                evaluate_and_log(run, hooks)
            with steady_heap():
                while not team.agree(run.state.iteration >= cfg.iterations or run.budget_spent()):
                    first = run.state.iteration + 1
                    last = min((first - 1) // cfg.eval.every * cfg.eval.every + cfg.eval.every, cfg.iterations)
                    hooks.part(f"iterations-{first}-{last}", lambda: iterations(run, last, hooks))
                    evaluate_and_log(run, hooks)
            run.save()
        except BaseException:
            if team.leads:
                run.save_what_is_learned()
                hooks.say(
                    f"stopped at iteration {run.state.iteration}: resume with  dashrl train --resume {run.run_id}",
                    warning=True,
                )
            raise
        finally:
            for server in servers:
                server.stop()
            if run.sampler.events:
                run.log_rows(list(run.sampler.events), "sampler_events.jsonl")
    run.finish()


def iterations(run: TrainingRun, last: int, hooks: Hooks | None = None) -> None:
    """Iterations up to `last`, or until a budget is spent: each one `step`, then a checkpoint when one is due;
    its metrics go to MLflow as it ends.

    `time/iteration_s` is an iteration's whole wall-clock on the loop, from the end of the previous one (or of an
    evaluation): its phases plus whatever the orchestration and logging around them cost. Budgets count it."""
    team, state, hooks = run.team, run.state, hooks or Hooks()
    if run.runs_ahead:
        state.staleness = team.agree(choose_staleness(run))
        run.recent = []
    ahead = SamplingAhead(run, state.iteration + 1, last) if state.staleness else None
    try:
        while state.iteration < last:
            iteration = state.iteration + 1
            start = run.clock or time.perf_counter()
            run.metrics = {}
            step(run, iteration, ahead)
            state.train_seconds += time.perf_counter() - start  # before the snapshot, which holds it
            stop, checkpoint = team.agree((run.budget_spent(), run.checkpoint_due()))
            with run.phase("checkpoint"):
                if checkpoint:
                    run.checkpoint()
            state.train_seconds += run.metrics["time/checkpoint_s"]
            run.clock = time.perf_counter()
            run.metrics |= {"time/iteration_s": run.clock - start, "time/train_s": state.train_seconds}
            if run.runs_ahead:
                run.metrics["train/max_staleness"] = state.staleness
                run.recent.append(run.metrics)
            run.log(run.metrics, iteration)
            hooks.iteration(iteration, run.metrics)
            if stop:
                break
    except BaseException:
        if ahead:
            ahead.close(failed=True)
        raise
    if ahead:
        ahead.close()


def step(run: TrainingRun, iteration: int, ahead: SamplingAhead | None) -> None:
    """One DASH iteration, each phase timed as time/<phase>_s."""
    if ahead:
        with run.phase("wait"):  # for the batch the sampling thread makes
            batch = ahead.take(iteration)
    else:
        batch = produce(run, iteration)
    run.metrics |= batch.metrics
    with run.phase("learn"):
        learn(run, batch)  # each process its share of the kept rows, in its micro-batches: the rule's optimizer steps
    with run.phase("sync"):
        sync(run, adapter_only=True)  # the samplers take the new weights (with LoRA, the adapter's)
    run.metrics["sync/bytes"] = run.sampler.synced_bytes
    if ahead:
        ahead.publish(iteration)


# -- the phases ------------------------------------------------------------------------------------------------
def produce(run: TrainingRun, iteration: int, version: int | None = None, ahead: bool = False) -> BatchManifest:
    """Iteration `iteration`'s batch, sampled by the policy of iteration `version` (default: the one before, exactly
    on-policy): this process's groups sampled, graded, filtered and written; the manifest holds the whole batch's
    scores and the phases' times. `ahead`: called from the sampling thread."""
    metrics: dict[str, float] = {}
    with run.phase("sample", metrics):
        rollouts = sample(run, iteration, iteration - 1 if version is None else version)
    with run.phase("reward", metrics):
        with run.phase("grade", metrics):
            grades = grade(rollouts.problem_of_each(), [g.text for g in rollouts.generations])
        with run.phase("advantages", metrics):
            batch = advantages(run, rollouts, grades)  # group-normalised; the gradient filter keeps |A| >= tau
        with run.phase("write", metrics):
            manifest = write(run, batch, grades, metrics, ahead)  # the rollout store: the run's write-ahead log
    return manifest


def sample(run: TrainingRun, iteration: int, version: int) -> Rollouts:
    """This process's groups of the M prompts x G completions; for a rule that learns from traces, human solutions
    or a teacher's completions instead."""
    cfg, algo = run.config.sampler, run.config.algo
    problems = run.task.train_problems(iteration, cfg.prompts_per_iteration)
    mine = run.team.groups(len(problems))
    problems, prompt_ids = problems[mine.start : mine.stop], run.encode(problems[mine.start : mine.stop])
    seeds = [prompt_seed(run.config.seed, f"rl:{iteration}", i) for i in mine]
    if run.rule.learns_from == "samples":
        generations, group = run.sampler.generate(prompt_ids, run.sampling(cfg.group_size), seeds), cfg.group_size
    elif algo.sft_source == "human":
        generations, group = as_generations(run.tokenizer, [p.solution for p in problems]), 1
    else:
        texts = run.teacher.complete(prompt_ids, run.sampling(cfg.group_size), seeds)
        generations, group = as_generations(run.tokenizer, texts), cfg.group_size
    return Rollouts(iteration, problems, prompt_ids, generations, group, mine.start, version)


def advantages(run: TrainingRun, rollouts: Rollouts, grades: Grades) -> ScoredBatch:
    """Group-normalised advantages and the gradient filter (|A| >= tau), before any learner forward pass; samples of
    a policy more than `staleness` iterations older than the learner's are dropped too.

    Traces get advantage 1 (the loss is then their NLL); a teacher's are kept only when correct, human solutions
    always."""
    algo = run.config.algo
    rewards = torch.tensor(grades.rewards, dtype=torch.float32)
    if run.rule.learns_from == "traces":
        advantage = torch.ones_like(rewards)
        kept = rewards >= 0.5 if algo.sft_source == "teacher" else torch.ones_like(rewards, dtype=torch.bool)
    else:
        advantage = group_advantages(rewards.view(-1, rollouts.group), algo.scale_std).flatten()
        kept = gradient_filter(advantage, algo.tau)
        if rollouts.iteration - 1 - rollouts.policy_version > run.state.staleness:
            kept[:] = False
    return ScoredBatch(rollouts, rewards, advantage, kept)


@dataclass
class PartSummary:
    """What the other processes need of one process's part of a batch: the file and the values its scores use."""

    part: BatchPart
    rewards: list[float]
    advantages: list[float]
    kept: list[bool]
    lengths: list[int]
    cut_off: int
    staleness: int


def write(
    run: TrainingRun, batch: ScoredBatch, grades: Grades, metrics: dict[str, float], ahead: bool
) -> BatchManifest:
    """This process's part into the store; then every process learns the whole batch's scores (into `metrics`), and
    the first writes the manifest naming every part, which completes the batch."""
    rollouts = batch.rollouts
    part = run.store.write_part(rollouts.iteration, rollouts.first_group, batch.columns())
    mine = PartSummary(part, batch.rewards.tolist(), batch.advantages.tolist(), batch.kept.tolist(),
                       [len(g.token_ids) for g in rollouts.generations], grades.cut_off,
                       rollouts.iteration - 1 - rollouts.policy_version)  # fmt: skip
    parts = run.team.gather(mine, ahead)
    rewards = torch.tensor([r for p in parts for r in p.rewards])
    advantage = torch.tensor([a for p in parts for a in p.advantages])
    kept = torch.tensor([k for p in parts for k in p.kept])
    lengths = [n for p in parts for n in p.lengths]
    metrics |= {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "reward/cut_off": float(sum(p.cut_off for p in parts)),
        "gen/length_mean": sum(lengths) / len(lengths),
        "train/kept_fraction": kept.float().mean().item(),
        "train/abs_adv_mean": advantage.abs().mean().item(),
        "train/abs_adv_kept_mean": advantage[kept].abs().mean().item() if kept.any() else 0.0,
    }
    if run.runs_ahead:
        metrics["train/staleness_mean"] = statistics.fmean(p.staleness for p in parts)
    if run.sampler.servers:
        metrics["sampler/servers"] = len(run.sampler.servers)
    manifest = BatchManifest(
        rollouts.iteration, [p.part for p in parts], len(rewards), int(kept.sum()), rewards.mean().item(), metrics
    )
    if run.team.leads:
        run.store.write_manifest(manifest)
    return manifest


def learn(run: TrainingRun, manifest: BatchManifest) -> None:
    """The learner's optimizer steps over the batch's kept rows; the iteration then counts."""
    state, algo = run.state, run.config.algo
    if manifest.kept == 0:
        state.empty_iterations += 1
        if state.empty_iterations >= algo.max_empty_iterations:
            raise EverythingFilteredError(_nothing_left(state.empty_iterations, manifest.reward_mean))
        if run.team.leads:
            log.warning("iteration %d: every group had equal rewards; nothing to learn from", manifest.iteration)
        run.metrics |= {"train/loss": 0.0, "train/grad_norm": 0.0}
    else:
        state.empty_iterations = 0
        if run.learner.needs_reference:
            run.learner.use_reference(run.warmup.reference() if run.team.leads else None)
        run.metrics |= run.learner.learn(run.store, manifest)
    state.iteration = manifest.iteration
    state.samples_total += manifest.rows
    run.metrics["samples/total"] = state.samples_total


def sync(run: TrainingRun, adapter_only: bool = False) -> None:
    """Every process's sampler takes the learned weights (gathered whole first, when sharded); `adapter_only`: only
    a LoRA adapter learned since the last sync (not at start-up or after a warm-up, which set the base)."""
    run.learner.export_weights(run.policy)
    run.sampler.load_weights(run.policy, adapter_only)


def warm_up(run: TrainingRun) -> dict[str, float]:
    """The first process's supervised warm-up (see `WarmUp`); then every process holds its weights."""
    metrics = run.warmup.run() if run.team.leads else {}
    run.learner.share_weights(run.policy)
    sync(run)
    run.state.warm = True
    return metrics


def evaluate(run: TrainingRun, iteration: int) -> dict[str, float]:
    """Every evaluation set (in and out of distribution), each process scoring its share of the problems; a sample
    of completions goes to MLflow."""
    cfg, team = run.config, run.team
    metrics: dict[str, float] = {}
    for name, problems in run.eval_sets.items():
        mine = team.groups(len(problems))
        seeds = [prompt_seed(cfg.seed, f"eval:{name}:{iteration}", i) for i in mine]
        rows = score(
            problems[mine.start : mine.stop],
            run.encode(problems[mine.start : mine.stop]),
            run.sampler,
            eval_sampling(cfg),
            seeds,
        )
        rows = [row for share in team.gather(rows) for row in share]
        metrics |= summary(name, rows, tuple(cfg.eval.ks))
        if cfg.eval.log_samples:
            run.log_rows(rows[: cfg.eval.log_samples], f"samples/{name}/eval_iter_{iteration:06d}.jsonl")
    run.clock = time.perf_counter()  # evaluation is not training time
    return metrics


def evaluate_and_log(run: TrainingRun, hooks: Hooks) -> None:
    iteration = run.state.iteration
    scores = hooks.part(f"evaluate-{iteration}", lambda: evaluate(run, iteration))
    run.log(scores, iteration)
    hooks.evaluation(iteration, scores)


# -- resume ----------------------------------------------------------------------------------------------------
def replay(run: TrainingRun) -> None:
    """Every process: redo the updates of the stored batches newer than the weights (the store is the run's
    write-ahead log); deterministic, so the weights are those the lost run had, whatever the number of processes.
    Metrics MLflow lacks are logged, once: the batch's own, the times of the phases that made it (the lost run
    measured them), and the replay's learning times as `time/replay_*` (the lost run's never reached MLflow)."""
    restored = run.state.iteration
    manifests = run.team.agree(_stored_since(run) if run.team.leads else None)
    for manifest in manifests:
        run.metrics = {}
        with run.phase("learn"):
            learn(run, manifest)
        replayed = {
            key.replace("time/", "time/replay_", 1): value
            for key, value in run.metrics.items()
            if key.startswith("time/")
        }
        learned = {k: v for k, v in run.metrics.items() if not k.startswith("time/")}
        run.metrics = manifest.timings | manifest.metrics | learned | replayed
        if manifest.iteration not in run.logged:
            run.log(run.metrics, manifest.iteration)
    if manifests:
        log.info("replayed iterations %d-%d from the rollout store", restored + 1, run.state.iteration)
    problem = run.team.agree(_history_ahead(run) if run.team.leads else None)
    if problem:
        raise ResumeError(problem)
    if run.tracker:
        train_s = run.tracker.history("time/train_s")
        run.state.train_seconds = max(run.state.train_seconds, train_s[max(train_s)] if train_s else 0.0)


def _stored_since(run: TrainingRun) -> list[BatchManifest]:
    manifests, iteration = [], run.state.iteration
    while run.store.has_batch(iteration + 1):
        iteration += 1
        manifests.append(run.store.manifest(iteration))
    return manifests


def _history_ahead(run: TrainingRun) -> str | None:
    newest = max(run.logged, default=0)
    if newest <= run.state.iteration:
        return None
    return (
        f"MLflow run {run.run_id} holds iterations up to {newest}, but its store {run.store.url} can rebuild "
        f"only up to {run.state.iteration} (checkpoints and rollout batches): resuming would log iterations "
        f"{run.state.iteration + 1}-{newest} twice. Restore the run's checkpoints/ and rollouts/ folders, or start "
        "a new run (dashrl train without --resume)."
    )


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


# -- rollouts that run ahead -----------------------------------------------------------------------------------
def choose_staleness(run: TrainingRun) -> int:
    """How far rollouts may run ahead in the next block: `sampler.max_staleness`, or with `auto`, from the last
    block's measurements (the first process's): one step further while the learner waits for rollouts and the
    sampler-learner mismatch stays under half its bound; one step back once the mismatch passes the bound, and
    never that far again in the run (at a smaller k the mismatch of a larger one cannot be seen)."""
    setting, state = run.config.sampler.max_staleness, run.state
    if setting != "auto":
        return setting
    if not run.recent:
        return state.staleness
    idle = statistics.fmean(_waited(m) / m["time/iteration_s"] for m in run.recent)
    mismatch = statistics.fmean(m.get("train/mismatch_kl", 0.0) for m in run.recent)
    bound = run.config.sampler.max_mismatch_kl
    if mismatch > bound and state.staleness:
        state.staleness_ceiling = state.staleness - 1
        return state.staleness - 1
    if idle > AUTO_IDLE and mismatch < bound / 2 and state.staleness < state.staleness_ceiling:
        return state.staleness + 1
    return state.staleness


def _waited(metrics: dict[str, float]) -> float:
    """How long the learner waited for an iteration's batch: for the sampling thread, or (on-policy) for sampling."""
    return metrics["time/wait_s"] if "time/wait_s" in metrics else metrics["time/sample_s"] + metrics["time/reward_s"]


class SamplingAhead:
    """Rollouts that run ahead: a thread makes the batches of iterations `first`..`last` (sample, grade, filter,
    write) while the loop learns, batch t as soon as the policy of iteration t-1-k is published (k = the run's
    staleness), with the newest policy published by then. Which batches it makes depends only on which policies
    are published, so every process's thread makes the same ones and their collectives match."""

    def __init__(self, run: TrainingRun, first: int, last: int):
        self.run, self.first, self.last, self.staleness = run, first, last, run.state.staleness
        self.version = first - 1  # the newest policy the samplers hold
        self.closed = False  # no newer policy will come
        self.batches: dict[int, BatchManifest] = {}
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._make, name="dash-sampling-ahead", daemon=True)
        self.thread.start()

    def _make(self) -> None:
        try:
            for iteration in range(self.first, self.last + 1):
                with self.changed:
                    self.changed.wait_for(lambda: self.version >= iteration - 1 - self.staleness or self.closed)
                    if self.version < iteration - 1 - self.staleness:
                        return
                    version = self.version
                batch = produce(self.run, iteration, version, ahead=True)
                with self.changed:
                    self.batches[iteration] = batch
                    self.changed.notify_all()
        except BaseException as exc:  # the loop raises it when it asks for the batch
            with self.changed:
                self.error = exc
                self.changed.notify_all()

    def take(self, iteration: int) -> BatchManifest:
        """Iteration `iteration`'s batch, once it is made."""
        with self.changed:
            self.changed.wait_for(lambda: iteration in self.batches or self.error is not None)
            if self.error is not None:
                raise RuntimeError(f"sampling ahead failed at iteration {iteration}: {self.error}") from self.error
            return self.batches.pop(iteration)

    def publish(self, version: int) -> None:
        """The samplers hold the policy of iteration `version`."""
        with self.changed:
            self.version = version
            self.changed.notify_all()

    def close(self, failed: bool = False) -> None:
        """No newer policy comes: the thread makes what it may with the published ones, then ends. After a failure
        it is left to end with the process: it may be waiting on a process that is gone."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        if not failed:
            self.thread.join()
