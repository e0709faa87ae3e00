"""A run's outside world, checked before the run creates anything (an MLflow run, a store folder): the model
and its tokenizer, the data files and their rows, the device, and whether the store and the tracking database can
be written. Each problem is one `ConfigError` line that names the field, what is wrong, and the fix."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

import fsspec
import torch

from dash_core.config import ConfigError, DashConfig, ModelConfig, StoreConfig, TrackingConfig
from dash_core.data import Problem, Task, build_task, eval_sets
from dash_core.model_zoo import ZOO
from dash_core.models import TINY
from dash_core.rewards.code import allow_weak_sandbox, isolation_problem
from dash_core.tracking import check_reachable, check_scheme, sqlite_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_run(config: DashConfig) -> tuple[Task, dict[str, list[Problem]]]:
    """Every check below; returns the training task and evaluation sets it loaded (rows included)."""
    check_model(config.model)
    check_device(config.model.device)
    data = load_data(config)
    check_sandbox(config, problem_sets(data))
    check_tracking(config.tracking)
    check_store(config.store)
    return data


def check_model(cfg: ModelConfig) -> None:
    """A local model must be a saved model directory with its tokenizer; a hub id is checked when it loads."""
    name = cfg.name
    path = Path(name).expanduser()
    if name == TINY or name in ZOO or not (name.startswith(("/", ".", "~")) or path.exists()):
        return
    if not path.is_dir():
        raise ConfigError(
            f"model.name {name!r}: no such directory. Give a saved model directory, a hub id such as "
            f"Qwen/Qwen2.5-0.5B, '{TINY}', or a zoo name ({', '.join(ZOO)})"
        )
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise ConfigError(f"model.gguf_file {cfg.gguf_file!r} is not in {path}")
        return
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name {name!r} is a directory without config.json, not a saved model (save one with save_pretrained)")
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        raise ConfigError(f"model directory {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the tokenizer beside the model")


def check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name}, but torch sees no CUDA device on this machine: use model.device=cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"model.device={name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_data(config: DashConfig) -> tuple[Task, dict[str, list[Problem]]]:
    """The task and the evaluation sets, every row read: a missing file or a bad row (file:line) fails here."""
    try:
        task = build_task(config.task, config.seed)
        return task, eval_sets(config, task)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"task / eval.datasets: {exc}") from None


def problem_sets(data: tuple[Task, dict[str, list[Problem]]]) -> list[list[Problem]]:
    """A run's kinds of problem: the training task's first problem and every evaluation set."""
    task, sets = data
    return [task.train_problems(0, 1), *sets.values()]


def runs_code(problem_sets: Iterable[list[Problem]]) -> bool:
    return any(problem.kind == "code" for problems in problem_sets for problem in problems)


def check_sandbox(config: DashConfig, problem_sets: list[list[Problem]]) -> None:
    """Programs a code reward runs are isolated by bubblewrap, or by nothing at all: where it cannot run here, a run
    that grades code refuses to start unless reward.sandbox=weak accepts the weaker sandbox. This process's code
    grading follows that choice from here on."""
    allow_weak_sandbox(config.reward.sandbox == "weak")
    if config.reward.sandbox == "bubblewrap" and runs_code(problem_sets) and (problem := isolation_problem()):
        raise ConfigError(f"reward.sandbox=bubblewrap: {problem}")


def check_store(cfg: StoreConfig) -> None:
    """The store's root takes a file (the run's own folder is made only once the run starts); a root the check had
    to make is removed again, so a run that fails a later check leaves nothing."""
    try:
        fs, root = fsspec.core.url_to_fs(cfg.url, **cfg.storage_options)
        probe = f"{root.rstrip('/')}/.dash-write-check-{uuid.uuid4().hex}"
        made = not fs.exists(root)
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
        if made and "file" in fs.protocol:  # object stores have no folders to leave behind
            fs.rmdir(root)
    except Exception as exc:  # each filesystem fails its own way; all mean the same to the user
        raise ConfigError(
            f"store.url {cfg.url!r} is not writable ({type(exc).__name__}: {exc}). Point store.url at a folder or "
            "bucket you can write, or fix its credentials (store.storage_options or the AWS_* variables)"
        ) from None


def check_tracking(cfg: TrackingConfig) -> None:
    """MLflow has a store for the URI's scheme; a server answers; a sqlite database goes in an existing, writable
    folder (MLflow would silently create a mistyped one)."""
    check_scheme(cfg.uri)
    check_reachable(cfg.uri)
    path = sqlite_path(cfg.uri)
    if path is None:
        return
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise ConfigError(f"tracking.uri {cfg.uri}: folder {folder} does not exist; create it, or fix the path")
    probe = path if path.exists() else folder / f".dash-write-check-{uuid.uuid4().hex}"
    try:
        probe.open("ab").close()
        if probe != path:
            probe.unlink()
    except OSError as exc:
        raise ConfigError(f"tracking.uri {cfg.uri}: cannot write the database {path} ({exc.strerror}); use one you can write") from None
