"""The activation store: one directory that notebooks, the CLI, analyses and the dashboard all read.

Layout:
    manifest.json            schema version, model fingerprint, creation time, runs (manifest.py)
    shards/<id>/             one committed append (shard.py): Parquet tables + Zarr v3 arrays + shard.json
        examples.parquet     example, condition, tower, n_tokens, roles, meta (JSON text)
        head_stats.parquet   example, condition, tower, step, layer, head, stat, role, value
        residuals.parquet    example, condition, tower, step, layer, position, norm, rms, max_abs, max_dim, median_abs
        z_index.parquet      example, condition, tower, step, layer, position, row -> arrays.zarr/z/<tower>/L<layer>
        attn_index.parquet   example, condition, tower, layer, start, stop, scale, causal, window, group, heads,
                             softcap (NaN: none)
                             -> arrays.zarr/attn/<tower>/L<layer>: [token, head + kv_head, d_head + 1],
                             q | lse then k | 0 (token rows start:stop; see write._pack_qk)
        rows_index.parquet   example, condition, tower, step, layer, head, query, start, length -> rows/values
        inputs.parquet       example, condition, prompt, token_ids, tokens, image, thumbnail, label, answer
                             (what went into the model; examples.py)
        annotations.parquet  example, condition, field, value: answers and labels attached later, in a
                             shard of their own that commits no example (`annotate`; examples.py)
    results/<name>.parquet   an analysis result (tidy table keyed by layer and head), written atomically,
    results/<name>.json      with its parameters and the parquet's sha256 (`save_result` / `result`)
    quarantine/              what `headlab store verify --repair` moved aside; never read

Contract:
- Ids. An example id is an int (within int64) or a non-empty str, kept as given (ids.py); one store holds
  one kind (`id_kind`), and the `example` column of every table is int64 or string accordingly. Ids of the
  other kind are a StoreError.
- Verified reads. Every byte a reader returns was checked against shard.json or a chunk CRC first, or the
  read fails with a StoreError naming the file (catalog.py). Nothing is ever unpickled.
- First commit wins. For each (example, condition) the earliest committed shard that holds it is the truth;
  later rows of it are ignored by every reader (catalog.py). `append` refuses ids already committed under
  its condition; it checks and commits under the store's lock, so local writers never duplicate.
- Example inputs. `example_info`, `tokens` and `image` read what went into the model; what a store does not
  hold (a store written before the inputs table, a vision model's token ids) reads as None, never an error.
- Selections. A condition, example, tower, layer, head, step or stat that the store does not hold is a
  SelectionError saying what it holds; a `condition=None` where one is needed means the store's only
  condition (several: an error listing them). A valid filter that matches no rows returns an empty frame.
Reads are lazy: the small index tables are read once (again when shards appear), and a pattern read touches
only the few Zarr chunks of that example's rows of that head.
"""

from __future__ import annotations

import io
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from headlab.errors import SelectionError, StoreError
from headlab.loading import LoadedModel
from headlab.store.attention import attention_held, compact_rows, stored_rows
from headlab.store.catalog import Catalog, repair_hint
from headlab.store.examples import (
    ANNOTATIONS,
    INPUTS,
    ExampleInfo,
    annotations_frame,
    annotations_schema,
    decode_thumbnail,
    held_columns,
    held_counts,
    info_from_row,
    inputs_frame,
    inputs_schema,
    latest_annotations,
    meta_of,
)
from headlab.store.fingerprint import fingerprint
from headlab.store.ids import checked_ids, describe_ids, examples_are
from headlab.store.integrity import QUARANTINE, RepairReport, VerifyReport, repair_store, verify_store
from headlab.store.lock import locked
from headlab.store.manifest import MANIFEST, manifest_hint, new_manifest, read_manifest
from headlab.store.results import RESULTS, read_result, result_names, result_sidecar, save_result
from headlab.store.selection import at_position, ints, names, parquet_filter, span
from headlab.store.shard import SCHEMA_VERSION, ShardWriter, write_json_atomic
from headlab.store.write import write_arrays, write_tables
from headlab.version import __version__

if TYPE_CHECKING:  # the store keeps what a capture recorded; it never runs the probe
    from headlab.plots import StorePlots
    from headlab.probe.record import Record

__all__ = ["SCHEMA_VERSION", "ExampleInfo", "Store", "VerifyReport"]
STORED = {  # file of a shard -> what it means that the shard's examples have, for `info`
    "head_stats.parquet": "head stats",
    "residuals.parquet": "residuals",
    "z_index.parquet": "head outputs",
    "attn_index.parquet": "compact attention",
    "rows_index.parquet": "attention rows",
}


class Store:
    """An activation store directory. Create with `Store.create(path, lm)`, open with `Store.open(path)`."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self._catalog = Catalog(root)
        self._tables: dict[str, tuple[int, pd.DataFrame]] = {}  # name -> (catalog version, owned rows)
        self._attn_lookup: tuple[int, dict] | None = None
        self._run = {
            "id": uuid.uuid4().hex[:12],
            "started": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "headlab": __version__,
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
        if (root / "shards").is_dir() and any((root / "shards").iterdir()):
            raise StoreError(f"{root} has shards/ but no {MANIFEST}; {manifest_hint(root)}")
        (root / "shards").mkdir(parents=True, exist_ok=True)
        manifest = new_manifest(fingerprint(lm))
        write_json_atomic(root / MANIFEST, manifest)
        return cls(root, manifest)

    @classmethod
    def open(
        cls, path: str | Path, lm: LoadedModel | None = None, *, allow_model_mismatch: bool = False
    ) -> Store:
        """Open an existing store; with `lm`, check that it is the model that wrote the store."""
        root = Path(path)
        store = cls(root, read_manifest(root))
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

    # ----- shards and tables --------------------------------------------------------------------------
    def shard_ids(self) -> list[str]:
        """Committed shards, first commit first (catalog.py); picks up shards committed meanwhile."""
        self._catalog.refresh()
        return list(self._catalog.order)

    @property
    def id_kind(self) -> str | None:
        """The kind of this store's example ids: "int", "str", or None while it holds none."""
        self._catalog.refresh()
        return self._catalog.id_kind

    def _table(self, name: str, columns: Sequence[str] | None = None, filter=None) -> pd.DataFrame:
        """Owned rows of a table over all shards, filtered in the Parquet scan (files verified first)."""
        cat = self._catalog
        cat.refresh()
        rel = f"{name}.parquet"
        whole, scans = [], []
        for s in cat.holding(rel):
            path, hidden = str(cat.verified(s, rel)), cat.shadowed[s]
            if not hidden:
                whole.append(path)
            elif len(hidden) < len(cat.meta(s).examples):
                mine = ~pads.field("example").isin(sorted(hidden))
                scans.append(([path], mine if filter is None else filter & mine))
        scans = ([(whole, filter)] if whole else []) + scans
        frames = [self._scan(files, columns, flt) for files, flt in scans]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _scan(self, files: list[str], columns, filter) -> pd.DataFrame:
        try:
            return pads.dataset(files, format="parquet").to_table(columns=columns, filter=filter).to_pandas()
        except (OSError, pa.ArrowException) as err:
            raise StoreError(
                f"{files[0]} (or a file beside it) is unreadable ({err}); {repair_hint(self.root)}"
            ) from None

    def _index(self, name: str) -> pd.DataFrame:
        """A small index table's owned rows over all shards, with a `shard` column; cached per catalog."""
        cat = self._catalog
        cat.refresh()
        cached = self._tables.get(name)
        if cached is None or cached[0] != cat.version:
            rel, frames = f"{name}.parquet", []
            for s in cat.holding(rel):
                try:
                    frame = pd.read_parquet(io.BytesIO(cat.read_bytes(s, rel)))
                except (OSError, pa.ArrowException) as err:
                    raise StoreError(
                        f"{cat.shards_dir / s / rel} is unreadable ({err}); {repair_hint(self.root)}"
                    ) from None
                if cat.shadowed[s]:
                    frame = frame[~frame.example.isin(sorted(cat.shadowed[s]))]
                frames.append(frame.assign(shard=s))
            cached = (cat.version, pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
            self._tables[name] = cached
        return cached[1]

    # ----- writing ------------------------------------------------------------------------------------
    def append(
        self,
        rec: Record,
        *,
        examples: Sequence[int | str] | None = None,
        condition: str = "default",
        meta: Sequence[dict] | None = None,
        info: Sequence[ExampleInfo] | None = None,
        top_k: int | None = None,
    ) -> str:
        """Commit one record as a new shard; returns its id.

        examples: the store id of each example of the record, in capture order: ints or strings, of the
        store's kind (default: the next free integer ids, fine for one writer; give explicit ids when
        several processes write). Ids already committed under `condition` are a StoreError listing them.
        meta: a JSON-able dict per example (prompt, image path, label, ...), kept in the examples table.
        info: an ExampleInfo per example (prompt, token ids and tokens, image path and thumbnail, label,
        answer), kept in the inputs table for `example_info`, `tokens` and `image`.
        top_k: keep only the k largest entries of each selected attention row (rec.patterns).
        """
        if not isinstance(condition, str) or not condition:
            raise StoreError(f"condition {condition!r}: give a non-empty name (e.g. 'with_image')")
        captured = sorted({e["example"] for e in rec._examples})
        if not captured:
            raise StoreError("the record holds no examples: run the model inside `hl.capture` first")
        given = self._default_ids(len(captured)) if examples is None else list(examples)
        if len(given) != len(captured):
            raise StoreError(f"got {len(given)} example ids for a record of {len(captured)} examples")
        for what, given_per in (("meta dicts", meta), ("ExampleInfo", info)):
            if given_per is not None and len(given_per) != len(captured):
                raise StoreError(f"got {len(given_per)} {what} for a record of {len(captured)} examples")
        ids = dict(zip(captured, self._new_ids(given, condition), strict=True))
        meta_of = dict(zip(captured, meta, strict=True)) if meta is not None else {}
        writer = ShardWriter(self.root / "shards")
        try:
            write_tables(writer, rec, ids, meta_of, condition)
            write_arrays(writer, rec, ids, condition, top_k)
            if info is not None:
                kind = "str" if isinstance(next(iter(ids.values())), str) else "int"
                frame = inputs_frame(list(ids.values()), condition, info)
                writer.table(INPUTS, frame, schema=inputs_schema(kind))
            return self._commit(
                writer, condition, list(ids.values()), check=lambda: self._new_ids(given, condition)
            )
        except BaseException:
            writer.abort()
            raise

    def _commit(self, writer: ShardWriter, condition: str, examples: list, *, check=None) -> str:
        """Seal and commit `writer`'s shard under the store's lock, after `check()` (which raises to refuse)."""
        writer.seal()
        with locked(self.root):  # check and commit as one step: no other writer commits these ids
            if check is not None:
                check()
            shard = writer.commit(
                {
                    "condition": condition,
                    "created": time.time(),
                    "run": self._run,
                    "examples": examples,
                    "schema_version": SCHEMA_VERSION,
                }
            )
        self._note_run()
        return shard

    def annotate(self, values: Mapping[int | str, Mapping[str, object]], *, condition: str) -> str:
        """Attach answers and labels to examples stored under `condition` (e.g. the answers a report got):
        `values` maps an example id to {"answer": ..., "label": ...} (JSON values). They are committed as a
        shard of their own holding only these annotations (append-only and verified like every shard; it
        commits no example); for each field the latest annotation wins. Returns the shard id."""
        if not values:
            raise StoreError("give the annotations of at least one example, e.g. {101: {'answer': 'yes'}}")
        condition = self._condition(condition, needed=True)
        ids = self._stored_examples(list(values), condition)
        frame = annotations_frame(dict(zip(ids, values.values(), strict=True)), condition)
        writer = ShardWriter(self.root / "shards")
        try:
            writer.table(ANNOTATIONS, frame, schema=annotations_schema(self.id_kind))
            return self._commit(writer, condition, [])
        except BaseException:
            writer.abort()
            raise

    def _default_ids(self, n: int) -> list[int]:
        if self.id_kind == "str":
            raise StoreError("this store holds string ids: pass examples=[...] to append")
        done = [e for e, _ in self._catalog.owner]
        start = max(done) + 1 if done else 0
        return list(range(start, start + n))

    def _new_ids(self, given: list, condition: str) -> list[int | str]:
        """`given` checked: valid ids, of the store's kind, distinct, none committed under `condition`."""
        ids = checked_ids(given, self.id_kind)
        if len(set(ids)) != len(ids):
            twice = sorted({e for e in ids if ids.count(e) > 1}, key=str)
            raise StoreError(f"example ids repeat within one append: {describe_ids(twice)}")
        already = set(ids) & self._catalog.committed(condition)
        if already:
            raise StoreError(
                f"{examples_are(already)} already committed under condition {condition!r} "
                "(the first commit is kept); skip them (see store.committed(condition)) or use new ids"
            )
        return ids

    def _note_run(self) -> None:
        """Record this writer's run in the manifest (once per Store object; atomic replace)."""
        if any(r.get("id") == self._run["id"] for r in self.manifest.get("runs", [])):
            return
        with locked(self.root):
            current = read_manifest(self.root)
            current.setdefault("runs", []).append(self._run)
            write_json_atomic(self.root / MANIFEST, current)
            self.manifest = current

    # ----- reading: tables ----------------------------------------------------------------------------
    def conditions(self) -> list[str]:
        self._catalog.refresh()
        return self._catalog.conditions()

    def examples(self, *, condition: str | None = None) -> pd.DataFrame:
        """The examples table (one row per example, condition and tower); condition None: all."""
        condition = self._condition(condition, needed=False)
        frame = self._index("examples")
        if len(frame) and condition is not None:
            frame = frame[frame.condition == condition]
        return frame.drop(columns="shard", errors="ignore")

    def committed(self, condition: str | None = None) -> set[int | str]:
        """Example ids committed under `condition` (what a resumed run skips); a condition the store does not
        hold yet has none. None: the store's only condition (none stored: the empty set)."""
        self._catalog.refresh()
        if condition is None:
            if not self._catalog.conditions():
                return set()
            condition = self._condition(None, needed=True)
        return self._catalog.committed(condition)

    def head_stats(
        self,
        *,
        condition: str | None = None,
        tower: str | None = None,
        stat: str | Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        heads: Iterable[int] | None = None,
        examples: Iterable[int | str] | None = None,
    ) -> pd.DataFrame:
        """The tidy head_stats table, filtered in the Parquet scan (only matching rows are read)."""
        condition = self._condition(condition, needed=False)
        wanted = {"tower": names("tower", tower), "stat": names("stat", stat)}
        wanted |= {"layer": ints("layers", layers), "head": ints("heads", heads)}
        ids = self._stored_examples(examples, condition)
        frame = self._table("head_stats", filter=parquet_filter(condition=condition, example=ids, **wanted))
        self._check_present("head_stats", "head statistics", frame, wanted)
        return frame

    def residuals(self, *, condition: str | None = None, layers: Iterable[int] | None = None) -> pd.DataFrame:
        """The residual-stream table (norms, max |x| and its dimension, median |x|), filtered in the scan."""
        condition = self._condition(condition, needed=False)
        wanted = {"layer": ints("layers", layers)}
        frame = self._table("residuals", filter=parquet_filter(condition=condition, **wanted))
        self._check_present("residuals", "residual rows", frame, wanted)
        return frame

    # ----- reading: what went into the model (examples.py) ----------------------------------------------
    def example_info(self, example: int | str, *, condition: str | None = None) -> ExampleInfo:
        """What went into the model for `example` under `condition` (None: the store's only condition):
        prompt, token ids and tokens, image path and thumbnail, label, answer; None where not stored."""
        condition = self._condition(condition, needed=True)
        (example,) = self._stored_examples([example], condition)
        rows = self._table(INPUTS, filter=parquet_filter(condition=condition, example=[example]))
        row = rows.iloc[0].to_dict() if len(rows) else None
        meta = meta_of(self._index("examples"), example, condition)
        notes = latest_annotations(self._index(ANNOTATIONS)).get((example, condition), {})
        return info_from_row(row, meta, notes)

    def example_infos(self, *, condition: str | None = None) -> dict[int | str, ExampleInfo]:
        """`example_info` of every example stored under `condition`, in one read of each table (what a
        listing of many examples wants: one call instead of one read per example)."""
        condition = self._condition(condition, needed=True)
        rows = self._table(INPUTS, filter=parquet_filter(condition=condition))
        by_example = {row["example"]: row for row in rows.to_dict("records")}
        examples = self._index("examples")
        examples = examples[examples.condition == condition] if len(examples) else examples
        notes = latest_annotations(self._index(ANNOTATIONS))
        return {
            example: info_from_row(
                by_example.get(example),
                meta_of(examples, example, condition),
                notes.get((example, condition), {}),
            )
            for example in examples.example.drop_duplicates().tolist()
        }

    def tokens(self, example: int | str, *, condition: str | None = None) -> list[str] | None:
        """The example's language-model tokens, each id decoded alone, in example positions (image tokens
        included); None when not stored (a store from before token ids, a vision model)."""
        tokens = self.example_info(example, condition=condition).tokens
        return None if tokens is None else list(tokens)

    def image(self, example: int | str, *, condition: str | None = None):
        """The stored thumbnail of the example's image as a PIL image, or None (text-only, or not stored).
        condition None: the first condition (by name) that holds an image of it."""
        conditions = self.conditions() if condition is None else [self._condition(condition, needed=True)]
        (example,) = self._stored_examples([example], condition)
        where = parquet_filter(condition=conditions, example=[example]) & pads.field("thumbnail").is_valid()
        found = self._table(INPUTS, columns=["condition", "thumbnail"], filter=where)
        if not len(found):
            return None
        return decode_thumbnail(found.sort_values("condition").thumbnail.iloc[0], example)

    def _inputs_held(self) -> dict[str, dict[str, int]]:
        """condition -> {"tokens" / "images" / "labels" / "answers": (example, condition) rows holding it}."""
        return held_counts(self._table(INPUTS, columns=held_columns()), self._index(ANNOTATIONS))

    def _condition(self, condition: str | None, *, needed: bool) -> str | None:
        """A stored condition; None stays None unless `needed` (then: the only condition, or an error)."""
        held = self.conditions()
        if condition is None:
            if not needed:
                return None
            if len(held) == 1:
                return held[0]
            if not held:
                raise StoreError(f"{self.root} holds no examples yet")
            raise SelectionError(f"this store holds several conditions {held}; pass condition=one of them")
        if condition not in held:
            raise SelectionError(
                f"condition {condition!r} is not stored; stored conditions: {held or 'none'}"
            )
        return condition

    def _stored_examples(self, examples, condition: str | None) -> list[int | str] | None:
        """`examples` checked against what is committed (under `condition`, or any)."""
        if examples is None:
            return None
        scalar = isinstance(examples, str | int | np.integer)
        ids = checked_ids([examples] if scalar else list(examples), self.id_kind)
        conditions = [condition] if condition is not None else self._catalog.conditions()
        owner = self._catalog.owner
        missing = [e for e in ids if not any((e, c) in owner for c in conditions)]
        if missing:
            stored = {e for e, c in owner if c in conditions}
            under = f" under condition {condition!r}" if condition else ""
            raise SelectionError(
                f"{examples_are(missing)} not stored{under}; stored: {len(stored)} examples "
                f"({describe_ids(stored, 6)})"
            )
        return ids

    def _check_present(self, name: str, what: str, frame: pd.DataFrame, wanted: dict) -> None:
        """Each requested value that matched no row must at least exist in the table, or SelectionError."""
        for column, values in wanted.items():
            got = set(frame[column].unique()) if column in frame else set()
            missing = [v for v in values or () if v not in got]
            if not missing:
                continue
            table = self._table(name, columns=[column])
            held = set(table[column].unique()) if column in table else set()
            absent = [v for v in missing if v not in held]
            if absent:
                holds = f"it holds {column}s {span(held)}" if held else f"it holds no {what}"
                these = f"{column} {span(absent)} is" if len(absent) == 1 else f"{column}s {span(absent)} are"
                raise SelectionError(f"{these} not in this store's {what}; {holds}")

    # ----- reading: attention -------------------------------------------------------------------------
    def pattern(
        self,
        example: int | str,
        layer: int,
        head: int,
        *,
        tower: str = "lm",
        condition: str | None = None,
        queries: Sequence[int] | None = None,
    ) -> np.ndarray:
        """The exact attention pattern [q, k] of one head for one example, rebuilt lazily from compact
        attention (or read from stored rows); reads only that example's rows of that head.
        condition None: the store's only condition. queries: positions (negative from the end)."""
        condition = self._condition(condition, needed=True)
        (example,) = self._stored_examples([example], condition)
        layer, head = ints("layer", layer)[0], ints("head", head)[0]
        row = self._compact_lookup().get((example, condition, tower, layer))
        if row is None:
            return self._stored_rows(example, layer, head, tower, condition, queries)
        return compact_rows(self._catalog, row, example, tower, layer, head, queries)

    def _compact_lookup(self) -> dict[tuple, tuple]:
        """(example, condition, tower, layer) -> its owned attn_index row; rebuilt when shards appear."""
        idx = self._index("attn_index")
        if self._attn_lookup is None or self._attn_lookup[0] != self._catalog.version:
            rows = idx.itertuples() if len(idx) else ()
            lookup = {(r.example, r.condition, r.tower, int(r.layer)): r for r in rows}
            self._attn_lookup = (self._catalog.version, lookup)
        return self._attn_lookup[1]

    def _stored_rows(self, example, layer, head, tower, condition, queries) -> np.ndarray:
        """Selected rows stored densely or top-k (attention.stored_rows), when no compact attention is."""
        idx = self._index("rows_index")
        held = lambda: attention_held(self._index("attn_index"), idx, example, condition)  # noqa: E731
        where = dict(example=example, condition=condition, tower=tower, layer=layer, head=head)
        return stored_rows(self._catalog, idx, where, queries, held)

    def head_outputs(
        self,
        layer: int,
        *,
        tower: str = "lm",
        condition: str | None = None,
        step: int = 0,
        position: int | str | None = None,
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Per-head outputs z of one layer for every stored example: (index rows, array [rows, head, d_head]).

        condition None: the store's only condition. position: keep one stored position per example: an
        example position, or "last" for each example's last stored position (default: every stored row)."""
        idx = self._index("z_index")
        if not len(idx):
            raise StoreError("no head outputs stored; capture them with head_outputs=Select(...)")
        condition = self._condition(condition, needed=True)
        hit = idx[idx.condition == condition]
        if not len(hit):
            held = sorted(idx.condition.unique())
            raise StoreError(f"no head outputs stored under condition {condition!r}; they are under {held}")
        for column, value in (("tower", tower), ("step", step), ("layer", layer)):
            if value not in set(hit[column].unique()):
                raise SelectionError(
                    f"no head outputs of {column} {value!r} under condition {condition!r}; stored {column}s: "
                    f"{span(hit[column].unique())}"
                )
            hit = hit[hit[column] == value]
        hit = at_position(hit, position)
        frames, parts = [], []
        for shard, group in hit.groupby("shard", sort=False):  # one read per shard, rows in index order
            frames.append(group)
            parts.append(self._catalog.read(shard, f"z/{tower}/s{step}/L{layer}", (group.row.to_numpy(),)))
        return pd.concat(frames).drop(columns="shard").reset_index(drop=True), np.concatenate(parts)

    # ----- integrity ----------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every file of the store against shard.json (integrity.py); never raises on damage."""
        return verify_store(self.root)

    @staticmethod
    def repair(path: str | Path, lm: LoadedModel | None = None) -> RepairReport:
        """Quarantine what cannot be trusted and drop stale temp folders (integrity.py); with `lm`, also
        rebuild a broken manifest for that model."""
        return repair_store(Path(path), lm)

    def stored(self) -> dict[str, dict[str, int]]:
        """condition -> {what is stored ("head stats", "head outputs", ..., "tokens", "images", "labels",
        "answers"): number of examples with it}."""
        cat = self._catalog
        cat.refresh()
        out: dict[str, dict[str, int]] = {c: {} for c in cat.conditions()}
        for (_, condition), shard in cat.owner.items():
            for rel, what in STORED.items():
                if rel in cat.meta(shard).files:
                    out[condition][what] = out[condition].get(what, 0) + 1
        for condition, counts in self._inputs_held().items():
            out.setdefault(condition, {}).update(counts)
        return out

    def info(self) -> dict:
        """A summary: model, ids, (example, condition) rows, conditions, towers, what is stored, results."""
        cat = self._catalog
        cat.refresh()
        ex = self._index("examples")
        fp = self.manifest["fingerprint"]
        quarantined = self.root / QUARANTINE
        return {
            "path": str(self.root),
            "schema_version": self.manifest["schema_version"],
            "model": f"{fp['architecture']} ({fp.get('source', '?')})",
            "shards": len(cat.order),
            "examples": len({e for e, _ in cat.owner}),
            "rows": len(cat.owner),
            "id_kind": cat.id_kind or "none yet",
            "conditions": cat.conditions(),
            "towers": sorted(ex.tower.unique()) if len(ex) else [],
            "stored": self.stored(),
            "results": self.results(),
            "duplicates_ignored": cat.duplicates,
            "quarantined": sorted(p.name for p in quarantined.iterdir()) if quarantined.is_dir() else [],
            "runs": len(self.manifest.get("runs", [])),
            "bytes": sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()),
        }

    # ----- analysis results (results.py) ---------------------------------------------------------------
    def save_result(self, name: str, frame: pd.DataFrame, params: dict | None = None) -> Path:
        """Store an analysis result as results/<name>.parquet (+ <name>.json with `params` and the parquet's
        sha256), atomically; an existing result of that name is replaced."""
        return save_result(self.root / RESULTS, name, frame, params)

    def results(self) -> list[str]:
        """Names of the stored analysis results."""
        return result_names(self.root / RESULTS)

    def result(self, name: str) -> pd.DataFrame:
        """A stored analysis result, checked against its sha256 (its parameters: `result_params(name)`)."""
        return read_result(self.root / RESULTS, name)

    def result_params(self, name: str) -> dict:
        return result_sidecar(self.root / RESULTS, name).get("params", {})

    @property
    def plot(self) -> StorePlots:
        """Plotly figures of this store (`headlab.plots.StorePlots`): `store.plot.heads("entropy")`,
        `store.plot.pattern(example, layer, head)`, `store.plot.image_attention(...)`. Imports plotly on
        first use."""
        from headlab.plots import StorePlots

        return StorePlots(self)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in self.info().items())
        return f"<b>headlab Store</b><table>{rows}</table>"

    def __repr__(self) -> str:
        i = self.info()
        return f"Store({i['path']}: {i['examples']} examples, {i['shards']} shards, conditions {i['conditions']})"
