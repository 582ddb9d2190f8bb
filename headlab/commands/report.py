"""`headlab report NAME`: one command per declared report (`reports.registry`), generated from its declaration.

A generated command takes the report's options (their flags, types, defaults and help from the declaration),
turns them into the pipeline's keywords (`Report.call`), runs the pipeline with progress bars, prints the
report's summary lines, the report's path last, and exits with the run's outcome (`runs.outcome.Outcome`):
0 complete, 1 partial (listed in the report), 2 nothing answered, 130 interrupted (rerun to resume).
Under `torchrun --nproc-per-node N -m headlab report NAME ...` each process answers its slice of the
questions into the one answer log, and rank 0 writes the report from all of them (`runs.distributed`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.markup import escape

from headlab.commands.console import console


def register(report_app: typer.Typer, wrap: Callable) -> None:
    """A command on `report_app` for every registered report, each wrapped by `wrap`."""
    from headlab.reports.registry import registered

    for report in registered().values():
        report_app.command(report.name, help=report.help, epilog=report.epilog)(wrap(command(report)))


def command(report) -> Callable[..., None]:
    """The command function of `report`: its signature is the report's options (typer reads it)."""

    def run(**values) -> None:
        from headlab.runs.distributed import NotMainRank, process_group

        out = values["out"]
        keywords = report.call(values)
        with process_group() as world, _progress(report.unit, shown=world.main) as progress:
            try:
                result = report.run(**keywords, progress=progress)
            except NotMainRank:  # a data-parallel rank's share is in the log; rank 0 writes the report
                return
        for line in report.summary(result, out):
            console.print(escape(line))
        _done(result.html, result.report["outcome"])

    run.__name__ = f"report_{report.name.replace('-', '_')}"
    run.__doc__ = report.help
    run.__signature__ = inspect.Signature(report.parameters())
    return run


@contextmanager
def _progress(unit: str, *, shown: bool = True):
    """A reports-style progress callback (description, total) -> tick; its bars close on exit (`shown`
    False: bars that print nothing, on a data-parallel rank other than 0)."""
    from tqdm import tqdm

    bars = []

    def progress(desc: str, total: int):
        bar = tqdm(total=total, desc=desc, unit=unit, disable=not shown)
        bars.append(bar)

        def tick() -> None:
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

        return tick

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def _done(html: Path, outcome: dict) -> None:
    """The report's path last, then exit with its outcome's code (module docstring)."""
    if outcome["status"] == "interrupted":
        console.print(
            "[bold]interrupted[/]: everything done so far is kept; rerun the same command to resume"
        )
    console.print(f"report: {html}")
    bad = f"{outcome['failed']} failed, {outcome['bad_input']} bad input records"
    if outcome["status"] == "partial":
        console.print(
            f"[yellow]partial[/]: {outcome['answered']} of {outcome['items']} items done ({bad}: see the report)"
        )
    if outcome["status"] == "empty":
        console.print(f"[bold red]headlab:[/] nothing was answered ({bad}: see the report)")
    if outcome["exit_code"]:
        raise typer.Exit(outcome["exit_code"])
