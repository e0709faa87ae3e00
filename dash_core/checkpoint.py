"""Checkpoints in the run's store folder: model directory, optimizer, RNG states and iteration.

A checkpoint counts only once `checkpoints/latest.json` points at it; that pointer is written last (atomically),
so a crash while saving leaves the previous checkpoint in force.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.models import save_model
from dash_core.store import RunStore

LATEST = "checkpoints/latest.json"
TRAINER_STATE = "trainer_state.pt"


@dataclass
class Checkpoint:
    iteration: int
    model_dir: Path  # a local copy, loadable with from_pretrained
    trainer_state: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    store: RunStore,
    iteration: int,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    trainer_state: dict[str, Any],
    keep: int,
) -> str:
    name = f"checkpoints/iter_{iteration:06d}"
    with tempfile.TemporaryDirectory() as tmp:
        save_model(policy, tokenizer, tmp)
        torch.save({**trainer_state, "iteration": iteration, "rng": rng_state()}, Path(tmp) / TRAINER_STATE)
        store.put_dir(tmp, name)
    store.write_json(LATEST, {"iteration": iteration, "path": name})
    saved = sorted(p for p in store.fs.ls(store.path("checkpoints"), detail=False) if Path(p).name.startswith("iter_"))
    for old in saved[:-keep]:
        store.fs.rm(old, recursive=True)
    return store.path(name)


def load_latest(store: RunStore, local_dir: str | Path) -> Checkpoint | None:
    """Copy the latest checkpoint to `local_dir`; None when the run has none yet."""
    if not store.exists(LATEST):
        return None
    pointer = store.read_json(LATEST)
    store.get_dir(pointer["path"], local_dir)
    state = torch.load(Path(local_dir) / TRAINER_STATE, weights_only=False)
    return Checkpoint(pointer["iteration"], Path(local_dir), state)
