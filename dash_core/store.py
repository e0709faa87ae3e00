"""The rollout store: a run's folder behind any fsspec URL (local folder by default, s3:// with s3fs).

Each iteration's batch is written once: one Parquet part per process that sampled it (its whole prompt groups),
then a JSON manifest naming every part. Files are written under a temporary name and moved into place, and the
manifest goes last, so a batch is complete exactly when its manifest exists. The store is the run's write-ahead
log: a batch holds everything its update needs, so a resumed run replays the updates of the batches newer than its
checkpoint instead of sampling them again, with any number of processes. Kept samples come first in each part, so
the learner reads them back by chunk and never touches the rest; the filtered ones stay for inspection. A batch's
kept rows are its parts' kept rows in part order, which is prompt order: the same rows however many processes
sampled it.
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
class BatchPart:
    """One process's share of a batch: a Parquet file of whole prompt groups, kept rows first."""

    path: str
    rows: int
    kept: int


@dataclass(frozen=True)
class BatchManifest:
    """What the learner needs to request a batch, and the iteration's scores (logged again if a crash lost them).
    A stored manifest keeps the times of the phases that made it apart (`timings`): they are not the batch's, which
    is the same whoever sampled it."""

    iteration: int
    parts: list[BatchPart]
    rows: int
    kept: int
    reward_mean: float
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchManifest:
        if "path" in data:  # written before batches had parts: one file
            data = data | {"parts": [{"path": data.pop("path"), "rows": data["rows"], "kept": data["kept"]}]}
        return cls(**data | {"parts": [BatchPart(**part) for part in data["parts"]]})


class RunStore:
    def __init__(self, url: str, run_id: str, storage_options: dict[str, Any] | None = None):
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.run_id = run_id
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
    def write_part(self, iteration: int, first_group: int, columns: dict[str, list]) -> BatchPart:
        """The rows of the prompt groups from `first_group` on; `columns` must hold a boolean `kept` column."""
        table = pa.table(columns)
        table = table.take(pa.array(sorted(range(table.num_rows), key=lambda i: not columns["kept"][i])))
        relpath = f"{_batch_dir(iteration)}/groups_{first_group:06d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(relpath, sink.getvalue().to_pybytes())
        return BatchPart(relpath, table.num_rows, sum(columns["kept"]))

    def write_manifest(self, manifest: BatchManifest) -> None:
        """The batch is complete from here on (its parts must be written)."""
        scores = {k: v for k, v in manifest.metrics.items() if not k.startswith("time/")}
        timings = manifest.timings | {k: v for k, v in manifest.metrics.items() if k.startswith("time/")}
        self.write_json(f"{_batch_dir(manifest.iteration)}/manifest.json", asdict(manifest) | {"metrics": scores, "timings": timings})

    def write_batch(self, iteration: int, columns: dict[str, list], metrics: dict[str, float] | None = None) -> BatchManifest:
        """A batch of one part. `columns` must hold a boolean `kept` and a numeric `reward` column."""
        part = self.write_part(iteration, 0, columns)
        rewards = columns["reward"]
        manifest = BatchManifest(iteration, [part], part.rows, part.kept, sum(rewards) / len(rewards), metrics or {})
        self.write_manifest(manifest)
        return manifest

    def has_batch(self, iteration: int) -> bool:
        return self.exists(f"{_batch_dir(iteration)}/manifest.json")

    def manifest(self, iteration: int) -> BatchManifest:
        if not self.has_batch(iteration):
            raise FileNotFoundError(f"no complete rollout batch for iteration {iteration} in {self.url}")
        return BatchManifest.from_json(self.read_json(f"{_batch_dir(iteration)}/manifest.json"))

    def read_batch(self, iteration: int) -> pa.Table:
        """Every row of a batch, part after part."""
        tables = []
        for part in self.manifest(iteration).parts:
            with self.fs.open(self.path(part.path), "rb") as f:
                tables.append(pq.read_table(f))
        return pa.concat_tables(tables)

    def kept_rows(self, manifest: BatchManifest, columns: list[str] | None = None, rows: range | None = None) -> dict[str, list]:
        """The kept rows of a batch (all, or those numbered `rows`) at once, by column."""
        table: dict[str, list] = {}
        for chunk in self.kept_chunks(manifest, max(manifest.kept, 1), columns, rows):
            table = {key: table.get(key, []) + values for key, values in chunk.items()}
        return table

    def kept_chunks(
        self, manifest: BatchManifest, size: int, columns: list[str] | None = None, rows: range | None = None
    ) -> Iterator[dict[str, list]]:
        """Kept samples of a batch (all, or the kept rows numbered `rows`), at most `size` at a time, as the
        learner asks; kept rows are numbered across the parts in order."""
        rows = range(manifest.kept) if rows is None else rows
        offset = 0  # kept rows before this part
        for part in manifest.parts:
            start, stop = max(rows.start - offset, 0), min(rows.stop - offset, part.kept)
            offset += part.kept
            if stop <= start:
                continue
            read = 0  # rows of this part's file read so far
            with self.fs.open(self.path(part.path), "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=size, columns=columns):
                    low, high = max(start - read, 0), min(stop - read, batch.num_rows)
                    if high > low:
                        yield batch.slice(low, high - low).to_pydict()
                    read += batch.num_rows
                    if read >= stop:
                        break


def _batch_dir(iteration: int) -> str:
    return f"rollouts/iter_{iteration:06d}"
