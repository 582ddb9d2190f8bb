"""Analysis results kept in a store: results/<name>.parquet (a tidy table) and results/<name>.json
({"name", "rows", "params", "sha256"}: the parameters and the parquet's sha256).

Both files are written atomically (temp file, fsync, rename; the parquet first). A read checks the parquet
against the sha256 of its JSON before parsing it: a mismatch (a corrupted file, or a crash between the two
renames) is a StoreError saying to rerun the analysis. Results saved before checksums have no sha256 and are
read as they are. Rerunning an analysis replaces its result.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa

from headlab.errors import StoreError
from headlab.store.shard import sha256_of, write_json_atomic

RESULTS = "results"


def save_result(folder: Path, name: str, frame: pd.DataFrame, params: dict | None) -> Path:
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise StoreError(f"result name {name!r}: use lowercase letters, digits, '_', '-' and '.'")
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    frame.to_parquet(tmp, index=False)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = sha256_of(tmp)
    os.replace(tmp, folder / f"{name}.parquet")
    sidecar = {"name": name, "rows": len(frame), "params": params or {}, "sha256": digest}
    write_json_atomic(folder / f"{name}.json", sidecar)
    return folder / f"{name}.parquet"


def result_names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []


def read_result(folder: Path, name: str) -> pd.DataFrame:
    path = folder / f"{name}.parquet"
    if not path.is_file():
        raise StoreError(
            f"no result {name!r} in {folder.parent}; stored: {result_names(folder) or 'none'} "
            f"(run `headlab analyze ... {folder.parent}`)"
        )
    data = path.read_bytes()
    problem = _mismatch(folder, name, hashlib.sha256(data).hexdigest())
    if problem:
        raise StoreError(problem)
    try:
        return pd.read_parquet(io.BytesIO(data))
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path} is unreadable ({err}); rerun the analysis") from None


def result_problem(folder: Path, name: str) -> str | None:
    """What is wrong with a stored result's files (for `store verify`), or None."""
    try:
        return _mismatch(folder, name, sha256_of(folder / f"{name}.parquet"))
    except StoreError as err:
        return str(err)


def _mismatch(folder: Path, name: str, digest: str) -> str | None:
    expected = result_sidecar(folder, name).get("sha256")
    if expected is None or expected == digest:
        return None
    return (
        f"{folder / name}.parquet does not match its checksum in {name}.json (corrupted); rerun the analysis"
    )


def result_sidecar(folder: Path, name: str) -> dict:
    """results/<name>.json as a dict ({} when absent); a corrupt one is a StoreError."""
    path = folder / f"{name}.json"
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise StoreError(f"{path} is corrupted ({err}); rerun the analysis") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path} is not a JSON object; rerun the analysis")
    return obj
