"""Checking a whole store (`headlab store verify`) and repairing it (`headlab store verify --repair`).

`verify_store(root)` reads everything and never raises on damage: it returns a `VerifyReport` whose
`problems` are what a reader would refuse (a bad manifest, a missing shards/ folder, a folder of shards/
without a valid shard.json, a missing, truncated, corrupted or unlisted file, a table without its required
columns, a shard whose ids are of the other kind, a result that does not match its checksum, a manifest or
shard from a newer headlab) and whose `notes` are harmless (`.tmp-*` folders of live writers, stale ones,
duplicate rows that readers ignore because the first commit wins).

`repair_store(root, lm=None)`, under the store's lock, never deletes data:
- each untrusted shard folder is moved whole to `quarantine/<time>/shards/<name>` (its examples become
  uncommitted, so rerunning the capture recaptures them); readers never look in quarantine/;
- each result whose parquet does not match its checksum is moved to `quarantine/<time>/results/`;
- each stale `.tmp-*` folder is removed (stale: `shard.stale_reason`; a live writer's folder is kept);
- a missing shards/ folder is recreated empty;
- a broken or missing manifest is moved to quarantine and rebuilt for `lm` (its fingerprint, the runs found
  in the shards' shard.json); without `lm` it stays a problem.
What a newer headlab wrote is never touched (upgrade headlab instead). It returns what it did and a fresh `VerifyReport` of the result.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from headlab.errors import StoreError
from headlab.store.catalog import foreign_problem, listing_problems, ownership
from headlab.store.examples import ANNOTATIONS, ANNOTATIONS_COLUMNS, INPUTS, INPUTS_COLUMNS
from headlab.store.fingerprint import fingerprint
from headlab.store.lock import locked
from headlab.store.manifest import MANIFEST, manifest_broken, new_manifest, read_manifest
from headlab.store.results import RESULTS, result_names, result_problem
from headlab.store.shard import TMP_PREFIX, ShardMeta, sha256_of, stale_reason, write_json_atomic

QUARANTINE = "quarantine"
REQUIRED_COLUMNS = {
    "examples": {"example", "condition", "tower", "n_tokens", "roles", "meta"},
    "head_stats": {"example", "condition", "tower", "step", "layer", "head", "stat", "role", "value"},
    INPUTS: set(INPUTS_COLUMNS),
    ANNOTATIONS: set(ANNOTATIONS_COLUMNS),
}


@dataclass
class VerifyReport:
    """What `verify_store` found (module docstring). `ok`: no problems (notes are fine)."""

    shards: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    untrusted: dict[str, str] = field(default_factory=dict)  # shard folder -> why (what --repair quarantines)
    bad_results: list[str] = field(default_factory=list)  # result names --repair quarantines
    stale: list[str] = field(default_factory=list)  # .tmp-* folders --repair removes
    duplicates: int = 0  # (example, condition) rows of later shards that readers ignore
    manifest_ok: bool = True  # False: missing or broken (what --repair --model rebuilds)
    shards_missing: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RepairReport:
    actions: list[str]
    after: VerifyReport


def verify_store(root: Path) -> VerifyReport:
    """Check every file of the store at `root` (module docstring); raises only if `root` is not a folder."""
    if not (root / MANIFEST).exists() and not (root / "shards").is_dir():
        raise StoreError(f"{root} is not a headlab store (no {MANIFEST}, no shards/)")
    report = VerifyReport()
    try:
        read_manifest(root)
    except StoreError as err:
        report.manifest_ok = not manifest_broken(root)  # a newer headlab's manifest is not repaired
        report.problems.append(str(err))
    shards = root / "shards"
    if not shards.is_dir():
        report.shards_missing = True
        report.problems.append(
            f"{shards} is missing: the store holds no shards (--repair recreates it empty)"
        )
        return report
    metas = {}
    for path in sorted(shards.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(TMP_PREFIX):
            _note_tmp(path, report)
            continue
        report.shards += 1
        meta = _check_shard(path, report)
        if meta is not None:
            metas[path.name] = meta
    _check_results(root / RESULTS, report)
    own = ownership(metas)
    for s in own.foreign:
        _untrusted(report, s, foreign_problem(shards / s, own))
    report.duplicates = own.duplicates
    if own.duplicates:
        held = sum(1 for v in own.shadowed.values() if v)
        report.notes.append(
            f"{own.duplicates} duplicate (example, condition) rows in {held} shards ignored, first commit wins"
        )
    return report


def _note_tmp(path: Path, report: VerifyReport) -> None:
    reason = stale_reason(path)
    if reason is None:
        report.notes.append(
            f"{path.name}: a shard being written (its writer is alive or was recently); left alone"
        )
    else:
        report.stale.append(path.name)
        report.notes.append(f"{path.name}: an uncommitted shard, stale ({reason}); --repair removes it")


def _untrusted(report: VerifyReport, name: str, problem: str) -> None:
    report.problems.append(problem)
    report.untrusted.setdefault(name, problem)


def _check_shard(path: Path, report: VerifyReport) -> ShardMeta | None:
    """The shard's meta if every file checks out; else None, with its problems recorded."""
    try:
        meta = ShardMeta.read(path)
    except StoreError as err:
        _untrusted(report, path.name, str(err))
        return None
    if meta.newer_problem(path):  # not damage: never quarantined
        report.problems.append(meta.newer_problem(path))
        return None
    found = listing_problems(path, meta)
    for rel, (digest, _) in sorted(meta.files.items()):
        report.files += 1
        if rel not in found and sha256_of(path / rel) != digest:
            found[rel] = f"{path / rel} does not match its checksum in shard.json (corrupted)"
    problems = list(found.values()) or _schema_problems(path, meta)
    for problem in problems:
        _untrusted(report, path.name, problem)
    return None if problems else meta


def _schema_problems(path: Path, meta: ShardMeta) -> list[str]:
    out = []
    for table, required in REQUIRED_COLUMNS.items():
        if f"{table}.parquet" not in meta.files:
            continue
        try:
            names = set(pq.read_schema(path / f"{table}.parquet").names)
        except (OSError, pa.ArrowException) as err:
            out.append(f"{path / table}.parquet is unreadable ({err})")
            continue
        if required - names:
            out.append(f"{path / table}.parquet lacks columns {sorted(required - names)}")
    return out


def _check_results(folder: Path, report: VerifyReport) -> None:
    for name in result_names(folder):
        report.files += 1
        problem = result_problem(folder, name)
        if problem:
            report.problems.append(problem)
            report.bad_results.append(name)


def repair_store(root: Path, lm=None) -> RepairReport:
    """Quarantine what cannot be trusted, drop stale temp folders, rebuild what can be (module docstring)."""
    if not (root / MANIFEST).exists() and not (root / "shards").is_dir():
        raise StoreError(f"{root} is not a headlab store (no {MANIFEST}, no shards/)")
    actions: list[str] = []
    with locked(root):
        before = verify_store(root)
        box = root / QUARANTINE / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if before.shards_missing:
            (root / "shards").mkdir()
            actions.append(f"recreated the missing {root / 'shards'} (empty)")
        for name, why in before.untrusted.items():
            _move(root / "shards" / name, box / "shards" / name)
            actions.append(f"quarantined shards/{name} -> {box / 'shards' / name} ({why})")
        for name in before.bad_results:
            for suffix in (".parquet", ".json"):
                if (root / RESULTS / f"{name}{suffix}").exists():
                    _move(root / RESULTS / f"{name}{suffix}", box / RESULTS / f"{name}{suffix}")
            actions.append(f"quarantined the result {name} -> {box / RESULTS} (rerun the analysis)")
        for name in before.stale:
            shutil.rmtree(root / "shards" / name, ignore_errors=True)
            actions.append(f"removed the stale uncommitted shard shards/{name}")
        if not before.manifest_ok and lm is not None:
            actions.append(_rebuild_manifest(root, lm, box))
    return RepairReport(actions, verify_store(root))


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)


def _rebuild_manifest(root: Path, lm, box: Path) -> str:
    """A new manifest for `lm`, the old file (if any) moved to `box`; runs recovered from the shards."""
    if (root / MANIFEST).exists():
        _move(root / MANIFEST, box / MANIFEST)
    metas = [
        ShardMeta.read(p) for p in (root / "shards").iterdir() if p.is_dir() and not p.name.startswith(".")
    ]
    runs = {m.run.get("id", m.id): m.run for m in metas if m.run}
    created = min((m.created for m in metas), default=None)
    write_json_atomic(
        root / MANIFEST, new_manifest(fingerprint(lm), created=created, runs=list(runs.values()))
    )
    return f"rebuilt {root / MANIFEST} for {lm.source} ({len(metas)} shards, {len(runs)} runs)"
