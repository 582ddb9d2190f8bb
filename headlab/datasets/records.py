"""Reading JSON data files (JSON Lines or one JSON array), never failing on a bad record.

`read_records(path)` returns every object with its line number (JSON Lines) or array index (JSON array),
and a list of problems as "file:line: what is wrong" (or "file[index]: ..."). `iter_records(path)` yields the
same entries one by one, good and bad in file order. A long evaluation counts and lists bad records instead
of crashing on them. The rules, in one place for every data file headlab reads:

- The file is UTF-8; a byte-order mark at its start is ignored. A file whose first character (after the
  mark and white space) is "[" is one JSON array, anything else is JSON Lines.
- JSON Lines: lines end at "\\n" (a "\\r\\n" ending is fine); blank lines are skipped but keep their number.
  A line that is not valid UTF-8, not valid JSON (also: nested deeper than the parser follows, or a number
  too long to convert) or not an object is one problem naming its line; its neighbours are unaffected.
- A JSON array is one document: if it is not valid UTF-8 or not valid JSON, `InputError` names the line.
  An element that is not an object is one problem naming its index.
- Example ids follow `headlab.ids.example_id`.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from headlab.errors import InputError
from headlab.ids import json_kind


@dataclass
class Records:
    items: list[tuple[int, dict]] = field(default_factory=list)  # (line or index, object)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One non-blank record of a data file: its object, or the problem that made it unusable."""

    position: int  # line number (JSON Lines, 1-based) or array index (JSON array, 0-based)
    where: str  # "file:line" or "file[index]", the prefix of every message about this record
    obj: dict | None = None
    problem: str | None = None  # "where: what is wrong" when obj is None


def read_records(path: str | Path) -> Records:
    """Objects of a JSON array file or a JSON Lines file, and the problems of the bad records."""
    out = Records()
    for entry in iter_records(path):
        if entry.obj is None:
            out.problems.append(entry.problem)
        else:
            out.items.append((entry.position, entry.obj))
    return out


def iter_records(path: str | Path) -> Iterator[Entry]:
    """Every non-blank record of `path` in file order (module docstring: the rules)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist (or is not a file)")
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if data.lstrip().startswith(b"["):
        yield from _array(path, data)
    else:
        yield from _lines(path, data)


def _array(path: Path, data: bytes) -> Iterator[Entry]:
    try:
        array = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: {_not_utf8(data, err.start)}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: the JSON array is malformed ({err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise InputError(f"{path}: the JSON array is unreadable ({_json_reason(err)})") from None
    if not isinstance(array, list):
        raise InputError(f"{path}: expected a JSON array of objects")
    for i, obj in enumerate(array):
        where = f"{path}[{i}]"
        if isinstance(obj, dict):
            yield Entry(position=i, where=where, obj=obj)
        else:
            yield Entry(
                position=i, where=where, problem=f"{where}: expected a JSON object, got {json_kind(obj)}"
            )


def _lines(path: Path, data: bytes) -> Iterator[Entry]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        problem, obj = None, None
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            problem = _not_utf8(raw, err.start)
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            problem = f"not valid JSON ({_json_reason(err)})"
        if problem is None and not isinstance(obj, dict):
            problem = f"expected a JSON object, got {json_kind(obj)}"
        if problem is None:
            yield Entry(position=number, where=where, obj=obj)
        else:
            yield Entry(position=number, where=where, problem=f"{where}: {problem}")


def _not_utf8(data: bytes, at: int) -> str:
    column = at - (data.rfind(b"\n", 0, at) + 1) + 1
    return f"not valid UTF-8 (byte 0x{data[at]:02x} at column {column}); save the file as UTF-8"


def _json_reason(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at column {err.colno}"
    return str(err)  # e.g. an integer literal of more than 4300 digits
