"""The console every command prints to, and the checks of where a command will write, made before any work.

`say_error` prints one `headlab: ...` line (the message as text, never read as rich markup). The checks raise
`InputError` naming the option: a layer list must be numbers, a table path must end in .csv or .parquet and not be a folder, a file target
must not be a folder, and the folder of any target must exist or be creatable (no file on its path).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from headlab.errors import InputError

console = Console(soft_wrap=True)  # messages are never broken mid-path
TABLE_SUFFIXES = (".csv", ".parquet")


def say_error(message: str) -> None:
    """One `headlab: ...` line; the message is printed as text, never read as rich markup."""
    console.print(f"[bold red]headlab:[/] {escape(message)}")


def check_creatable(folder: Path, option: str) -> None:
    """`folder` is a folder or can be made one: its nearest existing ancestor is a folder."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                raise InputError(f"{option} {folder}: {existing} is a file, not a folder; give a folder path")
            return


def check_table_path(path: Path, option: str) -> None:
    """A table can be written at `path` (.csv or .parquet, not a folder); checked before any work."""
    if path.suffix not in TABLE_SUFFIXES:
        raise InputError(f"{option} {path} must end in .csv or .parquet")
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name ending in .csv or .parquet")
    check_creatable(path.parent, option)


def check_file_target(path: Path, option: str) -> None:
    """A file can be written at `path`: it is not a folder and its folder exists or can be made."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name")
    check_creatable(path.parent, option)


def write_table(frame, out: Path) -> None:
    """`frame` as .csv or .parquet at `out` (its folder made), then a line saying so."""
    check_table_path(out, "the output")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)
    console.print(f"wrote {len(frame)} rows to {out}")


def layer_list(text: str, option: str, words: str) -> tuple[int, ...]:
    """Comma-separated layer numbers ("0,3"); InputError saying what `option` takes (`words`) otherwise."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{option} takes {words} or comma-separated layers, got {text!r}") from None
