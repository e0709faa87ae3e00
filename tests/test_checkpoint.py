"""Checkpoints written in the background: the snapshot is the state at save time, and a crash mid-write (kill -9)
leaves the previous checkpoint in force."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import TINY
from safetensors.torch import load_file, save_file

from dash_core import loop
from dash_core.checkpoint import Checkpointer, load_latest
from dash_core.config import DashConfig
from dash_core.models import load_policy
from dash_core.run import TrainingRun
from dash_core.store import RunStore


def weights_of(model_dir) -> dict[str, torch.Tensor]:
    return load_policy(TINY, path=str(model_dir))[0].state_dict()


def test_the_snapshot_is_the_state_at_save_time(tmp_path):
    policy, tokenizer = load_policy(TINY)
    saved = {k: v.clone() for k, v in policy.state_dict().items()}
    store = RunStore(str(tmp_path / "store"), "run")
    checkpointer = Checkpointer(store, tokenizer, keep=2)
    checkpointer.save(1, policy, {"samples_total": 7})
    with torch.no_grad():  # training goes on while the write is in flight
        for param in policy.parameters():
            param.add_(1.0)
    checkpointer.wait()
    checkpoint = load_latest(store, tmp_path / "restored")
    assert checkpoint.iteration == 1 and checkpoint.trainer_state["samples_total"] == 7
    assert all(torch.equal(saved[k], v) for k, v in weights_of(checkpoint.model_dir).items())


CRASHING_WRITER = textwrap.dedent("""
    import pathlib, sys, time
    import torch
    from helpers import TINY
    from dash_core.checkpoint import Checkpointer
    from dash_core.models import load_policy
    from dash_core.store import RunStore

    root = pathlib.Path(sys.argv[1])
    policy, tokenizer = load_policy(TINY)
    store = RunStore(str(root / "store"), "run")
    checkpointer = Checkpointer(store, tokenizer, keep=2)
    checkpointer.save(1, policy, {})
    checkpointer.wait()
    copy_file = store.fs.put_file
    def slow_copy(local, remote, **kwargs):  # the second checkpoint's write stalls after its first file
        copy_file(local, remote, **kwargs)
        (root / "mid-write").touch()
        time.sleep(600)
    store.fs.put_file = slow_copy
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(1.0)
    checkpointer.save(2, policy, {})
    time.sleep(600)
""")


def test_a_crash_during_a_background_write_keeps_the_previous_checkpoint(tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.getcwd()])}
    writer = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], env=env)
    try:
        for _ in range(1200):
            if (tmp_path / "mid-write").exists() or writer.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "mid-write").exists(), "the writer never reached its second checkpoint"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    store = RunStore(str(tmp_path / "store"), "run")
    assert store.exists("checkpoints/iter_000002")  # the interrupted write left a partial folder behind
    checkpoint = load_latest(store, tmp_path / "restored")
    assert checkpoint.iteration == 1
    initial = load_policy(TINY)[0].state_dict()
    assert all(torch.equal(initial[k], v) for k, v in weights_of(checkpoint.model_dir).items())


def test_checkpoints_by_iterations_or_by_minutes(tmp_path, small_config):
    def checkpoints(every, every_minutes) -> list[str]:
        config = small_config.model_copy(deep=True)
        config.iterations, config.warmup.steps = 3, 0
        config.checkpoint = {"every": every, "every_minutes": every_minutes, "keep": 5}
        config = DashConfig.model_validate(config.model_dump())
        run = TrainingRun.start(config)
        loop.iterations(run, config.iterations)
        run.save()
        run.finish()
        return sorted(p.rsplit("/", 1)[-1] for p in run.store.fs.ls(run.store.path("checkpoints")) if "iter_" in p)

    assert checkpoints(2, None) == ["iter_000002", "iter_000003"]  # every 2nd, and the final state
    assert checkpoints(None, 1e-9) == ["iter_000001", "iter_000002", "iter_000003"]  # time is always up
    assert checkpoints(None, 60) == ["iter_000003"]  # only the final state


def corrupt_model(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_model(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4096:] = os.urandom(4096)  # same size, different weights: only the checksum can tell
    path.write_bytes(bytes(data))


def truncate_state(folder):
    path = folder / "trainer_state.pt"
    path.write_bytes(path.read_bytes()[:100])


def write_pointer(text):
    return lambda folder: (folder.parent / "latest.json").write_text(text)


@pytest.mark.parametrize(
    ("damage", "loaded", "warning"),
    [
        (corrupt_model, 1, "model.safetensors does not match its checksum"),
        (garble_model, 1, "model.safetensors does not match its checksum"),
        (truncate_state, 1, "trainer_state.pt does not match its checksum"),
        (lambda folder: (folder / "manifest.json").unlink(), 1, "no manifest: its write never finished"),
        (lambda folder: shutil.rmtree(folder), 1, "does not point at the newest valid checkpoint"),
        (write_pointer(""), 2, "latest.json (unreadable"),
        (write_pointer("{garbled"), 2, "latest.json (unreadable"),
        (write_pointer('{"iteration": 5, "path": "checkpoints/iter_000002"}'), 2, "does not point at the newest valid"),
    ],
    ids=["truncated weights", "garbage in weights", "truncated trainer state", "unfinished write", "pointer to a deleted folder",
         "empty pointer", "garbled pointer", "wrong iteration in pointer"],
)
def test_a_damaged_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, caplog, damage, loaded, warning):
    policy, tokenizer = load_policy(TINY)
    store = RunStore(str(tmp_path / "store"), "run")
    checkpointer = Checkpointer(store, tokenizer, keep=2)
    weights = {}
    for iteration in (1, 2):
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(iteration)
        weights[iteration] = {k: v.clone() for k, v in policy.state_dict().items()}
        checkpointer.save(iteration, policy, {"samples_total": iteration})
        checkpointer.wait()
    damage(tmp_path / "store" / "run" / "checkpoints" / "iter_000002")
    checkpoint = load_latest(store, tmp_path / "restored")
    assert checkpoint.iteration == loaded and checkpoint.trainer_state["samples_total"] == loaded
    assert all(torch.equal(weights[loaded][k], v) for k, v in weights_of(checkpoint.model_dir).items())
    assert warning in caplog.text


def nan_weights(folder):
    path = folder / "model.safetensors"
    weights = load_file(path)
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})


def without_manifests(damage):
    def both(folder):
        for name in ("iter_000001", "iter_000002"):
            (folder.parent / name / "manifest.json").unlink()
        damage(folder)

    return both


@pytest.mark.parametrize(
    ("damage", "loaded", "warning"),
    [
        (without_manifests(corrupt_model), 1, "model.safetensors does not load"),
        (without_manifests(nan_weights), 1, "holds NaN or inf"),
        (without_manifests(truncate_state), 1, "trainer_state.pt does not load"),
        (without_manifests(lambda folder: None), 2, "has no manifest"),
    ],
    ids=["truncated weights, no manifests", "NaN weights, no manifests",
         "truncated trainer state, no manifests", "intact, no manifests"],
)  # fmt: skip
def test_weights_that_do_not_load_or_are_not_finite_fall_back_too(tmp_path, caplog, damage, loaded, warning):
    test_a_damaged_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, caplog, damage, loaded, warning)


def test_weights_saved_with_nan_are_never_resumed_from(tmp_path, caplog):
    policy, tokenizer = load_policy(TINY)
    store = RunStore(str(tmp_path / "store"), "run")
    checkpointer = Checkpointer(store, tokenizer, keep=2)
    checkpointer.save(1, policy, {})
    with torch.no_grad():
        next(policy.parameters())[0, 0] = float("inf")
    checkpointer.save(2, policy, {})  # its manifest matches: only the values tell
    checkpointer.wait()
    assert load_latest(store, tmp_path / "restored").iteration == 1
    assert "holds NaN or inf" in caplog.text


def test_a_checkpoint_from_before_manifests_still_loads(tmp_path, caplog):
    policy, tokenizer = load_policy(TINY)
    store = RunStore(str(tmp_path / "store"), "run")
    checkpointer = Checkpointer(store, tokenizer, keep=2)
    checkpointer.save(3, policy, {})
    checkpointer.wait()
    (tmp_path / "store" / "run" / "checkpoints" / "iter_000003" / "manifest.json").unlink()
    assert load_latest(store, tmp_path / "restored").iteration == 3
    assert "has no manifest" in caplog.text
