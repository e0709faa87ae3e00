"""Checkpoints in the run's store folder: model directory, optimizer, RNG states and iteration.

A checkpoint proves itself: its folder's `manifest.json`, written after every other file, lists each file's size
and SHA-256, and a checkpoint counts only when its files match it. `checkpoints/latest.json` then points at it
(written last, atomically). Loading takes the newest checkpoint that proves itself and says why it skips any
newer one (truncated or corrupt files, a write that never finished, a pointer that disagrees with its target).

Writing is off the training loop's path: `Checkpointer.save` copies the state into CPU memory on the caller's
thread (a memory copy, milliseconds even for GBs) and one background thread writes it, so the next iteration runs
while the files go to disk or S3. One write is in flight at a time: a save waits for the previous one.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.models import adapted, adapter_weights, base_digest, save_adapter, save_model
from dash_core.store import RunStore

log = logging.getLogger(__name__)
LATEST = "checkpoints/latest.json"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"


class InvalidCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest (or that has none): never loaded."""


@dataclass
class Checkpoint:
    iteration: int
    model_dir: Path  # a local copy, loadable with from_pretrained (or, a LoRA run's, with load_policy)
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
    base: dict[str, str] | None = None,
) -> str:
    """Write `weights` (a snapshot of `policy`'s state dict, or of its LoRA adapter's, which then names its `base`)
    and `trainer_state`, then move the pointer to them.

    `policy` only lends its config and class (its live weights may already be newer)."""
    name = f"checkpoints/iter_{iteration:06d}"
    with tempfile.TemporaryDirectory() as tmp:
        if base is None:
            save_model(policy, tokenizer, tmp, weights)
        else:
            save_adapter(policy, tokenizer, tmp, base, weights)
        torch.save({**trainer_state, "iteration": iteration}, Path(tmp) / TRAINER_STATE)
        files = {file.name: _fingerprint(file) for file in sorted(Path(tmp).iterdir())}
        store.put_dir(tmp, name)
    store.write_json(f"{name}/{MANIFEST}", {"iteration": iteration, "files": files})
    store.write_json(LATEST, {"iteration": iteration, "path": name})
    saved = sorted(p for p in store.fs.ls(store.path("checkpoints"), detail=False) if Path(p).name.startswith("iter_"))
    for old in saved[:-keep]:
        store.fs.rm(old, recursive=True)
    return store.path(name)


class Checkpointer:
    """Snapshots on the caller's thread, writes on one background thread; `saved` is the newest complete one."""

    def __init__(self, store: RunStore, tokenizer: PreTrainedTokenizerBase, keep: int, base_source: str = ""):
        """`base_source`: the base model a LoRA adapter is trained on (a model name, or the folder of a warm-up)."""
        self.store = store
        self.tokenizer = tokenizer
        self.keep = keep
        self.base_source = base_source
        self._base: dict[str, str] | None = None  # base_source and its checksum, once computed (the base is frozen)
        self.saved = 0  # iteration of the newest checkpoint whose pointer is written
        self.requested = 0  # iteration of the newest snapshot (written, or being written)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dash-checkpoint")
        self._pending: Future | None = None

    def save(self, iteration: int, policy: PreTrainedModel, trainer_state: dict[str, Any]) -> None:
        """Snapshot `policy` and `trainer_state` (with the RNG states) now; write them in the background."""
        self.wait()
        weights = cpu_copy(adapter_weights(policy) if adapted(policy) else policy.state_dict())
        state = cpu_copy({**trainer_state, "rng": rng_state()})
        self._pending = self._writer.submit(self._write, iteration, policy, weights, state)
        self.requested = iteration

    def _write(self, iteration: int, policy: PreTrainedModel, weights: dict, state: dict) -> None:
        if adapted(policy) and self._base is None:
            self._base = {"source": self.base_source, "sha256": base_digest(policy)}
        base = self._base if adapted(policy) else None
        write_checkpoint(self.store, iteration, policy, self.tokenizer, weights, state, self.keep, base)
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


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def load_latest(store: RunStore, local_dir: str | Path) -> Checkpoint | None:
    """Copy the newest checkpoint that proves itself into a folder of `local_dir` (its `model_dir`); None when the
    run has none.

    Newer checkpoints that fail their manifest, or whose weights or trainer state do not load or hold NaN or inf,
    are skipped with a warning naming the problem."""
    names = sorted((Path(p).name for p in _listing(store) if Path(p).name.startswith("iter_")), reverse=True)
    pointer = _pointer(store)
    legacy = not any(store.exists("checkpoints", name, MANIFEST) for name in names)
    for name in names:
        folder = Path(local_dir) / name
        try:
            checkpoint = _verified(store, f"checkpoints/{name}", folder, legacy)
        except InvalidCheckpoint as exc:
            log.warning("skipping checkpoint %s: %s", store.path("checkpoints", name), exc)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if pointer != {"iteration": checkpoint.iteration, "path": f"checkpoints/{name}"}:
            log.warning(
                "checkpoints/latest.json (%s) does not point at the newest valid checkpoint; using %s", pointer, name
            )
        return checkpoint
    return None


def _check_weights(folder: Path) -> None:
    """Every weight file loads and holds only finite numbers: a run must never resume from NaN weights."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidCheckpoint("it holds no weights (*.safetensors)")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():
                    tensor = weights.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise InvalidCheckpoint(f"{path.name}: {key} holds NaN or inf")
        except SafetensorError as exc:
            raise InvalidCheckpoint(f"{path.name} does not load ({exc})") from None


def _listing(store: RunStore) -> list[str]:
    return store.fs.ls(store.path("checkpoints"), detail=False) if store.exists("checkpoints") else []


def _pointer(store: RunStore) -> Any:
    try:
        return store.read_json(LATEST)
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"


def _verified(store: RunStore, relpath: str, folder: Path, legacy: bool) -> Checkpoint:
    """Download a checkpoint and check every file against its manifest, the iteration it claims everywhere, and
    that its weights and trainer state load, every weight finite.

    `legacy`: no checkpoint of the run has a manifest (written before checkpoints had them, or the manifests were
    lost), so only what loads can be checked; where some have one, one without never finished its write."""
    iteration = int(relpath.rsplit("_", 1)[-1])
    folder.mkdir(parents=True, exist_ok=True)
    try:
        manifest = store.read_json(f"{relpath}/{MANIFEST}")
    except FileNotFoundError:
        if not legacy:
            raise InvalidCheckpoint("no manifest: its write never finished") from None
        log.warning(
            "checkpoint %s has no manifest (it predates checksums, or it was lost): checking only that it loads",
            store.path(relpath),
        )
        store.get_dir(relpath, folder)
        manifest = {"iteration": iteration, "files": {}}
    except ValueError as exc:
        raise InvalidCheckpoint(f"unreadable manifest ({exc})") from None
    if manifest.get("iteration") != iteration:
        raise InvalidCheckpoint(f"its manifest says iteration {manifest.get('iteration')}, its name {iteration}")
    for file, expected in manifest["files"].items():
        try:
            store.fs.get_file(store.path(relpath, file), str(folder / file))
        except FileNotFoundError:
            raise InvalidCheckpoint(f"{file} is missing") from None
        found = _fingerprint(folder / file)
        if found != expected:
            raise InvalidCheckpoint(
                f"{file} does not match its checksum ({found['bytes']} bytes, {expected['bytes']} expected)"
            )
    _check_weights(folder)
    try:
        state = torch.load(folder / TRAINER_STATE, weights_only=False)
    except Exception as exc:  # truncated or garbled: whatever the unpickler raised
        raise InvalidCheckpoint(f"{TRAINER_STATE} does not load ({exc})") from None
    if state.get("iteration") != iteration:
        raise InvalidCheckpoint(f"its trainer state says iteration {state.get('iteration')}")
    return Checkpoint(iteration, folder, state)
