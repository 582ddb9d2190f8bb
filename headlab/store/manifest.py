"""A store's manifest.json: schema version, the fingerprint of the model that wrote it, creation, runs.

`read_manifest(root)` returns it checked or raises a StoreError that says what is wrong and how to repair it:
a manifest must be a JSON object with an integer `schema_version` no newer than this headlab reads, a
`fingerprint` object with string `architecture`, `config_hash` and `weights_hash`, and (if present) a list
of `runs`. The manifest is written atomically (`write_json_atomic`) and only under the store's lock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from headlab.errors import StoreError
from headlab.store.shard import SCHEMA_VERSION
from headlab.version import __version__

MANIFEST = "manifest.json"
FINGERPRINT_KEYS = ("architecture", "config_hash", "weights_hash")


def new_manifest(fingerprint: dict, *, created: float | None = None, runs: list | None = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "created": time.time() if created is None else created,
        "headlab": __version__,
        "runs": runs or [],
    }


def manifest_problem(obj: object) -> str | None:
    """What makes `obj` (parsed manifest.json) unusable, or None."""
    if not isinstance(obj, dict):
        return f"it holds {json.dumps(obj)[:40]}, not a JSON object"
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        return f"its schema_version is {version!r}, not an integer"
    fp = obj.get("fingerprint")
    if not isinstance(fp, dict) or not all(isinstance(fp.get(k), str) for k in FINGERPRINT_KEYS):
        return f"it has no model fingerprint ({', '.join(FINGERPRINT_KEYS)})"
    if not isinstance(obj.get("runs", []), list):
        return "its runs entry is not a list"
    return None


def manifest_hint(root: Path) -> str:
    return (
        f"restore it from a backup, or rebuild it with `headlab store verify {root} --repair --model MODEL` "
        "(MODEL: the model that wrote this store; the broken file is kept in quarantine/)"
    )


def read_manifest(root: Path) -> dict:
    """The checked manifest of the store at `root` (module docstring), or a StoreError."""
    obj, problem = _load(root)
    if problem:
        raise StoreError(problem)
    if obj["schema_version"] > SCHEMA_VERSION:
        raise StoreError(
            f"{root} has schema version {obj['schema_version']}, newer than this headlab reads "
            f"({SCHEMA_VERSION}); upgrade headlab"
        )
    return obj


def manifest_broken(root: Path) -> bool:
    """Whether the manifest is missing or broken (a newer headlab's valid manifest is not broken)."""
    return _load(root)[1] is not None


def _load(root: Path) -> tuple[dict | None, str | None]:
    """(the manifest, None) or (None, what is wrong with it and how to repair it)."""
    path = root / MANIFEST
    if not path.is_file():
        if (root / "shards").is_dir():
            return None, f"{root} has shards/ but no {MANIFEST}; {manifest_hint(root)}"
        return None, f"{root} is not a headlab store (no {MANIFEST}); create one with Store.create"
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        return None, f"{path} is corrupted ({err}); {manifest_hint(root)}"
    problem = manifest_problem(obj)
    if problem:
        return None, f"{path} is not a valid manifest ({problem}); {manifest_hint(root)}"
    return obj, None
