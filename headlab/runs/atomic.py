"""Text files replaced atomically: what a run writes beside a store (answer logs, caches, reports).

Contract: `replace_all(folder, {name: text})` writes each text to a temp file in `folder`, fsyncs it, and
only when all are on disk renames them over the old files (then fsyncs the folder). A failure (full disk,
permissions) removes the temp files, leaves the previous files as they were and raises `StoreError` saying
so; it never leaves a truncated file. `write_text_atomic(path, text)` is the same for one file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from headlab.errors import StoreError


def write_text_atomic(path: Path, text: str) -> None:
    """One file replaced atomically (temp file, fsync, rename, folder fsync); StoreError if it fails."""
    replace_all(path.parent, {path.name: text})


def replace_all(folder: Path, texts: Mapping[str, str]) -> None:
    """Every `name: text` of `texts` written in `folder`, all replaced together (module docstring)."""
    temps: dict[str, Path] = {}
    try:
        for name, text in texts.items():
            temps[name] = folder / f".{name}.{uuid.uuid4().hex}.tmp"
            with open(temps[name], "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
        _fsync_dir(folder)
    except OSError as err:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        names = ", ".join(texts)
        raise StoreError(
            f"could not write {names} in {folder} ({err.strerror or err}); the previous files are unchanged. "
            "Free space (or fix the permissions) and rerun: the answers already given are kept"
        ) from None


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
