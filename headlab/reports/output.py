"""What every report shares at its edges: the output folder, the files it writes, "n/a", and its outcome.

Contract:
- `check_out(out)`: the report folder is a folder or can be made one (nothing on its path is a file);
  checked before any work, `InputError` otherwise.
- `write_report_files(out, report, markdown, html)`: report.json, report.md and report.html are each written
  to a temp file in `out`, fsynced, and only when all three are on disk renamed over the old ones (then the
  folder is fsynced). A failure (full disk, permissions) removes the temp files, leaves the previous report
  as it was and raises `StoreError` saying so; it never leaves a truncated report. report.json holds plain
  JSON: a number that is not finite (NaN, infinity) is written as null.
- A metric over zero answered items is `None`: null in JSON, "n/a" in Markdown, HTML and the console
  (`fmt`); a difference involving one is `None` too (`minus`).
- `synthetic_data(folder, write)`: a report's default synthetic data is written into a temp folder and renamed
  to `folder` only when complete, so a run killed while writing it leaves nothing half-written behind.
- `Outcome`: how complete a run is, and the exit code the CLI gives it: 0 complete (every item of the input
  answered under every condition), 1 partial (a report was written but some items are missing: bad input
  records, unusable images, failed answers), 2 nothing usable (no item answered; a `HeadlabError` also exits
  2), 130 interrupted (rerun to resume; interruption wins over the others).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from headlab.errors import HeadlabError, InputError, StoreError

REPORT_FILES = ("report.json", "report.md", "report.html")


def check_out(out: Path, option: str = "--out") -> Path:
    """`out` as a Path, refused (InputError) when it, or a folder it would be made in, is a file."""
    out = Path(out)
    for existing in (out, *out.parents):
        if existing.exists():
            if not existing.is_dir():
                what = "is a file" if existing == out else f"lies inside {existing}, which is a file"
                raise InputError(f"{option} {out} {what}; give a folder for the report (created if missing)")
            return out
    return out


def check_folder(path: Path | None, option: str) -> None:
    """An optional input folder (e.g. --images) must exist and be a folder."""
    if path is not None and not Path(path).is_dir():
        raise InputError(f"{option} {path} is not a folder; give the folder that holds the images")


def synthetic_data(folder: Path, write: Callable[[Path], object]) -> Path:
    """`folder`, first made by `write(temp)` and renamed into place when that returns (module docstring)."""
    if folder.is_dir():
        return folder
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def reason(err: BaseException) -> str:
    """Why an item failed, for the report: a HeadlabError's message, else the exception's type and text."""
    return str(err) if isinstance(err, HeadlabError) else f"{type(err).__name__}: {err}"


def fmt(value: float | None, spec: str = ".3f") -> str:
    """A metric for display: "n/a" when it is None (nothing to compute it over)."""
    return "n/a" if value is None else format(value, spec)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table's lines; floats with 4 decimals, None as n/a."""

    def cell(v: object) -> str:
        return fmt(v, ".4f") if v is None or isinstance(v, float) else str(v)

    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows),
    ]


def minus(a: float | None, b: float | None) -> float | None:
    """a - b, or None when either is None."""
    return None if a is None or b is None else a - b


def plain_json(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """One file replaced atomically (temp file, fsync, rename, folder fsync); StoreError if it fails."""
    _replace_all(path.parent, {path.name: text})


def write_report_files(out: Path, report: Mapping, markdown: str, html: str) -> Path:
    """report.json/.md/.html in `out`, all replaced together (module docstring); returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    body = json.dumps(plain_json(report), indent=1, allow_nan=False)
    _replace_all(out, dict(zip(REPORT_FILES, (body, markdown, html), strict=True)))
    return out / "report.html"


def _replace_all(folder: Path, texts: Mapping[str, str]) -> None:
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


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How complete a report's run is (module docstring: the exit codes)."""

    items: int  # answers the input asks for: usable questions x conditions
    answered: int  # of those, answered (now or by an earlier run)
    failed: int  # answers that failed in this run (listed in the report)
    bad_input: int  # input records that never became questions (malformed, image missing)
    interrupted: bool = False

    @property
    def status(self) -> str:
        if self.interrupted:
            return "interrupted"
        if self.answered == 0:
            return "empty"
        if self.failed or self.bad_input or self.answered < self.items:
            return "partial"
        return "complete"

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "partial": 1, "empty": 2, "interrupted": 130}[self.status]

    def as_dict(self) -> dict:
        return asdict(self) | {"status": self.status, "exit_code": self.exit_code}
