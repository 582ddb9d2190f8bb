"""Reading benchmark files that are JSON Lines or one JSON array, never failing on a bad record.

`read_records(path)` returns every object with its line number (JSON Lines) or array index (JSON array),
and a list of problems as "file:line: what is wrong". A long evaluation counts and lists bad records instead
of crashing on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from headlab.errors import InputError


@dataclass
class Records:
    items: list[tuple[int, dict]] = field(default_factory=list)  # (line or index, object)
    problems: list[str] = field(default_factory=list)


def read_records(path: str | Path) -> Records:
    """Objects of a JSON array file or a JSON Lines file (tried in that order)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    out = Records()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: the JSON array is malformed ({err.msg})") from err
        for i, obj in enumerate(array):
            if isinstance(obj, dict):
                out.items.append((i, obj))
            else:
                out.problems.append(f"{path}[{i}]: expected a JSON object")
        return out
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            out.problems.append(f"{path}:{number}: not valid JSON ({err.msg})")
            continue
        if isinstance(obj, dict):
            out.items.append((number, obj))
        else:
            out.problems.append(f"{path}:{number}: expected a JSON object")
    return out
