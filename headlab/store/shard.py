"""Append-only shards, each committed atomically.

A shard is a directory `shards/<id>/` holding Parquet tables, a Zarr v3 group `arrays.zarr` and, written
last, `shard.json` with the sha256 and size of every file. It is built under `shards/.tmp-<id>/`; every
file is fsynced, then the directory is renamed into place (atomic on POSIX) and the parent fsynced. A
writer killed at any point leaves either a committed shard or a `.tmp-*` directory that readers ignore,
never a half-visible shard. Writers in several processes write separate shards and never touch each
other's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

SHARD_META = "shard.json"
ARRAYS = "arrays.zarr"
TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON via a temp file, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


class ShardWriter:
    """Builds one shard in a temp directory; `commit()` makes it visible atomically, `abort()` drops it."""

    def __init__(self, shards_dir: Path) -> None:
        self.id = f"{uuid.uuid4().hex[:16]}"
        self.final = shards_dir / self.id
        self.tmp = shards_dir / f"{TMP_PREFIX}{self.id}"
        self.tmp.mkdir(parents=True)
        self._group = None

    def table(self, name: str, frame: pd.DataFrame) -> None:
        if len(frame):
            frame.to_parquet(self.tmp / f"{name}.parquet", index=False)

    def array(self, name: str, data: np.ndarray, *, row_chunk: int = 1024) -> None:
        """A float array chunked along rows (one chunk per row block and per column of axis 1), with the
        chunks of each 8 row blocks packed into one Zarr shard file (few files, cheap random reads)."""
        if self._group is None:
            self._group = zarr.open_group(self.tmp / ARRAYS, mode="w")
        rows = max(1, min(row_chunk, data.shape[0]))
        chunks = (rows, *((1,) if data.ndim > 1 else ()), *data.shape[2:])
        shards = (rows * 8, *data.shape[1:])
        # Float activations barely compress (random mantissas) and zstd would cost most of the write time.
        arr = self._group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards, compressors=None
        )
        arr[...] = data

    def commit(self, meta: dict) -> str:
        files = {}
        for path in files_of(self.tmp):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[str(path.relative_to(self.tmp))] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        for sub in sorted({p.parent for p in files_of(self.tmp)}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(sub)
        write_json_atomic(self.tmp / SHARD_META, {**meta, "id": self.id, "files": files})
        os.rename(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.id

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
