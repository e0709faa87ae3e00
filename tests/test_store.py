"""Rollout store and checkpoint round trips on a local folder and on a real S3 API (moto's server on loopback)."""

from pathlib import Path

import pytest
from helpers import TINY

from dash_core.checkpoint import Checkpointer
from dash_core.models import load_policy
from dash_core.store import BatchManifest, RunStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStore(str(tmp_path / "store"), "run1")
    return RunStore(f"s3://{request.getfixturevalue('s3_bucket')}/prefix", "run1", request.getfixturevalue("s3_options"))


def batch_columns(n=10):
    return {
        "prompt_ids": [[1, 2, i] for i in range(n)],
        "completion_ids": [[i] * (1 + i % 3) for i in range(n)],
        "advantage": [float(i - 5) for i in range(n)],
        "sampler_logprobs": [[-0.5] * (1 + i % 3) for i in range(n)],
        "kept": [i % 3 != 0 for i in range(n)],
        "reward": [float(i % 2) for i in range(n)],
    }


def test_batch_round_trip_serves_kept_rows_in_chunks(store):
    columns = batch_columns()
    manifest = store.write_batch(3, columns)
    assert (manifest.rows, manifest.kept, manifest.reward_mean) == (10, 6, 0.5)
    assert store.manifest(3) == manifest
    chunks = list(store.kept_chunks(manifest, size=4, columns=["prompt_ids", "advantage"]))
    assert [len(c["advantage"]) for c in chunks] == [4, 2]
    served = sorted(a for c in chunks for a in c["advantage"])
    assert served == sorted(a for a, k in zip(columns["advantage"], columns["kept"]) if k)
    assert set(chunks[0]) == {"prompt_ids", "advantage"}
    middle = list(store.kept_chunks(manifest, size=4, columns=["advantage"], rows=range(3, 5)))
    assert [c["advantage"] for c in middle] == [[chunks[0]["advantage"][3]], chunks[1]["advantage"][:1]]
    table = store.read_batch(3)
    assert table.num_rows == 10 and sorted(table.column("advantage").to_pylist()) == sorted(columns["advantage"])


def test_incomplete_batch_is_not_served(store):
    with pytest.raises(FileNotFoundError, match="no complete rollout batch for iteration 9"):
        store.manifest(9)


def test_files_and_folders(store, tmp_path):
    store.write_json("a/b.json", {"x": [1, 2]})
    assert store.read_json("a/b.json") == {"x": [1, 2]}
    assert not [p for p in store.fs.ls(store.path("a"), detail=False) if ".tmp-" in p]
    local = tmp_path / "model"
    local.mkdir()
    (local / "w.bin").write_bytes(b"\x00\x01" * 1000)
    (local / "config.json").write_text("{}")
    store.put_dir(local, "ckpt/one")
    out = tmp_path / "back"
    out.mkdir()
    store.get_dir("ckpt/one", out)
    assert (out / "w.bin").read_bytes() == b"\x00\x01" * 1000 and (out / "config.json").read_text() == "{}"


def test_unwritable_store_is_explained(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="not writable.*Check store.url"):
        RunStore(str(blocker), "run")


def test_checkpoint_keep_counts_checkpoints_not_iterations(store):
    policy, tokenizer = load_policy(TINY)
    checkpointer = Checkpointer(store, tokenizer, keep=2)
    for iteration in (10, 20, 30):
        checkpointer.save(iteration, policy, {})
    checkpointer.wait()
    kept = sorted(Path(p).name for p in store.fs.ls(store.path("checkpoints"), detail=False))
    assert kept == ["iter_000020", "iter_000030", "latest.json"]


def test_a_batch_in_parts_serves_its_kept_rows_in_part_order(store):
    """Two processes' parts: the kept rows are part 0's then part 1's, whatever chunks and ranges ask for them."""
    columns = batch_columns()
    first, second = ({key: values[a:b] for key, values in columns.items()} for a, b in ((0, 4), (4, 10)))
    parts = [store.write_part(5, 0, first), store.write_part(5, 2, second)]
    manifest = BatchManifest(5, parts, 10, sum(p.kept for p in parts), 0.5)
    store.write_manifest(manifest)
    assert store.manifest(5) == manifest and [p.kept for p in parts] == [2, 4]
    kept = [a for a, k in zip(columns["advantage"], columns["kept"]) if k]  # each part's kept rows keep their order
    assert store.kept_rows(manifest, ["advantage"])["advantage"] == kept
    chunks = list(store.kept_chunks(manifest, size=3, columns=["advantage"], rows=range(1, 5)))
    assert [a for c in chunks for a in c["advantage"]] == kept[1:5]
    assert store.read_batch(5).num_rows == 10


def test_a_manifest_of_one_file_written_before_parts_still_loads(store):
    manifest = store.write_batch(2, batch_columns())
    store.write_json("rollouts/iter_000002/manifest.json", {"iteration": 2, "path": manifest.parts[0].path, "rows": 10,
                                                            "kept": 6, "reward_mean": 0.5, "metrics": {}})  # fmt: skip
    assert store.manifest(2) == manifest
