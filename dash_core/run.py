"""A training run's working parts and its record, free of any orchestration; `dash_core.loop` runs it.

`TrainingRun` holds what lives in memory for the whole run in every process (policy, sampler, learner, task,
store) and the run's record (`RunState`: its counters and clocks, which a checkpoint saves and resume restores).
The first process also holds the MLflow run (`tracker`), writes checkpoints and keeps the clock; it opens or
resumes the run and tells the others (`join`) the config, the run id and what resume restored.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dash_core.checkpoint import Checkpoint, Checkpointer, load_latest, set_rng_state
from dash_core.config import ConfigError, DashConfig
from dash_core.data import Problem, Task
from dash_core.learner import Learner
from dash_core.models import save_model
from dash_core.preflight import check_run, check_sandbox, load_data, problem_sets, runs_code
from dash_core.prompts import encode_prompts
from dash_core.rules import RULES
from dash_core.samplers import SamplingParams, policy_sampler
from dash_core.store import RunStore
from dash_core.team import Team, team
from dash_core.timing import timed
from dash_core.traces import Teacher
from dash_core.tracking import Tracker, dataset_inputs
from dash_core.warmup import WarmUp

log = logging.getLogger(__name__)
ITERATION_KEY = "reward/mean"  # logged by every iteration: the steps MLflow holds iterations for


def run_name(config: DashConfig) -> str:
    """A run's name when the config gives none: update rule, model, task and seed (a sweep names runs by preset)."""
    return f"{config.algo.rule}-{config.model.name.rstrip('/').rsplit('/', 1)[-1]}-{config.task.name}-seed{config.seed}"


def _with_sandbox(
    tags: dict[str, str] | None, config: DashConfig, data: tuple[Task, dict[str, list[Problem]]]
) -> dict[str, str] | None:
    """`tags`, and for a run whose reward executes code, which sandbox runs it (weak: the user's opt-out)."""
    return {**(tags or {}), "dash.sandbox": config.reward.sandbox} if runs_code(problem_sets(data)) else tags


@dataclass
class RunState:
    """A run's counters and clocks: what a checkpoint saves and resume restores."""

    iteration: int = 0  # iterations whose update is in the weights
    samples_total: int = 0  # samples of those iterations
    train_seconds: float = 0.0  # whole iterations (sample .. checkpoint), summed: what budgets count
    empty_iterations: int = 0  # iterations in a row whose groups were all filtered out
    warm: bool = False  # the policy holds the warm-up's result
    staleness: int = 0  # how many iterations rollouts may run ahead of the learner now (sampler.max_staleness)
    staleness_ceiling: int = (
        4  # the most `max_staleness: auto` may choose (TRL's async default; lowered when the mismatch was too high)
    )

    @classmethod
    def of_checkpoint(cls, checkpoint: Checkpoint) -> RunState:
        state = checkpoint.trainer_state
        if "run" in state:
            return cls(**state["run"])
        # written before the record had a name of its own
        fields = {key: state[key] for key in ("samples_total", "train_seconds", "empty_iterations")}
        return cls(iteration=checkpoint.iteration, warm=True, **fields)


@dataclass
class Opening:
    """What the first process tells the others when a run opens: the run, and what resume restored."""

    config: dict[str, Any]
    run_id: str
    state: RunState | None = None  # None: a new run
    optimizer: dict | None = None  # Adam's state, when a checkpoint held it


class TrainingRun:
    def __init__(
        self,
        config: DashConfig,
        member: Team,
        tracker: Tracker | None,
        store: RunStore,
        data: tuple[Task, dict[str, list[Problem]]],
        checkpoint_dir: str | None = None,
    ):
        """`data`: the training task and the evaluation sets. `tracker`: the first process's MLflow run."""
        self.config = config
        self.team = member
        self.tracker = tracker
        self.store = store
        if config.threads:
            torch.set_num_threads(config.threads)
        self.task, self.eval_sets = data
        self.sync_dir = self._sync_dir()
        sampler_cfg = config.sampler.model_copy(update={"remote": self._my_servers(config.sampler.remote.urls)})
        self.policy, self.tokenizer, self.sampler = policy_sampler(
            config.model, sampler_cfg, config.seed, self.sync_dir, path=checkpoint_dir, private=self.runs_ahead,
            lora=config.learner.lora, storage_options=config.store.storage_options,
        )  # fmt: skip
        member.align(self.policy)  # the first process's weights (a checkpoint's, or a seed's on another device)
        off_policy = config.sampler.max_staleness != 0
        self.learner = Learner(
            self.policy, config.learner, config.algo, self.tokenizer.pad_token_id, team=member, off_policy=off_policy
        )
        self.rule = RULES[config.algo.rule]
        self.warmup = WarmUp(
            config, self.policy, self.tokenizer, self.task, self.sampler, self.encode, self.sampling(1)
        )
        self.teacher = Teacher(config)
        base = self.warmup.model_url if config.warmup.steps else config.model.name  # what a LoRA adapter is trained on
        self.checkpointer = Checkpointer(store, self.tokenizer, config.checkpoint.keep, base)
        self.checkpoint_clock = time.monotonic()  # when the last checkpoint was taken (checkpoint.every_minutes)
        self.state = RunState(
            staleness=config.sampler.max_staleness if isinstance(config.sampler.max_staleness, int) else 1
        )
        self.metrics: dict[str, float] = {}  # the iteration in progress (or last done), filled phase by phase
        self.logged: set[int] = set()  # iterations whose metrics are in MLflow
        self.evaluated: set[int] = set()  # iterations whose evaluation is in MLflow
        self.clock: float | None = None  # when the training loop's clock last started (see `loop.iterations`)
        self.recent: list[
            dict[str, float]
        ] = []  # this block's iterations' metrics (`loop.choose_staleness` reads them)

    @property
    def run_id(self) -> str:
        return self.store.run_id

    @property
    def runs_ahead(self) -> bool:
        """Rollouts may be sampled by an older policy than the learner's (sampler.max_staleness != 0)."""
        return self.config.sampler.max_staleness != 0

    def _sync_dir(self) -> str:
        """A local folder for weight files that samplers (and local inference servers) read."""
        if self.config.sampler.remote.sync_dir:
            path = os.path.join(self.config.sampler.remote.sync_dir, self.run_id)
        elif "file" in self.store.fs.protocol:  # a local (or shared network) folder
            path = self.store.path("sampler_weights")
        else:
            path = tempfile.mkdtemp(prefix="dash-sync-")
        if self.team.size > 1:  # each process syncs its own servers
            path = os.path.join(path, f"process_{self.team.rank}")
        os.makedirs(path, exist_ok=True)
        return path

    def _my_servers(self, urls: list[str]) -> Any:
        """The remote servers this process samples on: its share of them, each server one process's."""
        remote, size = self.config.sampler.remote, self.team.size
        if self.config.sampler.backend == "remote" and len(urls) + remote.launch < size:
            raise ConfigError(
                f"sampler.backend=remote with {size} processes needs at least {size} inference servers (each process "
                f"samples on its own share), but sampler.remote has {len(urls)} URL(s) and launch={remote.launch}"
            )
        return remote.model_copy(update={"urls": urls[self.team.rank :: size]})

    def launch_servers(self) -> list:
        """The first process starts `sampler.remote.launch` local vLLM servers on the current policy; each process
        then samples on its share of them too. Returns the servers this process started."""
        from dash_core.serving import launch_servers, lora_server_args

        cfg, servers, lora = self.config.sampler, [], self.config.learner.lora
        if self.team.leads:
            model_dir = self.save_policy(os.path.join(self.sync_dir, "initial"))  # a LoRA run's: the base
            servers = launch_servers(
                model_dir, cfg.remote.launch, cfg.remote.base_port, [*(lora_server_args(lora.rank) if lora else []), *cfg.remote.server_args],
                dtype=self.config.model.dtype, max_model_len=cfg.vllm.max_model_len, enforce_eager=cfg.vllm.enforce_eager,
                gpu_memory_utilization=cfg.vllm.gpu_memory_utilization / cfg.remote.launch,  # the servers share one GPU
            )  # fmt: skip
        urls = self.team.agree([server.url for server in servers])
        self.sampler.add_servers(urls[self.team.rank :: self.team.size])
        return servers

    def save_policy(self, path: str) -> str:
        """The current policy as a model directory (what an inference server starts from)."""
        return save_model(self.policy, self.tokenizer, path)

    # -- opening a run -----------------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: DashConfig, tags: dict[str, str] | None = None) -> TrainingRun:
        """A new run (the first process), its MLflow run tagged with `tags` (say, the orchestrator's run); a bad
        model, data file, device, store or tracking URI fails before anything is created."""
        config.require_standalone()
        data = check_run(config)
        tracker = Tracker.create(config, _with_sandbox(tags, config, data), default_name=run_name(config))
        with tracker.failing():
            tracker.watch_system(config.tracking.system_metrics_every_s, resumed=False)
            tracker.log_datasets(dataset_inputs(config, *data))
            store = RunStore(config.store.url, tracker.run_id, config.store.storage_options)
            store.write_bytes("config.yaml", config.to_yaml().encode())
            member = team()
            member.agree(Opening(config.model_dump(), tracker.run_id))
            return cls(config, member, tracker, store, data)

    @classmethod
    def resume(cls, config: DashConfig, run_id: str, tags: dict[str, str] | None = None) -> TrainingRun:
        """Continue `run_id` (the first process): restore its newest valid checkpoint (or its start); the loop then
        replays the updates of the rollout batches stored since, so no completed iteration is lost and none is
        logged twice."""
        data = check_run(config)
        tracker = Tracker.reopen(config.tracking, run_id, _with_sandbox(tags, config, data))
        store = RunStore(config.store.url, run_id, config.store.storage_options)
        with tempfile.TemporaryDirectory() as tmp, tracker.failing():
            tracker.watch_system(config.tracking.system_metrics_every_s, resumed=True)
            checkpoint = load_latest(store, tmp)
            state = RunState.of_checkpoint(checkpoint) if checkpoint else RunState()
            optimizer = checkpoint.trainer_state["optimizer"] if checkpoint else None
            member = team()
            member.agree(Opening(config.model_dump(), run_id, state, optimizer))
            run = cls(
                config, member, tracker, store, data, checkpoint_dir=str(checkpoint.model_dir) if checkpoint else None
            )
            run.logged = set(tracker.history(ITERATION_KEY))
            run.evaluated = set(tracker.history(run.eval_key))
            run.restore(state, optimizer)
            if checkpoint:
                set_rng_state(checkpoint.trainer_state["rng"])
        log.info("resumed run %s at iteration %d", run_id, state.iteration)
        return run

    @classmethod
    def join(cls) -> TrainingRun:
        """The run the first process opened, in one of the others: its config, run id and restored state."""
        member = team()
        opening: Opening = member.agree(None)
        config = DashConfig.model_validate(opening.config)
        store = RunStore(config.store.url, opening.run_id, config.store.storage_options)
        data = load_data(config)
        check_sandbox(config, problem_sets(data))
        run = cls(config, member, None, store, data)
        if opening.state:
            run.restore(opening.state, opening.optimizer)
        return run

    def restore(self, state: RunState, optimizer: dict | None) -> None:
        """Every process: the record and Adam's state a resume found (the weights came with the first process's
        policy). A run without a checkpoint may still have a cached warm-up."""
        self.state = state
        self.checkpointer.saved = self.checkpointer.requested = state.iteration
        if optimizer is not None:
            self.learner.load_optimizer_state(optimizer)
        elif self.config.warmup.steps and self.warmup.cached:
            if self.team.leads:
                self.warmup.load_into(self.policy)
            self.learner.share_weights(self.policy)
            self.state.warm = True

    # -- the record ------------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str, metrics: dict[str, float] | None = None) -> Iterator[None]:
        """Time a phase of the iteration as `time/<name>_s` (verl's marked timer), into `metrics` (default: the
        iteration's)."""
        with timed(self.metrics if metrics is None else metrics, f"time/{name}_s"):
            yield

    def failing(self) -> Any:
        """Within it, a failure marks the MLflow run failed (the first process's)."""
        return self.tracker.failing() if self.tracker else nullcontext()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Metrics of iteration `step` to MLflow (the first process; the others hold the same values)."""
        if not self.tracker:
            return
        self.tracker.log_metrics(metrics, step)
        if ITERATION_KEY in metrics:
            self.logged.add(step)
        if self.eval_key in metrics:
            self.evaluated.add(step)

    def log_rows(self, rows: list[dict], path: str) -> None:
        if self.tracker:
            self.tracker.log_jsonl(rows, path)

    def finish(self) -> None:
        if self.tracker:
            self.tracker.finish()

    @property
    def eval_key(self) -> str:
        """A metric every evaluation logs: the steps MLflow holds evaluations for."""
        return f"eval/{next(iter(self.eval_sets))}/accuracy"

    def budget_spent(self) -> bool:
        cfg = self.config
        return bool(
            (cfg.budget_minutes and self.state.train_seconds >= 60 * cfg.budget_minutes)
            or (cfg.budget_samples and self.state.samples_total >= cfg.budget_samples)
        )

    def checkpoint_due(self) -> bool:
        cfg = self.config.checkpoint
        by_count = cfg.every and self.state.iteration % cfg.every == 0
        by_time = cfg.every_minutes and time.monotonic() - self.checkpoint_clock >= 60 * cfg.every_minutes
        return bool(by_count or by_time)

    def evaluation_due(self) -> bool:
        """The current iteration is an evaluation point (the start, every eval.every, the end) not yet evaluated."""
        cfg, iteration = self.config, self.state.iteration
        point = iteration % cfg.eval.every == 0 or iteration >= cfg.iterations or self.budget_spent()
        return point and iteration not in self.evaluated

    # -- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Every process: snapshot the current iteration (once); the first process writes it in the background."""
        if self.state.iteration == self.checkpointer.requested:
            return
        self.learner.export_weights(self.policy)
        state = {"optimizer": self.learner.optimizer_state(), "run": asdict(self.state)}
        if self.team.leads:
            self.checkpointer.save(self.state.iteration, self.policy, state)
        self.checkpointer.requested = self.state.iteration
        self.checkpoint_clock = time.monotonic()

    def save(self) -> None:
        """Checkpoint the current iteration and wait until it is in the store."""
        self.checkpoint()
        self.checkpointer.wait()

    def save_what_is_learned(self) -> None:
        """After a failure (the first process), keep every complete update, so `--resume` loses at most the
        interrupted iteration. Sharded weights cannot be gathered once a process may be gone: the last checkpoint
        stands."""
        if self.learner.partial or self.learner.sharded:
            try:
                self.checkpointer.wait()
            except Exception:
                log.exception("the checkpoint being written when the run failed is lost")
            if self.learner.partial:
                log.warning(
                    "the failure came mid-update: resume starts after iteration %d, the last checkpoint",
                    self.checkpointer.saved,
                )
            return
        try:
            self.save()
        except Exception:
            log.exception(
                "could not save a checkpoint after the failure; resume starts after iteration %d",
                self.checkpointer.saved,
            )
        try:
            if self.state.iteration and self.state.iteration not in self.logged:  # its sync or logging failed
                self.log(self.metrics, self.state.iteration)
        except Exception:
            log.exception("could not log the metrics of iteration %d after the failure", self.state.iteration)

    # -- helpers of the phases ---------------------------------------------------------------------------------
    def encode(self, problems: list[Problem]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, problems, self.config.model.use_chat_template)

    def sampling(self, n: int) -> SamplingParams:
        return SamplingParams.from_config(self.config.sampler, n)
