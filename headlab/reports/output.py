"""What every report shares at its edges: the output folder, the files it writes, and how numbers read.

Contract:
- `check_out(out)`: the report folder is a folder or can be made one (nothing on its path is a file);
  checked before any work, `InputError` otherwise. `check_folder(path, option)`: an input folder exists.
- `write_report_files(out, report, doc)`: report.json (every number), report.md and report.html (the
  document `doc`, rendered by `document.markdown` and `html.html_page`) are replaced together
  (`runs.atomic.replace_all`): a failure (full disk, permissions) leaves the previous report as it was and
  raises `StoreError` saying so; it never leaves a truncated report. report.json holds plain JSON: a number
  that is not finite (NaN, infinity) is written as null. When the document has figures, the folder's
  `plotly.min.js` (`html.PLOTLY_JS`, the installed plotly package's bundle, which report.html loads by a
  relative path) is written in the same atomic step if it is missing or differs from that bundle, and left
  as it is otherwise: one copy per folder, never a stale one.
- A metric over zero answered items is `None`: null in JSON, "n/a" in Markdown, HTML and the console
  (`fmt`); a difference involving one is `None` too (`minus`).
- `records(frame)`: a table's rows as plain JSON (NaN -> None, numpy scalars -> Python ones).
- `load_llm(model, what)`: the language model a report runs, refused (InputError) when it is not one.
- `synthetic_data(folder, write)`: a report's default synthetic data is written into a temp folder and renamed
  to `folder` only when complete, so a run killed while writing it leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from headlab.errors import InputError
from headlab.reports.document import Document, markdown
from headlab.reports.html import PLOTLY_JS, html_page
from headlab.runs.atomic import replace_all

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
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # another process (a data-parallel rank) made the same folder meanwhile: theirs is kept
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def records(frame) -> list[dict]:
    """JSON-able rows of a DataFrame: NaN -> None, numpy scalars -> Python ones, lists kept."""
    out = []
    for row in frame.to_dict(orient="records"):
        clean = {}
        for key, value in row.items():
            if hasattr(value, "tolist"):
                value = value.tolist()
            elif hasattr(value, "item"):
                value = value.item()
            if isinstance(value, float) and math.isnan(value):
                value = None
            clean[key] = value
        out.append(clean)
    return out


def load_llm(model: str, what: str):
    """The language model `model` for the `what` report; InputError when it is another family."""
    from headlab.loading import Family, load

    lm = load(model)
    if lm.family is not Family.LLM:
        raise InputError(f"the {what} report needs a language model; {model} is a {lm.family.value} model")
    return lm


def fmt(value: float | None, spec: str = ".3f") -> str:
    """A metric for display: "n/a" when it is None (nothing to compute it over)."""
    return "n/a" if value is None else format(value, spec)


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


def write_report_files(out: Path, report: Mapping, doc: Document) -> Path:
    """report.json/.md/.html in `out`, all replaced together (module docstring); returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    body = json.dumps(plain_json(report), indent=1, allow_nan=False)
    files = dict(zip(REPORT_FILES, (body, markdown(doc), html_page(doc)), strict=True))
    if doc.has_figures:
        files |= _plotly_js(out)
    replace_all(out, files)
    return out / "report.html"


def _plotly_js(out: Path) -> dict[str, str]:
    """{PLOTLY_JS: the bundle} when `out` lacks it or holds another version; {} when it is up to date."""
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    path = out / PLOTLY_JS
    try:
        if path.stat().st_size == len(bundle.encode()) and path.read_text(encoding="utf-8") == bundle:
            return {}
    except (OSError, UnicodeDecodeError):
        pass  # missing or unreadable: written again
    return {PLOTLY_JS: bundle}
