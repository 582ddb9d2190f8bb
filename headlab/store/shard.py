"""Append-only shards, each committed atomically, and the format of their shard.json.

A shard is a directory `shards/<id>/` holding Parquet tables, a Zarr v3 group `arrays.zarr` and, written
last, `shard.json` (`ShardMeta`): the shard's condition, example ids, creation time, writer run, the sha256 and
size of every file, and its own checksum (`meta_checksum`; shard.json files of older stores have none). Lifetime of a `ShardWriter`:
1. `ShardWriter(shards_dir)` makes `shards/.tmp-<id>/` and records its writer (host, pid, start) in
   `.tmp-<id>/.writer.json`, so that `store verify --repair` can tell a live writer's folder from a stale one
   (`stale_reason`).
2. `table()` / `array()` write files. Arrays are float chunks, each followed by its CRC-32C (Zarr's
   `crc32c` codec), so every later read of a chunk is checked; the shard index inside each Zarr shard file
   carries a CRC-32C too (zarr's default).
3. `seal()` fsyncs every file and records its sha256 and size (the slow part; no lock needed).
4. `commit(meta)` drops the writer record, writes shard.json, renames the folder into place (atomic on
   POSIX) and fsyncs the parent. The store calls it under its lock, after checking the ids (store.py).
A writer killed at any point leaves either a committed shard or a `.tmp-*` folder that readers ignore, never
a half-visible shard. Writers in several processes write separate shards and never touch each other's files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import Crc32cCodec

from headlab.errors import StoreError
from headlab.store.ids import checked_id, kind_of

SCHEMA_VERSION = 1
SHARD_META = "shard.json"
ARRAYS = "arrays.zarr"
TMP_PREFIX = ".tmp-"
WRITER = ".writer.json"
STALE_AFTER_S = 6 * 3600  # a .tmp-* folder untouched this long is stale whoever wrote it


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


def chunks_checksummed(array_meta: dict) -> bool:
    """Whether a Zarr v3 array's zarr.json gives every data chunk a crc32c codec (the shard index's own
    crc32c, which zarr always writes, does not count)."""
    codecs = array_meta.get("codecs", [])
    for codec in codecs:
        if codec.get("name") == "sharding_indexed":
            codecs = codec.get("configuration", {}).get("codecs", [])
    return any(codec.get("name") == "crc32c" for codec in codecs)


def meta_checksum(obj: dict) -> str:
    """The sha256 of a shard.json's content without its "checksum" entry (canonical JSON)."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ShardMeta:
    """A committed shard's shard.json, checked: what readers trust about the shard."""

    id: str  # the folder name
    created: float
    condition: str
    examples: tuple[int | str, ...]
    files: dict[str, tuple[str, int]]  # relative path -> (sha256, bytes)
    run: dict
    schema_version: int

    def newer_problem(self, folder: Path) -> str | None:
        """Why this headlab cannot read the shard (written by a newer one), or None."""
        if self.schema_version <= SCHEMA_VERSION:
            return None
        return (
            f"{folder} has schema version {self.schema_version}, newer than this headlab reads "
            f"({SCHEMA_VERSION}); upgrade headlab"
        )

    @property
    def id_kind(self) -> str | None:
        return kind_of(self.examples[0]) if self.examples else None

    @classmethod
    def read(cls, folder: Path) -> ShardMeta:
        """The checked shard.json of `folder`, or a StoreError naming the file and what is wrong."""
        path = folder / SHARD_META
        if not path.is_file():
            raise StoreError(
                f"{folder} has no {SHARD_META}: it is not a committed shard and cannot be trusted"
            )
        try:
            return cls._parse(folder.name, json.loads(path.read_bytes()))
        except KeyError as err:
            problem = f"no {err} entry"
        except (OSError, ValueError, TypeError, AttributeError, StoreError) as err:
            problem = str(err)
        raise StoreError(f"{path} is unreadable or malformed ({problem})")

    @classmethod
    def _parse(cls, name: str, obj: object) -> ShardMeta:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
        if "checksum" in obj and obj["checksum"] != meta_checksum(obj):  # shard.json of older stores: none
            raise ValueError("its own checksum does not match its content (corrupted)")
        version = obj.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"schema version {version!r} is not an integer")
        created, condition = obj["created"], obj["condition"]
        if isinstance(created, bool) or not isinstance(created, int | float) or not math.isfinite(created):
            raise ValueError(f"'created' is {created!r}, not a time")
        if not isinstance(condition, str) or not condition:
            raise ValueError(f"'condition' is {condition!r}, not a name")
        if not isinstance(obj["examples"], list) or not isinstance(obj["files"], dict):
            raise ValueError("'examples' must be a list and 'files' an object")
        examples = tuple(checked_id(e) for e in obj["examples"])
        kinds = {kind_of(e) for e in examples}
        if len(kinds) > 1 or len(set(examples)) != len(examples):
            raise ValueError("'examples' mixes integer and string ids or repeats an id")
        files = {}
        for rel, info in obj["files"].items():
            parts = PurePosixPath(rel).parts
            if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
                raise ValueError(f"file entry {rel!r} is not a path inside the shard")
            digest, size = info["sha256"], info["bytes"]
            if not (isinstance(digest, str) and len(digest) == 64 and isinstance(size, int)):
                raise ValueError(f"file entry {rel!r} lacks a sha256 and size")
            files[rel] = (digest, size)
        run = obj.get("run") if isinstance(obj.get("run"), dict) else {}
        return cls(
            id=name,
            created=float(created),
            condition=condition,
            examples=examples,
            files=files,
            run=run,
            schema_version=version,
        )


class ShardWriter:
    """Builds one shard in a temp directory; `seal()` then `commit()` make it visible atomically, `abort()`
    drops it (module docstring: the lifetime)."""

    def __init__(self, shards_dir: Path, *, chunk_checksums: bool = True) -> None:
        """chunk_checksums=False writes arrays as headlab did before chunk checksums (reads of such arrays
        are verified by sha256 instead); only the store benchmark's baseline and the tests use it."""
        self.id = f"{uuid.uuid4().hex[:16]}"
        self.final = shards_dir / self.id
        self.tmp = shards_dir / f"{TMP_PREFIX}{self.id}"
        self.tmp.mkdir()  # shards/ must exist: a store whose shards/ vanished is not silently recreated
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        (self.tmp / WRITER).write_text(json.dumps(record))
        self._compressors = [Crc32cCodec()] if chunk_checksums else None
        self._group = None
        self._files: dict[str, dict] | None = None

    def table(self, name: str, frame: pd.DataFrame, *, schema=None) -> None:
        """`frame` as `<name>.parquet` (nothing for an empty frame); `schema`: an explicit pyarrow schema,
        for tables whose columns may be all null in one shard and filled in another."""
        if len(frame):
            frame.to_parquet(self.tmp / f"{name}.parquet", index=False, schema=schema)

    def array(self, name: str, data: np.ndarray, *, row_chunk: int = 1024) -> None:
        """A float array chunked along rows (one chunk per row block and per column of axis 1), with the
        chunks of each 8 row blocks packed into one Zarr shard file (few files, cheap random reads)."""
        if self._group is None:
            self._group = zarr.open_group(self.tmp / ARRAYS, mode="w")
        rows = max(1, min(row_chunk, data.shape[0]))
        chunks = (rows, *((1,) if data.ndim > 1 else ()), *data.shape[2:])
        shards = (rows * 8, *data.shape[1:])
        # Float activations barely compress (random mantissas) and zstd would cost most of the write time;
        # the only bytes-to-bytes codec is the chunk's CRC-32C.
        arr = self._group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=shards,
            compressors=self._compressors,
        )
        arr[...] = data

    def seal(self) -> None:
        """fsync every file and record its sha256 and size."""
        files = {}
        for path in files_of(self.tmp):
            if path.name == WRITER:
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[str(path.relative_to(self.tmp))] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        for sub in sorted({p.parent for p in files_of(self.tmp)}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(sub)
        self._files = files

    def commit(self, meta: dict) -> str:
        """Write shard.json (meta + the sealed file list) and rename the shard into place; returns its id."""
        if self._files is None:
            self.seal()
        (self.tmp / WRITER).unlink(missing_ok=True)
        body = {**meta, "id": self.id, "files": self._files}
        write_json_atomic(self.tmp / SHARD_META, {**body, "checksum": meta_checksum(body)})
        os.rename(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.id

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def stale_reason(tmp: Path, *, now: float | None = None) -> str | None:
    """Why the `.tmp-*` folder `tmp` is stale (its writer is gone), or None while a writer may own it.

    Stale when its writer record names this host and a pid that no longer runs, or when nothing in it was
    modified for STALE_AFTER_S (writers on other hosts, or no readable record). A live pid is never stale
    (a reused pid keeps a folder longer, never the other way round)."""
    now = time.time() if now is None else now
    try:
        record = json.loads((tmp / WRITER).read_text())
        host, pid = record["host"], int(record["pid"])
    except (OSError, ValueError, TypeError, KeyError):
        host, pid = None, None
    if host == socket.gethostname() and pid is not None:
        if _running(pid):
            return None
        return f"its writer (pid {pid} on {host}) is gone"
    newest = max((p.stat().st_mtime for p in [tmp, *tmp.rglob("*")]), default=0.0)
    idle_h = (now - newest) / 3600
    if now - newest > STALE_AFTER_S:
        return f"nothing in it changed for {idle_h:.0f} hours (writer: {host or 'unknown'})"
    return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
