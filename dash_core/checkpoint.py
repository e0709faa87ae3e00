"""Checkpoints in the run's store folder: model directory, optimizer, RNG states and iteration.

A checkpoint counts only once `checkpoints/latest.json` points at it; that pointer is written last (atomically),
so a crash while saving leaves the previous checkpoint in force.

Writing is off the training loop's path: `Checkpointer.save` copies the state into CPU memory on the caller's
thread (a memory copy, milliseconds even for GBs) and one background thread writes it, so the next iteration runs
while the files go to disk or S3. One write is in flight at a time: a save waits for the previous one.
"""

from __future__ import annotations

import random
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
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


def cpu_copy(tree: Any) -> Any:
    """Tensors anywhere in `tree` copied to CPU memory, so training can go on changing the originals."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: cpu_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(value) for value in tree)
    return tree


def write_checkpoint(
    store: RunStore,
    iteration: int,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    weights: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    keep: int,
) -> str:
    """Write `weights` (a snapshot of `policy`'s state dict) and `trainer_state`, then move the pointer to them.

    `policy` only lends its config and class (its live weights may already be newer)."""
    name = f"checkpoints/iter_{iteration:06d}"
    with tempfile.TemporaryDirectory() as tmp:
        save_model(policy, tokenizer, tmp, weights)
        torch.save({**trainer_state, "iteration": iteration}, Path(tmp) / TRAINER_STATE)
        store.put_dir(tmp, name)
    store.write_json(LATEST, {"iteration": iteration, "path": name})
    saved = sorted(p for p in store.fs.ls(store.path("checkpoints"), detail=False) if Path(p).name.startswith("iter_"))
    for old in saved[:-keep]:
        store.fs.rm(old, recursive=True)
    return store.path(name)


class Checkpointer:
    """Snapshots on the caller's thread, writes on one background thread; `saved` is the newest complete one."""

    def __init__(self, store: RunStore, tokenizer: PreTrainedTokenizerBase, keep: int):
        self.store = store
        self.tokenizer = tokenizer
        self.keep = keep
        self.saved = 0  # iteration of the newest checkpoint whose pointer is written
        self.requested = 0  # iteration of the newest snapshot (written, or being written)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dash-checkpoint")
        self._pending: Future | None = None

    def save(self, iteration: int, policy: PreTrainedModel, trainer_state: dict[str, Any]) -> None:
        """Snapshot `policy` and `trainer_state` (with the RNG states) now; write them in the background."""
        self.wait()
        weights = cpu_copy(policy.state_dict())
        state = cpu_copy({**trainer_state, "rng": rng_state()})
        self._pending = self._writer.submit(self._write, iteration, policy, weights, state)
        self.requested = iteration

    def _write(self, iteration: int, policy: PreTrainedModel, weights: dict, state: dict) -> None:
        write_checkpoint(self.store, iteration, policy, self.tokenizer, weights, state, self.keep)
        self.saved = iteration

    def wait(self) -> None:
        """Block until the write in flight is complete; a failed write raises here, naming its iteration."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as exc:
                raise OSError(f"writing a checkpoint to {self.store.url} failed: {exc}. Check store.url, its space and "
                              "credentials; the previous checkpoint is still in force") from exc  # fmt: skip


def load_latest(store: RunStore, local_dir: str | Path) -> Checkpoint | None:
    """Copy the latest checkpoint to `local_dir`; None when the run has none yet."""
    if not store.exists(LATEST):
        return None
    pointer = store.read_json(LATEST)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    store.get_dir(pointer["path"], local_dir)
    state = torch.load(Path(local_dir) / TRAINER_STATE, weights_only=False)
    return Checkpoint(pointer["iteration"], Path(local_dir), state)
