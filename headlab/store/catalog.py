"""The committed shards of one store as every reader sees them: listed, checked, ordered, deduplicated, and
every stored file verified before its bytes are used.

Contract (what `Store` relies on; `integrity.py` reports and repairs what breaks it):
- Listing. `shards/` must exist. In it, a `.tmp-*` folder is a shard being written (or left by a writer
  that stopped): readers ignore it. Plain files are ignored. Every other folder must be a committed shard
  whose shard.json is valid (`ShardMeta.read`); a folder without one, or with a corrupt one, is untrusted and
  every read raises a StoreError naming it and pointing to `headlab store verify STORE --repair`.
- Opening a shard (once per `Catalog`, when it first appears): every file shard.json lists exists with its
  recorded size, and no other file (dot-files aside) is in the folder; otherwise a StoreError names the file.
- Reading a file. Parquet tables and Zarr metadata (zarr.json) are checked against their sha256 before their
  first use in the process (cached by path, inode, size and times). Zarr chunks written with a crc32c codec are
  checked by zarr at every read (and every read first checks that the array's files are there with their
  sizes: a missing file would read as zeros); arrays written before that (no crc32c in their zarr.json) have every file
  checked against its sha256 when the array is first opened. A read that fails re-checks the array's files
  and raises a StoreError naming the ones that differ from shard.json.
- Order and duplicates. Shards are ordered by (created, id). For each (example, condition) the earliest
  shard that lists it owns it ("first commit wins"); the same (example, condition) in a later shard is
  `shadowed` there: every reader drops those rows, and `duplicates` counts them.
- Id kind. The first shard (in that order) that lists an example fixes the store's id kind; a shard with ids
  of the other kind is untrusted (StoreError naming it, repairable).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import zarr

from headlab.errors import StoreError
from headlab.store.ids import KIND_WORDS
from headlab.store.shard import ARRAYS, SHARD_META, TMP_PREFIX, ShardMeta, chunks_checksummed, sha256_of

_VERIFIED: set[tuple] = set()  # (path, inode, size, mtime_ns, ctime_ns) whose sha256 matched, this process


def repair_hint(root: Path) -> str:
    return (
        f"run `headlab store verify {root}` to list every problem; `headlab store verify {root} --repair` "
        f"moves what cannot be trusted to {root / 'quarantine'} (nothing is deleted)"
    )


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Catalog:
    """The committed shards of the store at `root` (module docstring: the contract)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shards_dir = root / "shards"
        self.checked = True  # False only in benchmarks/store_io.py: the unverified baseline
        self.version = 0  # bumped whenever the set of committed shards changes
        self._metas: dict[str, ShardMeta] = {}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._chunk_files: dict[tuple[str, str], list[str]] = {}
        self._derive({})

    # ----- listing ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up shards committed (or removed) since the last call; raises on an untrusted folder."""
        names = self._listing()
        if names == set(self._metas):
            return
        metas = {n: self._metas[n] if n in self._metas else self._open(n) for n in names}
        self._derive(metas)
        self._arrays = {k: v for k, v in self._arrays.items() if k[0] in names}
        self._chunk_files = {k: v for k, v in self._chunk_files.items() if k[0] in names}
        self.version += 1

    def _listing(self) -> set[str]:
        if not self.shards_dir.is_dir():
            raise StoreError(
                f"{self.root} has no shards/ folder (deleted or moved?): if you moved it, put it back; "
                f"`headlab store verify {self.root} --repair` recreates it empty"
            )
        with os.scandir(self.shards_dir) as entries:
            return {e.name for e in entries if e.is_dir() and not e.name.startswith(TMP_PREFIX)}

    def _open(self, name: str) -> ShardMeta:
        folder = self.shards_dir / name
        try:
            meta = ShardMeta.read(folder)
        except StoreError as err:
            raise StoreError(f"{err}; {repair_hint(self.root)}") from None
        if meta.newer_problem(folder):
            raise StoreError(meta.newer_problem(folder))
        problems = listing_problems(folder, meta) if self.checked else {}
        if problems:
            raise StoreError(f"{next(iter(problems.values()))}; {repair_hint(self.root)}")
        return meta

    def _derive(self, metas: dict[str, ShardMeta]) -> None:
        """Order, id kind, owners and shadowed rows of `metas` (checked before anything is replaced)."""
        own = ownership(metas)
        if own.foreign:
            raise StoreError(
                f"{foreign_problem(self.shards_dir / own.foreign[0], own)}; {repair_hint(self.root)}"
            )
        self._metas, self.order, self.id_kind = metas, own.order, own.id_kind
        self.owner, self.shadowed, self.duplicates = own.owner, own.shadowed, own.duplicates
        self._conditions = sorted({c for _, c in own.owner})

    # ----- what is committed --------------------------------------------------------------------------
    def meta(self, shard: str) -> ShardMeta:
        return self._metas[shard]

    def conditions(self) -> list[str]:
        return list(self._conditions)

    def committed(self, condition: str) -> set[int | str]:
        return {e for e, c in self.owner if c == condition}

    def holding(self, rel: str) -> list[str]:
        """The shards (in order) whose shard.json lists the file `rel`, e.g. "head_stats.parquet"."""
        return [s for s in self.order if rel in self._metas[s].files]

    # ----- verified files -----------------------------------------------------------------------------
    def verified(self, shard: str, rel: str) -> Path:
        """The path of a listed file, after checking its sha256 (once per process)."""
        path = self.shards_dir / shard / rel
        if self.checked:
            try:
                stamp = _stamp(path)
                if stamp not in _VERIFIED:
                    self._check_digest(shard, rel, sha256_of(path))
                    _VERIFIED.add(stamp)
            except OSError as err:
                raise StoreError(f"{path} is unreadable ({err}); {repair_hint(self.root)}") from None
        return path

    def read_bytes(self, shard: str, rel: str) -> bytes:
        """A listed file's bytes, checked against its sha256 (the same bytes are hashed and returned)."""
        path = self.shards_dir / shard / rel
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StoreError(f"{path} is unreadable ({err}); {repair_hint(self.root)}") from None
        if self.checked:
            self._check_digest(shard, rel, hashlib.sha256(data).hexdigest())
        return data

    def _check_digest(self, shard: str, rel: str, digest: str) -> None:
        if digest != self._metas[shard].files[rel][0]:
            raise StoreError(
                f"{self.shards_dir / shard / rel} does not match its checksum in shard.json (corrupted); "
                f"{repair_hint(self.root)}"
            )

    # ----- arrays -------------------------------------------------------------------------------------
    def array(self, shard: str, name: str) -> zarr.Array:
        """A stored Zarr array, opened once: its metadata verified, and every file of it verified when its
        chunks carry no crc32c (arrays written before chunk checksums)."""
        key = (shard, name)
        if key not in self._arrays:
            files = self._metas[shard].files
            meta_rel = f"{ARRAYS}/{name}/zarr.json"
            if meta_rel not in files:
                raise StoreError(f"{self.shards_dir / shard / ARRAYS / name} is not listed in shard.json")
            for rel in _metadata_files(name, files):
                self.verified(shard, rel)
            if self.checked and not chunks_checksummed(json.loads(self.read_bytes(shard, meta_rel))):
                for rel in self._array_files(shard, name):
                    self.verified(shard, rel)
            self._arrays[key] = zarr.open_array(self.shards_dir / shard / ARRAYS, path=name, mode="r")
        return self._arrays[key]

    def read(self, shard: str, name: str, selection: tuple) -> object:
        """`array.get_orthogonal_selection(selection)`, after checking that the array's files are all there
        with their sizes (a file deleted after the shard was opened would read as zeros); a failed read
        names the array's files that differ from shard.json."""
        array = self.array(shard, name)
        if self.checked:
            for rel in self._array_files(shard, name):
                path = self.shards_dir / shard / rel
                size = path.stat().st_size if path.is_file() else None
                if size != self._metas[shard].files[rel][1]:
                    raise StoreError(
                        f"{path} is missing or changed size since the shard was opened; {repair_hint(self.root)}"
                    )
        try:
            return array.get_orthogonal_selection(selection)
        except Exception as err:
            bad = self._corrupted(shard, name)
            if not bad:
                raise
            raise StoreError(
                f"reading {self.shards_dir / shard / ARRAYS / name} failed ({str(err).split('.')[0]}): "
                f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not match shard.json; "
                f"{repair_hint(self.root)}"
            ) from None

    def _array_files(self, shard: str, name: str) -> list[str]:
        """The chunk files of one array (its zarr.json aside), as shard.json lists them."""
        key = (shard, name)
        if key not in self._chunk_files:
            prefix = f"{ARRAYS}/{name}/"
            files = self._metas[shard].files
            self._chunk_files[key] = [
                r for r in files if r.startswith(prefix) and not r.endswith("zarr.json")
            ]
        return self._chunk_files[key]

    def _corrupted(self, shard: str, name: str) -> list[str]:
        folder = self.shards_dir / shard
        out = []
        for rel in self._array_files(shard, name):
            path = folder / rel
            digest, size = self._metas[shard].files[rel]
            ok = path.is_file() and path.stat().st_size == size
            if not ok or sha256_of(path) != digest:
                out.append(str(path))
        return out


@dataclass(frozen=True)
class Ownership:
    """Who owns each (example, condition): the first commit (module docstring)."""

    order: list[str]  # shard ids by (created, id), foreign ones left out
    id_kind: str | None
    owner: dict[tuple, str]  # (example, condition) -> shard
    shadowed: dict[str, frozenset]  # shard -> its examples an earlier shard owns (their rows are ignored)
    foreign: list[str]  # shards whose ids are of the other kind than the store's

    @property
    def duplicates(self) -> int:
        return sum(len(v) for v in self.shadowed.values())


def ownership(metas: dict[str, ShardMeta]) -> Ownership:
    order = sorted(metas, key=lambda s: (metas[s].created, s))
    kind = next((metas[s].id_kind for s in order if metas[s].examples), None)
    foreign = [s for s in order if metas[s].id_kind not in (None, kind)]
    owner: dict[tuple, str] = {}
    shadowed: dict[str, frozenset] = {}
    for s in (s for s in order if s not in foreign):
        condition = metas[s].condition
        seen = frozenset(e for e in metas[s].examples if (e, condition) in owner)
        owner.update({(e, condition): s for e in metas[s].examples if e not in seen})
        shadowed[s] = seen
    return Ownership([s for s in order if s not in foreign], kind, owner, shadowed, foreign)


def foreign_problem(folder: Path, own: Ownership) -> str:
    theirs = "string" if own.id_kind == "int" else "integer"
    return (
        f"{folder} holds {theirs} example ids but this store holds {KIND_WORDS[own.id_kind]} ids (fixed by "
        "its first shard)"
    )


def _metadata_files(name: str, files: dict) -> list[str]:
    """The zarr.json files from the group root down to the array `name` that shard.json lists."""
    parts = name.split("/")
    candidates = [
        f"{ARRAYS}/{'/'.join(parts[:i])}/zarr.json".replace("//", "/") for i in range(len(parts) + 1)
    ]
    return [rel for rel in candidates if rel in files]


def listing_problems(folder: Path, meta: ShardMeta) -> dict[str, str]:
    """Files of `folder` that are missing, of the wrong size, or not listed in its shard.json: path inside
    the shard -> what is wrong."""
    present: dict[str, int] = {}
    for base, _, names in os.walk(folder):
        for n in names:
            path = Path(base) / n
            rel = path.relative_to(folder).as_posix()
            if rel != SHARD_META and not n.startswith("."):
                present[rel] = path.stat().st_size
    out = {}
    for rel, (_, size) in sorted(meta.files.items()):
        if rel not in present:
            out[rel] = f"{folder / rel} is missing (listed in shard.json)"
        elif present[rel] != size:
            out[rel] = f"{folder / rel} has {present[rel]} bytes, shard.json says {size} (truncated?)"
    for rel in sorted(set(present) - set(meta.files)):
        out[rel] = f"{folder / rel} is not listed in shard.json"
    return out
