"""The rollout store: a run's folder behind any fsspec URL (local folder by default, s3:// with s3fs).

Each iteration's batch is written once, as one Parquet file plus a JSON manifest. Files are written under a
temporary name and moved into place, and the manifest goes last, so a batch is complete exactly when its manifest
exists. The store is the run's write-ahead log: a batch holds everything its update needs, so a resumed run
replays the updates of the batches newer than its checkpoint instead of sampling them again. Kept samples come first in the file, so the learner reads them back by chunk and never touches the rest;
the filtered ones stay in the file for inspection.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class BatchManifest:
    """What the learner needs to request a batch, and the iteration's scores (logged again if a crash lost them)."""

    iteration: int
    path: str
    rows: int
    kept: int
    reward_mean: float
    metrics: dict[str, float] = field(default_factory=dict)


class RunStore:
    def __init__(self, url: str, run_id: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = posixpath.join(root.rstrip("/"), run_id)
        self.url = url.rstrip("/") + "/" + run_id
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except (OSError, PermissionError) as exc:
            raise OSError(f"rollout store {url!r} is not writable: {exc}. Check store.url and its credentials.") from exc

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    # -- small files -------------------------------------------------------------------------------------------
    def write_bytes(self, relpath: str, data: bytes) -> None:
        target = self.path(relpath)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, target)

    def read_bytes(self, relpath: str) -> bytes:
        with self.fs.open(self.path(relpath), "rb") as f:
            return f.read()

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_bytes(relpath, json.dumps(obj, indent=1).encode())

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath))

    # -- folders (checkpoints) ---------------------------------------------------------------------------------
    def put_dir(self, local: str | Path, relpath: str) -> None:
        self.fs.makedirs(self.path(relpath), exist_ok=True)
        for file in sorted(Path(local).iterdir()):
            self.fs.put_file(str(file), self.path(relpath, file.name))

    def get_dir(self, relpath: str, local: str | Path) -> None:
        for remote in self.fs.ls(self.path(relpath), detail=False):
            self.fs.get_file(remote, str(Path(local) / posixpath.basename(remote)))

    # -- rollout batches ---------------------------------------------------------------------------------------
    def write_batch(self, iteration: int, columns: dict[str, list], metrics: dict[str, float] | None = None) -> BatchManifest:
        """`columns` must hold a boolean `kept` and a numeric `reward` column; kept rows are written first."""
        table = pa.table(columns)
        table = table.take(pa.array(sorted(range(table.num_rows), key=lambda i: not columns["kept"][i])))
        relpath = f"rollouts/iter_{iteration:06d}/batch.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(relpath, sink.getvalue().to_pybytes())
        rewards = columns["reward"]
        manifest = BatchManifest(iteration, relpath, table.num_rows, sum(columns["kept"]), sum(rewards) / len(rewards), metrics or {})
        self.write_json(f"rollouts/iter_{iteration:06d}/manifest.json", asdict(manifest))
        return manifest

    def has_batch(self, iteration: int) -> bool:
        return self.exists(f"rollouts/iter_{iteration:06d}/manifest.json")

    def manifest(self, iteration: int) -> BatchManifest:
        if not self.has_batch(iteration):
            raise FileNotFoundError(f"no complete rollout batch for iteration {iteration} in {self.url}")
        return BatchManifest(**self.read_json(f"rollouts/iter_{iteration:06d}/manifest.json"))

    def read_batch(self, iteration: int) -> pa.Table:
        with self.fs.open(self.path(self.manifest(iteration).path), "rb") as f:
            return pq.read_table(f)

    def kept_rows(self, manifest: BatchManifest, columns: list[str] | None = None, rows: range | None = None) -> dict[str, list]:
        """The kept rows of a batch (all, or those numbered `rows`) at once, by column."""
        table = {}
        for chunk in self.kept_chunks(manifest, max(manifest.kept, 1), columns, rows):
            table = chunk
        return table

    def kept_chunks(
        self, manifest: BatchManifest, size: int, columns: list[str] | None = None, rows: range | None = None
    ) -> Iterator[dict[str, list]]:
        """Kept samples of a batch (all, or the kept rows numbered `rows`), `size` at a time, as the learner asks."""
        rows = range(manifest.kept) if rows is None else rows
        start, stop = rows.start, min(rows.stop, manifest.kept)
        offset = 0
        with self.fs.open(self.path(manifest.path), "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=size, columns=columns):
                low, high = max(start - offset, 0), min(stop - offset, batch.num_rows)
                if high > low:
                    yield batch.slice(low, high - low).to_pydict()
                offset += batch.num_rows
                if offset >= stop:
                    return
