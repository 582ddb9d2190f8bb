"""The activation store: one directory that notebooks, the CLI, analyses and the dashboard all read.

Layout:
    manifest.json            schema version, model fingerprint, creation time, runs (written atomically)
    shards/<id>/             one committed append (see shard.py): Parquet tables + Zarr v3 arrays + shard.json
        examples.parquet     example, condition, tower, n_tokens, roles, meta (JSON text)
        head_stats.parquet   example, condition, tower, step, layer, head, stat, role, value
        residuals.parquet    example, condition, tower, step, layer, position, norm, rms, max_abs, max_dim, median_abs
        z_index.parquet      example, condition, tower, step, layer, position, row -> arrays.zarr/z/<tower>/L<layer>
        attn_index.parquet   example, condition, tower, layer, start, stop, scale, causal, window, group, heads,
                             softcap (NaN: none)
                             -> arrays.zarr/attn/<tower>/L<layer>: [token, head + kv_head, d_head + 1],
                             q | lse then k | 0 (token rows start:stop; see write._pack_qk)
        rows_index.parquet   example, condition, tower, step, layer, head, query, start, length -> rows/values
    results/<name>.parquet   an analysis result (tidy table keyed by layer and head), written atomically,
    results/<name>.json      with its parameters (`save_result` / `result`); a rerun replaces it

Reads are lazy: the small index tables are read once (and refreshed when new shards appear), and a
pattern read touches only the few Zarr chunks of that example's rows of that head. Nothing is ever
unpickled: JSON, Parquet and numeric Zarr arrays only. Example ids are the caller's (int64); the same
example under several conditions ("with_image", "no_image", "vhr") is stored side by side and joins on
(example, condition).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import torch
import zarr

import headlab
from headlab.errors import StoreError
from headlab.kernels.rebuild import rebuild_rows
from headlab.loading import LoadedModel
from headlab.probe.record import Record
from headlab.store.fingerprint import fingerprint
from headlab.store.lock import locked
from headlab.store.shard import ARRAYS, SHARD_META, TMP_PREFIX, ShardWriter, sha256_of, write_json_atomic
from headlab.store.write import write_arrays, write_tables

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RESULTS = "results"
TABLES = ("examples", "head_stats", "residuals", "z_index", "attn_index", "rows_index")
REQUIRED_COLUMNS = {
    "examples": {"example", "condition", "tower", "n_tokens", "roles", "meta"},
    "head_stats": {"example", "condition", "tower", "step", "layer", "head", "stat", "role", "value"},
}


@dataclass
class VerifyReport:
    """What `Store.verify` found: problems (corrupt or missing files) and notes (uncommitted leftovers)."""

    shards: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Store:
    """An activation store directory. Create with `Store.create(path, lm)`, open with `Store.open(path)`."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self._shards: dict[str, dict] = {}
        self._tables: dict[str, pd.DataFrame] = {}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._attn_lookup: tuple[pd.DataFrame, dict] | None = None  # (the index it was built from, lookup)
        self._run = {
            "id": uuid.uuid4().hex[:12],
            "started": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "headlab": headlab.__version__,
        }

    # ----- opening ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, lm: LoadedModel, *, exist_ok: bool = False) -> Store:
        """A new empty store for `lm` (or, with exist_ok, the existing one after checking it is lm's)."""
        root = Path(path)
        if (root / MANIFEST).exists():
            if not exist_ok:
                raise StoreError(
                    f"{root} already holds a store; open it with Store.open or pass exist_ok=True"
                )
            return cls.open(root, lm)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": fingerprint(lm),
            "created": time.time(),
            "headlab": headlab.__version__,
            "runs": [],
        }
        write_json_atomic(root / MANIFEST, manifest)
        return cls(root, manifest)

    @classmethod
    def open(
        cls, path: str | Path, lm: LoadedModel | None = None, *, allow_model_mismatch: bool = False
    ) -> Store:
        """Open an existing store; with `lm`, check that it is the model that wrote the store."""
        root = Path(path)
        if not (root / MANIFEST).is_file():
            raise StoreError(f"{root} is not a headlab store (no {MANIFEST}); create one with Store.create")
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{root / MANIFEST} is corrupted: {err}") from err
        version = manifest.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise StoreError(
                f"{root} has schema version {version}, newer than this headlab reads "
                f"({SCHEMA_VERSION}); upgrade headlab"
            )
        store = cls(root, manifest)
        if lm is not None and not allow_model_mismatch:
            store.check_model(lm)
        return store

    def check_model(self, lm: LoadedModel) -> None:
        theirs, ours = self.manifest["fingerprint"], fingerprint(lm)
        for key in ("architecture", "config_hash", "weights_hash"):
            if theirs.get(key) != ours[key]:
                raise StoreError(
                    f"{self.root} was written by another model ({key} differs: store {theirs.get('source')!r}, "
                    f"given {ours['source']!r}); pass allow_model_mismatch=True to open it anyway"
                )

    # ----- shards -------------------------------------------------------------------------------------
    def shard_ids(self, *, refresh: bool = True) -> list[str]:
        """Committed shards (directories with a shard.json), oldest first; refreshes the read caches."""
        if refresh:
            found = sorted(
                p
                for p in (self.root / "shards").iterdir()
                if not p.name.startswith(".") and (p / SHARD_META).is_file()
            )
            new = [p for p in found if p.name not in self._shards]
            for p in new:
                self._shards[p.name] = json.loads((p / SHARD_META).read_text())
            if new:
                self._tables.clear()
        return sorted(self._shards, key=lambda s: self._shards[s].get("created", 0))

    def _table(self, name: str, columns: Sequence[str] | None = None, filter=None) -> pd.DataFrame:
        ids = self.shard_ids()
        files = [
            str(self.root / "shards" / s / f"{name}.parquet")
            for s in ids
            if (self.root / "shards" / s / f"{name}.parquet").is_file()
        ]
        if not files:
            return pd.DataFrame()
        try:
            table = pads.dataset(files, format="parquet").to_table(columns=columns, filter=filter)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(
                f"a {name}.parquet file of {self.root} is unreadable ({err}); run `headlab store verify`"
            ) from err
        return table.to_pandas()

    def _index(self, name: str) -> pd.DataFrame:
        """A small index table over all shards, with a `shard` column; cached until new shards appear."""
        self.shard_ids()
        if name not in self._tables:
            frames = []
            for s in self.shard_ids(refresh=False):
                path = self.root / "shards" / s / f"{name}.parquet"
                if path.is_file():
                    try:
                        frames.append(pd.read_parquet(path).assign(shard=s))
                    except (OSError, pa.ArrowException) as err:
                        raise StoreError(f"{path} is unreadable ({err}); run `headlab store verify`") from err
            self._tables[name] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return self._tables[name]

    # ----- writing ------------------------------------------------------------------------------------
    def append(
        self,
        rec: Record,
        *,
        examples: Sequence[int] | None = None,
        condition: str = "default",
        meta: Sequence[dict] | None = None,
        top_k: int | None = None,
    ) -> str:
        """Commit one record as a new shard; returns its id.

        examples: the store id of each example of the record, in capture order (default: the next free ids,
        fine for one writer; give explicit ids when several processes write). meta: a JSON-able dict per
        example (prompt, image path, label, ...), kept in the examples table. top_k: keep only the k largest
        entries of each selected attention row (rec.patterns) instead of the dense row.
        """
        captured = sorted({e["example"] for e in rec._examples})
        if examples is None:
            stored = self.examples()
            start = int(stored.example.max()) + 1 if len(stored) else 0
            examples = list(range(start, start + len(captured)))
        if len(examples) != len(captured):
            raise StoreError(f"got {len(examples)} example ids for a record of {len(captured)} examples")
        if meta is not None and len(meta) != len(captured):
            raise StoreError(f"got {len(meta)} meta dicts for a record of {len(captured)} examples")
        ids = dict(zip(captured, (int(e) for e in examples), strict=True))
        meta_of = dict(zip(captured, meta, strict=True)) if meta is not None else {}
        writer = ShardWriter(self.root / "shards")
        try:
            write_tables(writer, rec, ids, meta_of, condition)
            write_arrays(writer, rec, ids, condition, top_k)
            shard = writer.commit(
                {
                    "condition": condition,
                    "created": time.time(),
                    "run": self._run,
                    "examples": sorted(ids.values()),
                    "schema_version": SCHEMA_VERSION,
                }
            )
        except BaseException:
            writer.abort()
            raise
        self._note_run()
        return shard

    def _note_run(self) -> None:
        """Record this writer's run in the manifest (once per Store object; atomic replace)."""
        if any(r.get("id") == self._run["id"] for r in self.manifest.get("runs", [])):
            return
        with locked(self.root):
            current = json.loads((self.root / MANIFEST).read_text())
            current.setdefault("runs", []).append(self._run)
            write_json_atomic(self.root / MANIFEST, current)
            self.manifest = current

    # ----- reading ------------------------------------------------------------------------------------
    def examples(self, *, condition: str | None = None) -> pd.DataFrame:
        frame = self._index("examples")
        if len(frame) and condition is not None:
            frame = frame[frame.condition == condition]
        return frame.drop(columns="shard", errors="ignore")

    def conditions(self) -> list[str]:
        ex = self.examples()
        return sorted(ex.condition.unique()) if len(ex) else []

    def committed(self, condition: str = "default") -> set[int]:
        """Example ids already stored under `condition` (what a resumed run skips)."""
        ex = self.examples(condition=condition)
        return set(ex.example.astype(int)) if len(ex) else set()

    def head_stats(
        self,
        *,
        condition: str | None = None,
        tower: str | None = None,
        stat: str | Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        heads: Iterable[int] | None = None,
        examples: Iterable[int] | None = None,
    ) -> pd.DataFrame:
        """The tidy head_stats table, filtered in the Parquet scan (only matching rows are read)."""
        return self._table(
            "head_stats",
            filter=_filter(
                condition=condition, tower=tower, stat=stat, layer=layers, head=heads, example=examples
            ),
        )

    def residuals(self, *, condition: str | None = None, layers: Iterable[int] | None = None) -> pd.DataFrame:
        """The residual-stream table (norms, max |x| and its dimension, median |x|), filtered in the scan."""
        return self._table("residuals", filter=_filter(condition=condition, layer=layers))

    def _array(self, shard: str, name: str) -> zarr.Array:
        key = (shard, name)
        if key not in self._arrays:
            self._arrays[key] = zarr.open_array(self.root / "shards" / shard / ARRAYS, path=name, mode="r")
        return self._arrays[key]

    def pattern(
        self,
        example: int,
        layer: int,
        head: int,
        *,
        tower: str = "lm",
        condition: str = "default",
        queries: Sequence[int] | None = None,
    ) -> np.ndarray:
        """The exact attention pattern [q, k] of one head for one example, rebuilt lazily from compact
        attention (or read from stored rows); reads only that example's rows of that head."""
        row = self._compact_lookup().get((example, condition, tower, layer))
        if row is None:
            return self._stored_rows(example, layer, head, tower, condition, queries)
        heads = list(row.heads)
        if head not in heads:
            raise StoreError(f"head {head} of {tower} layer {layer} was not stored; stored heads: {heads}")
        start, stop, h = int(row.start), int(row.stop), heads.index(head)
        n = stop - start
        packed = self._array(row.shard, f"attn/{tower}/L{layer}")
        both = packed.get_orthogonal_selection((slice(start, stop), [h, len(heads) + head // int(row.group)]))
        q, lse, k = (torch.from_numpy(x) for x in (both[:, 0, :-1], both[:, 0, -1], both[:, 1, :-1]))
        positions = torch.arange(n) if queries is None else torch.tensor([p % n for p in queries])
        window = None if int(row.window) < 0 else int(row.window)
        softcap = float(
            getattr(row, "softcap", float("nan"))
        )  # stores written before soft-cap support lack it
        return rebuild_rows(
            q[positions],
            k,
            lse[positions],
            scale=float(row.scale),
            query_positions=positions,
            causal=bool(row.causal),
            window=window,
            softcap=None if np.isnan(softcap) else softcap,
        ).numpy()

    def _compact_lookup(self) -> dict[tuple, tuple]:
        """(example, condition, tower, layer) -> its attn_index row (the latest shard wins); rebuilt when the
        index is (new shards)."""
        idx = self._index("attn_index")
        if self._attn_lookup is None or self._attn_lookup[0] is not idx:
            rows = idx.itertuples() if len(idx) else ()
            self._attn_lookup = (idx, {(int(r.example), r.condition, r.tower, int(r.layer)): r for r in rows})
        return self._attn_lookup[1]

    def _stored_rows(self, example, layer, head, tower, condition, queries) -> np.ndarray:
        idx = self._index("rows_index")
        hit = (
            idx[
                (idx.example == example)
                & (idx.condition == condition)
                & (idx.tower == tower)
                & (idx.layer == layer)
                & (idx["head"] == head)
                & (idx.step == 0)
            ]
            if len(idx)
            else idx
        )
        if queries is not None and len(hit):
            n_keys = int(hit.n_keys.iloc[0])
            hit = hit[hit["query"].isin([q % n_keys for q in queries])]
        if not len(hit):
            raise StoreError(
                f"no attention stored for example {example} ({condition}), {tower} layer {layer} head "
                f"{head}; capture it with compact=Select(...) or patterns=Select(...)"
            )
        shard = hit.shard.iloc[0]
        values = self._array(shard, "rows/values")
        sparse = (self.root / "shards" / shard / ARRAYS / "rows" / "keys").is_dir()
        rows = np.zeros((len(hit), int(hit.n_keys.iloc[0])), dtype=np.float32)
        for i, r in enumerate(hit.itertuples()):
            span = slice(int(r.start), int(r.start) + int(r.length))
            if sparse:
                rows[i, self._array(shard, "rows/keys")[span]] = values[span]
            else:
                rows[i] = values[span]
        return rows

    def head_outputs(
        self,
        layer: int,
        *,
        tower: str = "lm",
        condition: str = "default",
        step: int = 0,
        position: int | str | None = None,
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Per-head outputs z of one layer for every stored example: (index rows, array [rows, head, d_head]).

        position: keep one stored position per example: an example position, or "last" for each example's
        last stored position (default: every stored row)."""
        idx = self._index("z_index")
        if not len(idx):
            raise StoreError("no head outputs stored; capture them with head_outputs=Select(...)")
        hit = idx[
            (idx.layer == layer) & (idx.tower == tower) & (idx.condition == condition) & (idx.step == step)
        ]
        if position == "last":
            hit = hit[hit.position == hit.groupby("example").position.transform("max")]
        elif position is not None:
            hit = hit[hit.position == position]
        frames, parts = [], []
        for shard, group in hit.groupby("shard", sort=False):  # one read per shard, rows in index order
            frames.append(group)
            parts.append(
                self._array(shard, f"z/{tower}/s{step}/L{layer}").get_orthogonal_selection(
                    (group.row.to_numpy(),)
                )
            )
        if not parts:
            return hit.drop(columns="shard"), np.zeros((0,))
        return pd.concat(frames).drop(columns="shard").reset_index(drop=True), np.concatenate(parts)

    # ----- integrity ----------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every committed shard's files against their checksums and the tables' schemas."""
        report = VerifyReport()
        for path in sorted((self.root / "shards").iterdir()):
            if path.name.startswith(TMP_PREFIX):
                report.notes.append(f"{path.name}: an uncommitted shard (a writer stopped mid-way); ignored")
                continue
            if path.name.startswith("."):
                continue
            report.shards += 1
            try:
                meta = json.loads((path / SHARD_META).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
                report.problems.append(f"{path.name}/{SHARD_META}: unreadable ({err})")
                continue
            if meta.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
                report.problems.append(
                    f"{path.name}: schema {meta['schema_version']} is newer than {SCHEMA_VERSION}"
                )
            for name, info in meta.get("files", {}).items():
                report.files += 1
                file = path / name
                if not file.is_file():
                    report.problems.append(f"{path.name}/{name}: missing")
                elif file.stat().st_size != info["bytes"]:
                    report.problems.append(
                        f"{path.name}/{name}: {file.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
                    )
                elif sha256_of(file) != info["sha256"]:
                    report.problems.append(f"{path.name}/{name}: checksum mismatch (corrupted)")
            for table, required in REQUIRED_COLUMNS.items():
                file = path / f"{table}.parquet"
                if (
                    f"{table}.parquet" in meta.get("files", {})
                    and file.is_file()
                    and not any(p.startswith(f"{path.name}/{table}.parquet") for p in report.problems)
                ):
                    missing = required - set(pads.dataset(str(file)).schema.names)
                    if missing:
                        report.problems.append(
                            f"{path.name}/{table}.parquet: missing columns {sorted(missing)}"
                        )
        return report

    def info(self) -> dict:
        ex = self.examples()
        fp = self.manifest["fingerprint"]
        size = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
        return {
            "path": str(self.root),
            "schema_version": self.manifest["schema_version"],
            "model": f"{fp['architecture']} ({fp['source']})",
            "shards": len(self.shard_ids()),
            "examples": int(ex.example.nunique()) if len(ex) else 0,
            "conditions": self.conditions(),
            "runs": len(self.manifest.get("runs", [])),
            "bytes": size,
        }

    # ----- analysis results ------------------------------------------------------------------------------
    def save_result(self, name: str, frame: pd.DataFrame, params: dict | None = None) -> Path:
        """Store an analysis result as results/<name>.parquet (+ <name>.json with `params`), atomically;
        an existing result of that name is replaced."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
            raise StoreError(f"result name {name!r}: use lowercase letters, digits, '_', '-' and '.'")
        folder = self.root / RESULTS
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
        frame.to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / f"{name}.parquet")
        write_json_atomic(folder / f"{name}.json", {"name": name, "rows": len(frame), "params": params or {}})
        return folder / f"{name}.parquet"

    def results(self) -> list[str]:
        """Names of the stored analysis results."""
        folder = self.root / RESULTS
        return sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []

    def result(self, name: str) -> pd.DataFrame:
        """A stored analysis result (its parameters are in `result_params(name)`)."""
        path = self.root / RESULTS / f"{name}.parquet"
        if not path.is_file():
            raise StoreError(
                f"no result {name!r} in {self.root}; stored: {self.results() or 'none'} "
                f"(run `headlab analyze ... {self.root}`)"
            )
        return pd.read_parquet(path)

    def result_params(self, name: str) -> dict:
        path = self.root / RESULTS / f"{name}.json"
        return json.loads(path.read_text())["params"] if path.is_file() else {}

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in self.info().items())
        return f"<b>headlab Store</b><table>{rows}</table>"

    def __repr__(self) -> str:
        i = self.info()
        return f"Store({i['path']}: {i['examples']} examples, {i['shards']} shards, conditions {i['conditions']})"


def _filter(**columns):
    """A pyarrow filter: every given column (value or values) must match; None means no condition."""
    expr = None
    for column, value in columns.items():
        if value is None:
            continue
        values = [value] if isinstance(value, str | int) else list(value)
        term = pads.field(column).isin(values)
        expr = term if expr is None else expr & term
    return expr
