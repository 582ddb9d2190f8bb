"""`headlab capture` (a prompt file into a store, resumable) and `headlab store verify | info`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from headlab.commands.console import check_creatable, console, layer_list
from headlab.errors import InputError


def _layers(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    if text == "none":
        return ()
    return layer_list(text, "--attention", "'all', 'none'")


def capture(
    model: Annotated[str, typer.Option(help="local model directory or hub id")],
    data: Annotated[Path, typer.Option(help="JSONL of prompts: {'id', 'prompt', 'image'?, ...}")],
    out: Annotated[Path, typer.Option(help="the store directory (created if missing)")],
    condition: Annotated[str, typer.Option(help="name of this condition (e.g. with_image)")] = "default",
    images: Annotated[
        Path | None, typer.Option(help="folder the image paths are relative to (default: the data file's)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per forward pass")] = 8,
    attention: Annotated[
        str, typer.Option(help="layers whose compact attention is stored: all, none or 0,3")
    ] = "all",
) -> None:
    """Capture a prompt file into a store (resumable: a rerun skips committed examples).

    Exit code: 0 every example of the file is in the store; 1 some lines were bad (listed) but the others
    are in the store; 2 nothing of the file is in the store, or an error stopped it first; 130 interrupted.
    """
    from headlab.datasets.prompts import read_prompts
    from headlab.loading import Family, load
    from headlab.runs.batch import capture_to_store
    from headlab.store import Store

    attention_layers = _layers(attention)
    if not data.is_file():
        raise InputError(f"--data {data} does not exist (or is not a file)")
    if images is not None and not images.is_dir():
        raise InputError(f"--images {images} is not a folder")
    check_creatable(out, "--out")
    lm = load(model)
    prompts = read_prompts(data, images_dir=images, need_images=lm.family is not Family.LLM)
    store = Store.create(out, lm, exist_ok=True)
    report = capture_to_store(
        lm,
        store,
        prompts.items,
        condition=condition,
        batch_size=batch_size,
        attention_layers=attention_layers,
    )
    _capture_summary(report, prompts.problems, out, data)


def _capture_summary(report, problems: list[str], out: Path, data: Path) -> None:
    """Print the counts and every skipped line; exit with the code `capture` documents."""
    bad = problems + report.failed
    in_store = report.done + report.skipped
    console.print(f"{report.done} captured, {report.skipped} already in the store, {len(bad)} bad -> {out}")
    for problem in bad:
        console.print(f"  [yellow]skipped[/] {problem}")
    if report.interrupted:
        console.print("[bold]interrupted[/]: every committed batch is kept; rerun the same command to resume")
        raise typer.Exit(130)
    if not in_store:
        what = f"all {len(bad)} lines are bad (listed above)" if bad else "it holds no examples"
        console.print(f"[bold red]headlab:[/] nothing of {data} is in the store: {what}")
        raise typer.Exit(2)
    if bad:
        raise typer.Exit(1)


def verify(
    store: Annotated[Path, typer.Argument(help="store directory")],
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="move what cannot be trusted to STORE/quarantine/ (nothing is deleted) and remove stale "
            ".tmp-* folders of writers that are gone",
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(help="with --repair: the model that wrote the store, to rebuild its manifest"),
    ] = None,
) -> None:
    """Check every file of a store against its checksums and schema; --repair quarantines what fails.

    Exit code: 0 the store reads cleanly (notes are harmless); 1 problems remain (listed); 2 not a store.
    """
    from headlab.store import Store
    from headlab.store.integrity import verify_store

    if model is not None and not repair:
        raise InputError("--model is for --repair (it rebuilds a broken manifest); add --repair")
    if repair:
        from headlab.loading import load

        result = Store.repair(store, load(model) if model else None)
        console.print(
            escape("\n".join(f"repaired: {action}" for action in result.actions) or "nothing to repair")
        )
        report = result.after
    else:
        report = verify_store(store)
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    for problem in report.problems:
        console.print(f"[bold red]problem[/]: {escape(problem)}")
    console.print(
        f"{report.shards} shards, {report.files} files checked: {'OK' if report.ok else 'PROBLEMS'}"
    )
    if not report.ok:
        if not repair:
            console.print(
                escape(f"`headlab store verify {store} --repair` moves what cannot be trusted to quarantine/")
            )
        raise typer.Exit(1)


def info(store: Annotated[Path, typer.Argument(help="store directory")]) -> None:
    """Summarise a store: model, ids, (example, condition) rows, conditions, towers, what is stored, results."""
    from headlab.store import Store

    labels = {"examples": "examples (ids)", "rows": "(example, condition) rows"}
    for key, value in Store.open(store).info().items():
        if key == "stored":
            for condition, what in value.items():
                shown = ", ".join(f"{name} {n}" for name, n in what.items()) or "nothing"
                console.print(escape(f"{'stored [' + condition + ']':>26}: {shown}"))
            continue
        shown = (", ".join(map(str, value)) or "none") if isinstance(value, list) else value
        console.print(escape(f"{labels.get(key, key.replace('_', ' ')):>26}: {shown}"))
