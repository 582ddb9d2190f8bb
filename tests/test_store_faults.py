"""The bad-store corpus of the activation store: each case damages a copy of a small store (or misuses the
API) and states what must happen: which error, and a phrase of its message.

The rules under test (headlab.store: store.py, catalog.py, integrity.py, shard.py, ids.py, manifest.py):
every read is verified or fails with a StoreError naming the file; a store's own broken files are
StoreErrors with a repair hint, and `headlab store verify --repair` quarantines what cannot be trusted and
removes stale .tmp-* folders; first commit wins for each (example, condition); ids are ints or strings, one
kind per store; selections the store does not hold are SelectionErrors saying what it holds.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import headlab as hl
import headlab.store.store as store_module
from headlab.analyses.sinks import sink_scores
from headlab.cli import app
from headlab.dashboards.data import BrowserData
from headlab.errors import SelectionError, StoreError
from headlab.store import ExampleInfo, Store
from headlab.store.shard import ShardWriter, meta_checksum
from headlab.store.write import write_arrays, write_tables

SELECT = dict(
    compact=hl.Select(),
    head_outputs=hl.Select(queries=[-1]),
    patterns=hl.Select(layers=[1], heads=[2], queries=[-1]),
    residuals=hl.Select(queries=[0]),
)


def _record(lm, prompts: list[str]):
    lm.tokenizer.padding_side = "left"
    inputs = dict(lm.tokenizer(prompts, return_tensors="pt", padding=True))
    with torch.no_grad(), hl.capture(lm, **SELECT) as rec:
        lm.model(**inputs)
    return rec


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory) -> Path:
    """Shard A: examples 10, 11 and shard B: example 12 with its inputs (condition "default", everything
    captured); shard C: example 10 under "rows" with only selected attention rows; shard D: annotations of
    10 and 12; a saved result."""
    lm = tiny("gpt2")
    store = Store.create(tmp_path_factory.mktemp("faults") / "store", lm)
    store.append(_record(lm, ["The quick brown fox", "jumps over the lazy dog"]), examples=[10, 11])
    ids = lm.tokenizer("A third example here")["input_ids"]
    info = ExampleInfo(
        prompt="A third example here", token_ids=tuple(ids), tokens=tuple(map(str, ids)), label=1
    )
    store.append(_record(lm, ["A third example here"]), examples=[12], info=[info])
    rows = hl.Select(layers=[1], heads=[2], queries=[0, -1])
    with torch.no_grad(), hl.capture(lm, patterns=rows) as rec:
        lm.model(**lm.tokenizer(["The quick brown fox"], return_tensors="pt"))
    store.append(rec, examples=[10], condition="rows")
    store.annotate({10: {"answer": "yes"}, 12: {"answer": "no", "label": 0}}, condition="default")
    store.save_result("sinks", pd.DataFrame({"layer": [0, 1], "head": [0, 0], "score": [0.5, 0.25]}))
    return store.root


@pytest.fixture()
def root(base, tmp_path) -> Path:
    """A fresh copy of the base store for one case."""
    return Path(shutil.copytree(base, tmp_path / "store"))


def _shards(root: Path) -> list[Path]:
    """Shard folders, first commit first (read from shard.json, before any damage)."""
    folders = [p for p in (root / "shards").iterdir() if (p / "shard.json").is_file()]
    return sorted(folders, key=lambda p: json.loads((p / "shard.json").read_text())["created"])


def _chunk(root: Path, array: str, shard: int = 0) -> Path:
    folder = _shards(root)[shard] / "arrays.zarr" / array / "c"
    return next(p for p in sorted(folder.rglob("*")) if p.is_file())


def _flip(path: Path, at: int = 8, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i % len(data)] ^= 0xA5
    path.write_bytes(bytes(data))


def _edit_json(path: Path, change: Callable[[object], object]) -> None:
    """Rewrite a JSON file through `change`; a shard.json keeps a valid checksum (a writer's bug, not a
    flipped byte)."""
    obj = change(json.loads(path.read_text()))
    if path.name == "shard.json":
        obj["checksum"] = meta_checksum(obj)
    path.write_text(json.dumps(obj))


def _without(key: str) -> Callable[[dict], dict]:
    return lambda obj: {k: v for k, v in obj.items() if k != key}


def _foreign_shard(root: Path) -> None:
    """A copy of shard B whose ids are strings (a writer of the other kind)."""
    copy = Path(shutil.copytree(_shards(root)[1], root / "shards" / "ffffffffffffffff"))
    _edit_json(copy / "shard.json", lambda m: {**m, "examples": ["x12"], "created": m["created"] + 1})


def _pattern(root: Path):
    return Store.open(root).pattern(10, 1, 0, condition="default")


def _rows(root: Path):
    return Store.open(root).pattern(10, 1, 2, condition="rows")


def _z(root: Path):
    return Store.open(root).head_outputs(0, condition="default", position="last")


def _delete_while_open(root: Path):
    """A long-lived reader (the dashboard): the chunk disappears after its first read."""
    store = Store.open(root)
    store.pattern(10, 1, 0, condition="default")
    _chunk(root, "attn/lm/L1").unlink()
    return store.pattern(10, 1, 0, condition="default")


def _stats(root: Path):
    return Store.open(root).head_stats()


@dataclass(frozen=True, kw_only=True)
class Case:
    """One damaged store: `damage` is done to a fresh copy, then `read` must raise `error` saying `says`."""

    id: str
    damage: Callable[[Path], object] = lambda root: None
    read: Callable[[Path], object] = _pattern
    error: type = StoreError
    says: str
    model: bool = False  # `store verify --repair` also gets --model (the store's model, for its manifest)
    repairable: bool = True  # after --repair the store verifies and reads cleanly


def _manifest(text: str) -> Callable[[Path], object]:
    return lambda r: (r / "manifest.json").write_text(text)


def _shard_json(i: int) -> Callable[[Path], Path]:
    return lambda r: _shards(r)[i] / "shard.json"


CORRUPTIONS = [
    Case(id="attn-chunk-flipped", damage=lambda r: _flip(_chunk(r, "attn/lm/L1")), says="not match"),
    Case(
        id="attn-shard-index-flipped",
        damage=lambda r: _flip(_chunk(r, "attn/lm/L1"), at=-10),
        says="not match",
    ),
    Case(id="z-chunk-flipped", damage=lambda r: _flip(_chunk(r, "z/lm/s0/L0")), read=_z, says="not match"),
    Case(
        id="rows-chunk-flipped",
        damage=lambda r: _flip(_chunk(r, "rows/values", 2)),
        read=_rows,
        says="not match",
    ),
    Case(
        id="head-stats-parquet-flipped",
        damage=lambda r: _flip(_shards(r)[0] / "head_stats.parquet", at=200),
        read=_stats,
        says="head_stats.parquet does not match its checksum",
    ),
    Case(
        id="attn-index-parquet-flipped",
        damage=lambda r: _flip(_shards(r)[0] / "attn_index.parquet", at=300),
        says="attn_index.parquet does not match its checksum",
    ),
    Case(
        id="array-metadata-flipped",
        damage=lambda r: _flip(_shards(r)[0] / "arrays.zarr/attn/lm/L1/zarr.json", at=40, n=1),
        says="zarr.json does not match its checksum",
    ),
    Case(id="chunk-deleted", damage=lambda r: _chunk(r, "attn/lm/L1").unlink(), says="is missing"),
    Case(id="chunk-deleted-while-open", read=_delete_while_open, says="is missing or changed size"),
    Case(
        id="table-truncated",
        damage=lambda r: (p := _shards(r)[0] / "z_index.parquet").write_bytes(p.read_bytes()[:100]),
        read=_z,
        says="truncated",
    ),
    Case(
        id="unlisted-chunk",
        damage=lambda r: (_chunk(r, "attn/lm/L1").parent / "9").write_bytes(b"x"),
        says="not listed in shard.json",
    ),
    Case(id="shard-json-deleted", damage=lambda r: _shard_json(1)(r).unlink(), says="no shard.json"),
    Case(id="shard-json-corrupt", damage=lambda r: _shard_json(0)(r).write_text('{"exam'), says="malformed"),
    Case(
        id="shard-json-list",
        damage=lambda r: _shard_json(0)(r).write_text("[1, 2]"),
        says="expected a JSON object",
    ),
    Case(
        id="shard-json-float-id",
        damage=lambda r: _edit_json(_shard_json(1)(r), lambda m: {**m, "examples": [12.0]}),
        says="the number 12.0",
    ),
    Case(
        id="shard-json-id-changed",
        damage=lambda r: _shard_json(0)(r).write_text(_shard_json(0)(r).read_text().replace("11", "13", 1)),
        says="its own checksum does not match",
    ),
    Case(
        id="shard-json-no-files",
        damage=lambda r: _edit_json(_shard_json(0)(r), _without("files")),
        says="no 'files' entry",
    ),
    Case(
        id="shard-from-newer-headlab",
        damage=lambda r: _edit_json(_shard_json(1)(r), lambda m: {**m, "schema_version": 99}),
        says="upgrade headlab",
        repairable=False,
    ),
    Case(id="stray-folder", damage=lambda r: (r / "shards" / "notashard").mkdir(), says="--repair"),
    Case(id="foreign-id-kind", damage=_foreign_shard, says="holds string example ids"),
    Case(id="shards-folder-missing", damage=lambda r: shutil.rmtree(r / "shards"), says="no shards/ folder"),
    Case(id="manifest-list", damage=_manifest("[]"), says="not a JSON object", model=True),
    Case(id="manifest-null", damage=_manifest("null"), says="--repair --model", model=True),
    Case(id="manifest-not-json", damage=_manifest("{"), says="is corrupted", model=True),
    Case(
        id="manifest-no-fingerprint",
        damage=lambda r: _edit_json(r / "manifest.json", _without("fingerprint")),
        says="no model fingerprint",
        model=True,
    ),
    Case(
        id="manifest-deleted",
        damage=lambda r: (r / "manifest.json").unlink(),
        says="shards/ but no manifest",
        model=True,
    ),
    Case(
        id="manifest-from-newer-headlab",
        damage=lambda r: _edit_json(r / "manifest.json", lambda m: {**m, "schema_version": 99}),
        says="upgrade headlab",
        model=True,
        repairable=False,
    ),
    Case(
        id="result-flipped",
        damage=lambda r: _flip(r / "results" / "sinks.parquet", at=100),
        read=lambda r: Store.open(r).result("sinks"),
        says="rerun the analysis",
    ),
]


@pytest.mark.parametrize("case", CORRUPTIONS, ids=lambda c: c.id)
def test_damaged_store_is_a_clear_error(case: Case, root: Path, model_dirs):
    case.damage(root)
    with pytest.raises(case.error, match=re.escape(case.says)):
        case.read(root)
    runner = CliRunner()
    report = runner.invoke(app, ["store", "verify", str(root)])  # never a traceback
    assert report.exit_code == 1 and "Traceback" not in report.output, report.output
    extra = ["--model", model_dirs["gpt2"]] if case.model else []
    repaired = runner.invoke(app, ["store", "verify", str(root), "--repair", *extra])
    if not case.repairable:
        assert repaired.exit_code == 1 and not (root / "quarantine").exists(), repaired.output
        return
    assert repaired.exit_code == 0, repaired.output
    store = Store.open(root)  # reads cleanly: what is left is whole
    assert store.verify().ok
    for condition in store.conditions():
        ids = store.committed(condition)
        assert (
            set(store.head_stats(condition=condition).example)
            == ids
            == set(store.examples(condition=condition).example)
        )


@dataclass(frozen=True, kw_only=True)
class Misuse:
    """One API call on the intact store (given the store and a one-example record) that must raise."""

    id: str
    call: Callable[[Store, object], object]
    error: type = SelectionError
    says: str


MISUSES = [
    Misuse(
        id="append-same-ids-twice",
        call=lambda s, r: s.append(r, examples=[12]),
        error=StoreError,
        says="example 12 is already committed under condition 'default'",
    ),
    Misuse(
        id="append-string-id-to-int-store",
        call=lambda s, r: s.append(r, examples=["12"]),
        error=StoreError,
        says="this store holds integer ids",
    ),
    Misuse(
        id="append-bool-id",
        call=lambda s, r: s.append(r, examples=[True]),
        error=StoreError,
        says="the boolean true",
    ),
    Misuse(
        id="append-float-id",
        call=lambda s, r: s.append(r, examples=[1.0]),
        error=StoreError,
        says="the number 1.0",
    ),
    Misuse(
        id="append-id-beyond-int64",
        call=lambda s, r: s.append(r, examples=[2**63]),
        error=StoreError,
        says="64-bit",
    ),
    Misuse(
        id="append-empty-string-id",
        call=lambda s, r: s.append(r, examples=[""]),
        error=StoreError,
        says="empty string",
    ),
    Misuse(
        id="append-wrong-count",
        call=lambda s, r: s.append(r, examples=[30, 31]),
        error=StoreError,
        says="got 2 example ids",
    ),
    Misuse(
        id="browser-id-not-an-integer",
        call=lambda s, r: BrowserData(s).example_id("12a"),
        says="example ids of this store are integers; '12a' is not one",
    ),
    Misuse(
        id="string-id-in-int-store",
        call=lambda s, r: s.pattern("10", 1, 0, condition="default"),
        error=StoreError,
        says="example '10' is a string but this store holds integer ids",
    ),
    Misuse(
        id="stats-layers-out-of-range",
        call=lambda s, r: s.head_stats(layers=[10, 11]),
        says="layers 10, 11 are not in this store's head statistics; it holds layers 0, 1",
    ),
    Misuse(
        id="stats-head-out-of-range", call=lambda s, r: s.head_stats(heads=[99]), says="head 99 is not in"
    ),
    Misuse(
        id="stats-unknown-tower", call=lambda s, r: s.head_stats(tower="vision"), says="it holds towers 'lm'"
    ),
    Misuse(
        id="stats-unknown-stat",
        call=lambda s, r: s.head_stats(stat="entropyy"),
        says="stat 'entropyy' is not in",
    ),
    Misuse(
        id="stats-example-not-stored",
        call=lambda s, r: s.head_stats(examples=[999]),
        says="example 999 is not stored",
    ),
    Misuse(
        id="stats-layer-not-an-int",
        call=lambda s, r: s.head_stats(layers=["0"]),
        says="layers must be integers",
    ),
    Misuse(
        id="unknown-condition",
        call=lambda s, r: s.head_stats(condition="nope"),
        says="stored conditions: ['default', 'rows']",
    ),
    Misuse(
        id="examples-unknown-condition",
        call=lambda s, r: s.examples(condition="nope"),
        says="'nope' is not stored",
    ),
    Misuse(
        id="residual-layer-out-of-range", call=lambda s, r: s.residuals(layers=[5]), says="layer 5 is not in"
    ),
    Misuse(
        id="z-no-condition-of-several",
        call=lambda s, r: s.head_outputs(0),
        says="several conditions ['default', 'rows']",
    ),
    Misuse(
        id="committed-no-condition-of-several", call=lambda s, r: s.committed(), says="several conditions"
    ),
    Misuse(
        id="z-layer-out-of-range",
        call=lambda s, r: s.head_outputs(7, condition="default"),
        says="stored layers: 0, 1",
    ),
    Misuse(
        id="z-step-not-stored",
        call=lambda s, r: s.head_outputs(0, condition="default", step=3),
        says="stored steps: 0",
    ),
    Misuse(
        id="z-tower-not-stored",
        call=lambda s, r: s.head_outputs(0, condition="default", tower="vision"),
        says="stored towers",
    ),
    Misuse(
        id="z-position-not-stored",
        call=lambda s, r: s.head_outputs(0, condition="default", position=99),
        says="stored positions",
    ),
    Misuse(
        id="z-position-bad",
        call=lambda s, r: s.head_outputs(0, condition="default", position="first"),
        says="'last'",
    ),
    Misuse(
        id="z-condition-without-them",
        call=lambda s, r: s.head_outputs(0, condition="rows"),
        error=StoreError,
        says="no head outputs stored under condition 'rows'",
    ),
    Misuse(
        id="pattern-layer-not-stored",
        call=lambda s, r: s.pattern(10, 7, 0, condition="default"),
        error=StoreError,
        says="compact attention of lm layers 0, 1",
    ),
    Misuse(
        id="pattern-head-not-stored",
        call=lambda s, r: s.pattern(10, 1, 99, condition="default"),
        says="head 99",
    ),
    Misuse(
        id="pattern-query-out-of-range",
        call=lambda s, r: s.pattern(10, 1, 0, condition="default", queries=[100]),
        says="outside example 10's",
    ),
    Misuse(
        id="pattern-example-not-stored",
        call=lambda s, r: s.pattern(999, 1, 0, condition="default"),
        says="999 is not stored under condition 'default'",
    ),
    Misuse(
        id="rows-query-not-stored",
        call=lambda s, r: s.pattern(10, 1, 2, condition="rows", queries=[1]),
        says="not all stored rows",
    ),
    Misuse(
        id="annotate-unknown-field",
        call=lambda s, r: s.annotate({10: {"score": 1}}, condition="default"),
        error=StoreError,
        says="unknown annotation 'score'; the store keeps answer, label",
    ),
    Misuse(
        id="annotate-example-not-stored",
        call=lambda s, r: s.annotate({99: {"answer": "yes"}}, condition="default"),
        says="example 99 is not stored under condition 'default'",
    ),
    Misuse(
        id="annotate-not-json",
        call=lambda s, r: s.annotate({10: {"answer": float("nan")}}, condition="default"),
        error=StoreError,
        says="the answer nan is not a JSON value",
    ),
    Misuse(
        id="annotate-unknown-condition",
        call=lambda s, r: s.annotate({10: {"answer": "yes"}}, condition="with_image"),
        says="condition 'with_image' is not stored",
    ),
    Misuse(
        id="annotate-nothing",
        call=lambda s, r: s.annotate({}, condition="default"),
        error=StoreError,
        says="at least one example",
    ),
    Misuse(
        id="example-info-not-stored",
        call=lambda s, r: s.example_info(11, condition="rows"),
        says="example 11 is not stored under condition 'rows'",
    ),
    Misuse(
        id="example-info-no-condition-of-several",
        call=lambda s, r: s.example_info(10),
        says="several conditions",
    ),
    Misuse(
        id="image-of-a-string-id",
        call=lambda s, r: s.image("10"),
        error=StoreError,
        says="example '10' is a string but this store holds integer ids",
    ),
    Misuse(
        id="rows-head-not-stored",
        call=lambda s, r: s.pattern(10, 1, 0, condition="rows"),
        error=StoreError,
        says="rows of lm layers 1",
    ),
]


@pytest.fixture(scope="module")
def one(tiny):
    """A record of one example."""
    return _record(tiny("gpt2"), ["One more example"])


@pytest.mark.parametrize("case", MISUSES, ids=lambda c: c.id)
def test_misuse_is_a_clear_error(case: Misuse, root: Path, one):
    store = Store.open(root)
    with pytest.raises(case.error, match=re.escape(case.says)):
        case.call(store, one)
    assert Store.open(root).verify().ok  # nothing was written


def _every_read(root: Path) -> dict[str, object]:
    """Each read of the store, by name: its value, or the StoreError it raised (a read must never raise
    anything else on a damaged store)."""
    store = Store.open(root)
    reads = {
        f"pattern {e} L{la} H{h}": functools.partial(store.pattern, e, la, h, condition="default")
        for e in (10, 11, 12)
        for la in (0, 1)
        for h in range(4)
    }
    reads |= {f"z L{la}": functools.partial(store.head_outputs, la, condition="default") for la in (0, 1)}
    reads["rows"] = functools.partial(store.pattern, 10, 1, 2, condition="rows")
    reads["head_stats"] = lambda: store.head_stats().sort_values(["example", "layer", "head", "stat", "role"])
    reads["residuals"] = store.residuals
    reads |= {f"info {e}": functools.partial(store.example_info, e, condition="default") for e in (10, 12)}
    out = {}
    for name, read in reads.items():
        try:
            value = read()
        except StoreError as err:
            out[name] = err
            continue
        out[name] = value[1] if name.startswith("z ") else value
        out[name] = out[name].value.to_numpy() if name == "head_stats" else out[name]
        out[name] = out[name].norm.to_numpy() if name == "residuals" else out[name]
        out[name] = repr(out[name]) if name.startswith("info ") else out[name]
    return out


FLIP_TARGETS = {
    "attn-chunk": lambda r: _chunk(r, "attn/lm/L1"),
    "z-chunk": lambda r: _chunk(r, "z/lm/s0/L0"),
    "rows-chunk": lambda r: _chunk(r, "rows/values", 2),
    "attn-index": lambda r: _shards(r)[0] / "attn_index.parquet",
    "head-stats": lambda r: _shards(r)[1] / "head_stats.parquet",
    "inputs": lambda r: _shards(r)[1] / "inputs.parquet",
    "annotations": lambda r: _shards(r)[3] / "annotations.parquet",
}


@pytest.mark.parametrize("target", FLIP_TARGETS, ids=str)
def test_a_flipped_byte_never_reads_back_as_a_wrong_value(target: str, base: Path, tmp_path: Path):
    """One byte flipped at the start, middle and end of a file (chunk data ... shard index): every read gives the intact value or a StoreError,
    and the reads of the damaged bytes do fail."""
    clean = _every_read(base)
    assert not any(isinstance(v, Exception) for v in clean.values())
    size = FLIP_TARGETS[target](base).stat().st_size
    for at in np.linspace(0, size - 1, 3).astype(int):
        root = Path(shutil.copytree(base, tmp_path / f"{target}-{at}"))
        _flip(FLIP_TARGETS[target](root), at=int(at), n=1)
        got = _every_read(root)
        failed = [name for name, v in got.items() if isinstance(v, StoreError)]
        assert failed, f"flipping byte {at} of {target} went unnoticed"
        for name, value in got.items():
            if not isinstance(value, StoreError):
                np.testing.assert_array_equal(value, clean[name], err_msg=f"{name} after flipping byte {at}")


def _commit_unchecked(root: Path, rec, ids: list, condition: str = "default", *, created: float) -> str:
    """Commit a shard the way an old headlab, or a second writer racing without the lock (NFS), could:
    no check of the ids against what is committed."""
    writer = ShardWriter(root / "shards")
    mapping = dict(zip(sorted({e["example"] for e in rec._examples}), ids, strict=True))
    write_tables(writer, rec, mapping, {}, condition)
    write_arrays(writer, rec, mapping, condition)
    return writer.commit({"condition": condition, "created": created, "examples": ids, "run": {}})


def test_duplicate_writers_first_commit_wins(root: Path, tiny):
    """A later shard holding 10 and 11 again (other values) is ignored by every reader and counted."""
    before = _every_read(root)
    first = json.loads((_shards(root)[0] / "shard.json").read_text())["created"]
    rec = _record(tiny("gpt2"), ["Completely different words", "and another one"])
    _commit_unchecked(root, rec, [10, 11], created=first + 100)
    _commit_unchecked(root, rec, [11, 13], created=first - 100)  # earlier: it owns 11 and 13
    store = Store.open(root)
    assert store.committed("default") == {10, 11, 12, 13}
    assert len(store.examples(condition="default")) == 4
    after = _every_read(root)
    for name in ("pattern 10 L1 H2", "pattern 12 L0 H0", "rows"):
        np.testing.assert_array_equal(after[name], before[name])
    assert not np.array_equal(after["pattern 11 L1 H2"], before["pattern 11 L1 H2"])  # 11: the earliest shard
    stats = store.head_stats(stat="entropy", condition="default")
    assert len(stats) == 4 * len(store.head_stats(stat="entropy", examples=[12]))
    index, z = store.head_outputs(1, condition="default", position="last")
    assert sorted(index.example) == [10, 11, 12, 13] and len(z) == 4
    assert store.info()["duplicates_ignored"] == 3
    report = CliRunner().invoke(app, ["store", "verify", str(root)])
    assert (
        report.exit_code == 0 and "3 duplicate (example, condition) rows in 2 shards ignored" in report.output
    )


def test_a_second_store_object_cannot_commit_committed_ids(root: Path, one):
    """Two writers of one store: the check runs under the store's lock against what is committed now."""
    a, b = Store.open(root), Store.open(root)
    assert b.committed("default") == {10, 11, 12}
    a.append(one, examples=[20])
    with pytest.raises(StoreError, match="example 20 is already committed"):
        b.append(one, examples=[20])
    assert not [p for p in (root / "shards").iterdir() if p.name.startswith(".tmp-")]  # the loser cleaned up


def test_string_ids_round_trip(tiny, tmp_path):
    """String ids are kept verbatim ("000000001" is not 1), in a string column; condition None = the only one."""
    lm = tiny("gpt2")
    store = Store.create(tmp_path / "s", lm)
    ids = ["000000001", "COCO_val2014_000000000042"]
    store.append(_record(lm, ["The quick brown fox", "jumps over the lazy dog"]), examples=ids)
    assert store.id_kind == "str" and store.committed() == set(ids)
    assert store.pattern("000000001", 1, 0).shape[0] > 0  # condition None: the store's only condition
    index, z = store.head_outputs(layer=1, position="last")  # the README's call, without a condition
    assert list(index.example) == ids and z.shape[0] == 2
    assert set(store.head_stats(examples=["000000001"]).example) == {"000000001"}
    table = pq.read_table(_shards(store.root)[0] / "head_stats.parquet")
    assert pa.types.is_string(table.schema.field("example").type) or pa.types.is_large_string(
        table.schema.field("example").type
    )
    with pytest.raises(StoreError, match="example 1 is an integer but this store holds string ids"):
        store.pattern(1, 1, 0)
    with pytest.raises(StoreError, match="pass examples="):
        store.append(_record(lm, ["x"]))
    assert store.info()["id_kind"] == "str"
    assert len(sink_scores(store)) == 2 * lm.n_heads  # an analysis over string ids (no int() on an id)
    data = BrowserData(store)  # the dashboard's data layer
    assert data.example_ids() == (2, "000000001", "COCO_val2014_000000000042")
    view = data.pattern("000000001", 1, 0, tower="lm", condition="default", query=None)
    np.testing.assert_array_equal(view.rows, store.pattern("000000001", 1, 0))


def test_stores_written_before_chunk_checksums_are_verified_by_sha256(tiny, tmp_path, monkeypatch):
    lm = tiny("gpt2")
    monkeypatch.setattr(store_module, "ShardWriter", functools.partial(ShardWriter, chunk_checksums=False))
    store = Store.create(tmp_path / "old", lm)
    store.append(_record(lm, ["The quick brown fox"]), examples=[0])
    assert "crc32c" not in json.dumps(
        json.loads((_chunk(store.root, "attn/lm/L1").parents[3] / "zarr.json").read_text())["codecs"][0][
            "configuration"
        ]["codecs"]
    )
    clean = Store.open(store.root).pattern(0, 1, 0)
    _flip(_chunk(store.root, "attn/lm/L1"), at=100)
    with pytest.raises(StoreError, match="c/0/0/0 does not match its checksum"):
        Store.open(store.root).pattern(0, 1, 0)
    np.testing.assert_array_equal(
        Store.open(store.root).pattern(0, 0, 0).shape, clean.shape
    )  # layer 0 intact


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tmp_folder(root: Path, name: str, pid: int) -> Path:
    folder = root / "shards" / f".tmp-{name}"
    folder.mkdir()
    (folder / ".writer.json").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": 0}))
    (folder / "head_stats.parquet").write_bytes(b"partial")
    return folder


def test_repair_quarantines_and_the_store_then_reads_cleanly(root: Path):
    first = _shards(root)[0]
    _flip(_chunk(root, "attn/lm/L1"))
    (root / "shards" / "notashard").mkdir()
    stale, live = _tmp_folder(root, "stale", _dead_pid()), _tmp_folder(root, "live", os.getpid())
    old = _tmp_folder(root, "old", 0)
    (old / ".writer.json").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    os.utime(old / ".writer.json", (0, 0))
    os.utime(old / "head_stats.parquet", (0, 0))
    os.utime(old, (0, 0))
    runner = CliRunner()
    checked = runner.invoke(app, ["store", "verify", str(root)])
    assert checked.exit_code == 1 and "does not match its checksum" in checked.output
    assert "stale (its writer (pid" in checked.output and "a shard being written" in checked.output
    repaired = runner.invoke(app, ["store", "verify", str(root), "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert (
        f"quarantined shards/{first.name}" in repaired.output
        and "quarantined shards/notashard" in repaired.output
    )
    assert not stale.exists() and not old.exists() and live.exists()  # a live writer's folder is kept
    (box,) = (root / "quarantine").iterdir()
    assert (box / "shards" / first.name / "shard.json").is_file()  # moved whole, nothing deleted
    store = Store.open(root)
    assert store.committed("default") == {12} and store.committed("rows") == {10}
    assert len(store.head_stats(condition="default")) and store.verify().ok
    assert store.info()["quarantined"] == [box.name]
    again = runner.invoke(app, ["store", "verify", str(root), "--repair"])
    assert again.exit_code == 0 and "nothing to repair" in again.output


def test_repair_rebuilds_a_broken_manifest_for_the_given_model(root: Path, model_dirs, tiny):
    (root / "manifest.json").write_text("null")
    runner = CliRunner()
    without = runner.invoke(app, ["store", "verify", str(root), "--repair"])
    assert without.exit_code == 1 and "--repair --model MODEL" in without.output
    rebuilt = runner.invoke(app, ["store", "verify", str(root), "--repair", "--model", model_dirs["gpt2"]])
    assert rebuilt.exit_code == 0 and "rebuilt" in rebuilt.output, rebuilt.output
    store = Store.open(root, tiny("gpt2"))
    assert store.committed("default") == {10, 11, 12} and len(store.manifest["runs"]) == 1
    assert any(p.name == "manifest.json" for p in (root / "quarantine").rglob("*"))


def test_info_counts_examples_and_rows(root: Path):
    info = Store.open(root).info()
    assert (info["examples"], info["rows"], info["shards"]) == (3, 4, 4)  # the 4th: annotations only
    assert info["conditions"] == ["default", "rows"] and info["towers"] == ["lm"]
    assert (
        info["stored"]["default"]["compact attention"] == 3 and info["stored"]["rows"]["attention rows"] == 1
    )
    assert "compact attention" not in info["stored"]["rows"]
    assert {k: info["stored"]["default"].get(k) for k in ("tokens", "labels", "answers")} == {
        "tokens": 1,
        "labels": 1,
        "answers": 2,
    }
    assert info["results"] == ["sinks"]
    shown = CliRunner().invoke(app, ["store", "info", str(root)])
    assert shown.exit_code == 0 and "(example, condition) rows: 4" in shown.output
    assert "stored [rows]: " in shown.output and "attention rows 1" in shown.output
