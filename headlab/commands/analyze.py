"""`headlab analyze NAME STORE` (and `analyze list`) and `headlab dash STORE`: read a store, save or show
results. An analysis' options are its typed declarations (`analyses.registry.Option`), checked before work."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from headlab.commands.console import check_file_target, console
from headlab.errors import InputError

EXIT_CODES = (
    "Exit code: 0 the result is saved in the store (and written to --csv); 1 it is saved but has no rows "
    "(nothing passed the analysis), or --csv could not be written; 2 nothing was saved: a bad option, "
    "store or model (checked before any work) or an error while computing (one line says why)."
)


def _option_pairs(items: list[str]) -> dict[str, str]:
    """-o KEY=VALUE items as {key: value text}; the analysis' option declarations parse the text."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--option expects KEY=VALUE, got {item!r}")
        if key in pairs:
            raise InputError(f"--option {key} is given twice ({pairs[key]!r} and {value!r}); give it once")
        pairs[key] = value
    return pairs


def _analyses_list() -> None:
    """Each analysis, then each option: what it takes, its default, its help."""
    from headlab.analyses.registry import as_text, registered

    for entry in registered().values():
        console.print(f"[bold]{entry.name}[/bold]: {escape(entry.description)}")
        for key, opt in entry.options.items():
            console.print(escape(f"    {key}: {opt.describe()}, default {as_text(opt.default)}. {opt.help}"))


def analyze(
    name: Annotated[str, typer.Argument(help="the analysis; `headlab analyze list` lists them")],
    store: Annotated[Path | None, typer.Argument(help="store directory (its result is saved there)")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="KEY=VALUE, repeatable (e.g. -o task=ioi)")
    ] = None,
    csv: Annotated[Path | None, typer.Option(help="also write the result as CSV")] = None,
) -> None:
    """Run an analysis on a store and save its result into the store (results/NAME.parquet). Under
    `torchrun -m headlab analyze ...` the head sweeps of activation patching and ablation importance are
    split over the processes; rank 0 saves and prints the whole result."""
    from headlab.analyses.registry import analysis, run_analysis
    from headlab.runs.distributed import process_group
    from headlab.store import Store

    if name == "list":
        _analyses_list()
        return
    options = _option_pairs(option or [])
    analysis(name).parse(options)  # the options' own rules, before the store is opened
    if store is None:
        raise InputError(f"headlab analyze {name} needs the store directory: headlab analyze {name} STORE")
    if csv is not None:
        check_file_target(csv, "--csv")
    with process_group() as world:  # under torchrun the model-running analyses split their heads
        frame = run_analysis(name, Store.open(store), **options)
    if not world.main:
        return
    console.print(frame.head(20).to_string(index=False))
    console.print(f"saved the {name} result ({len(frame)} rows) in {store / 'results'}")
    if csv is not None:
        _write_csv(frame, csv)
    if not len(frame):
        console.print(
            f"[bold]the {name} result has no rows[/]: nothing passed the analysis with these options"
        )
        raise typer.Exit(1)


def _write_csv(frame, csv: Path) -> None:
    """The --csv copy of a result already saved in the store (exit 1 if it cannot be written)."""
    try:
        csv.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(csv, index=False)
    except OSError as err:
        console.print(
            f"[bold red]headlab:[/] could not write --csv {csv} ({err.strerror or err}); the result is saved "
            "in the store"
        )
        raise typer.Exit(1) from None
    console.print(f"wrote {len(frame)} rows to {csv}")


def dash(
    store: Annotated[Path, typer.Argument(help="store directory")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to serve on")] = 8050,
    host: Annotated[str, typer.Option(help="address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    model: Annotated[bool, typer.Option(help="load the model for token strings, patch grids")] = True,
) -> None:
    """Browse a store's heads in the browser: heat maps, conditions, A - B, click a head for its attention."""
    from headlab.dashboards.app import serve
    from headlab.store import Store

    Store.open(store)  # a missing or broken store is one line, before the port is tried
    _check_servable(host, port)
    serve(store, host=host, port=port, model=model)


def _check_servable(host: str, port: int) -> None:
    """`host:port` can be bound now (the socket is closed again at once; the server binds it next)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as err:
        raise InputError(
            f"cannot serve on {host}:{port} ({err.strerror or err}); pass a free --port or another --host"
        ) from None
