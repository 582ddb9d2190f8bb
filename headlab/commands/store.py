"""`headlab capture` (a prompt file into a store, resumable) and `headlab store verify | info`."""

from __future__ import annotations

import json
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


def _towers(text: str) -> tuple[str, ...] | None:
    if text == "all":
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())


def capture(
    model: Annotated[str, typer.Option(help="local model directory or hub id")],
    data: Annotated[
        Path,
        typer.Option(help="JSONL of prompts: {'id', 'prompt', 'image'?, 'label'?, ...} (ViTs: 'image' only)"),
    ],
    out: Annotated[Path, typer.Option(help="the store directory (created if missing)")],
    condition: Annotated[
        list[str] | None,
        typer.Option(
            help="condition(s) to record, repeated or comma-separated: with_image, no_image (the image "
            "placeholder removed: text only), NAME+vhr / NAME+var (under that intervention), or a name of "
            "your own for the lines as given [default: default]"
        ),
    ] = None,
    towers: Annotated[
        str,
        typer.Option(help="towers whose head statistics and compact attention are stored: all, or lm,vision"),
    ] = "all",
    images: Annotated[
        Path | None, typer.Option(help="folder the image paths are relative to (default: the data file's)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per forward pass")] = 8,
    attention: Annotated[
        str, typer.Option(help="layers (of each tower) whose compact attention is stored: all, none or 0,3")
    ] = "all",
) -> None:
    """Capture a prompt file into a store under one or more conditions (resumable: a rerun skips committed
    (example, condition) pairs).

    Exit code: 0 every line of the file is in the store under every condition; 1 some lines or pairs failed
    (listed) but the others are in the store; 2 nothing of the file is in the store, or an error stopped it
    first; 130 interrupted.

    Data parallel: under `torchrun --nproc-per-node N -m headlab capture ...` (or `accelerate launch`) each
    process captures its own slice of the file into the same store; rank 0 prints the summary of all of them
    and exits with the code above (torchrun itself exits 1 when any process exits non-zero).
    """
    from headlab.conditions import DEFAULT, parse_conditions
    from headlab.datasets.prompts import read_prompts
    from headlab.loading import Family, load
    from headlab.runs.batch import BatchReport, capture_to_store
    from headlab.runs.distributed import process_group
    from headlab.store.ids import kind_of

    attention_layers = _layers(attention)
    conditions = parse_conditions(condition or [DEFAULT])
    if not data.is_file():
        raise InputError(f"--data {data} does not exist (or is not a file)")
    if images is not None and not images.is_dir():
        raise InputError(f"--images {images} is not a folder")
    check_creatable(out, "--out")
    with process_group() as world:  # one process: nothing distributed happens
        lm = load(model)
        vision = lm.family is Family.VIT
        prompts = read_prompts(data, images_dir=images, need_images=vision, need_prompt=not vision)
        store = _shared_store(out, lm, world)
        items = prompts.items
        report = capture_to_store(
            lm,
            store,
            world.shard(items),
            conditions=conditions,
            towers=_towers(towers),
            batch_size=batch_size,
            attention_layers=attention_layers,
            progress=world.main,
            id_kind=kind_of(items[0].id) if items else None,
        )
        report = BatchReport.merged(world.gather(report))  # also waits for every rank to finish
    if world.main:
        _capture_summary(report, prompts.problems, out, data, [c.name for c in conditions])


def _shared_store(out: Path, lm, world):
    """The store at `out` for `lm`: created by rank 0 (if missing) while the others wait, then opened by them
    (never created: on a network filesystem another host may see the new manifest a few seconds late)."""
    import time

    from headlab.store import Store
    from headlab.store.manifest import MANIFEST

    if world.main:
        store = Store.create(out, lm, exist_ok=True)
    world.barrier()
    if world.main:
        return store
    deadline = time.monotonic() + 60
    while not (out / MANIFEST).is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    return Store.open(out, lm)


def _capture_summary(report, problems: list[str], out: Path, data: Path, conditions: list[str]) -> None:
    """Print the counts and every skipped line; exit with the code `capture` documents."""
    bad = problems + report.failed
    in_store = report.done + report.skipped
    pairs = f" ((example, condition) pairs over {', '.join(conditions)})" if len(conditions) > 1 else ""
    console.print(
        escape(
            f"{report.done} captured, {report.skipped} already in the store, {len(bad)} bad -> {out}{pairs}"
        )
    )
    for problem in bad:
        console.print(f"  [yellow]skipped[/] {escape(problem)}")
    if report.interrupted:
        console.print("[bold]interrupted[/]: every committed batch is kept; rerun the same command to resume")
        raise typer.Exit(130)
    if not in_store:
        what = f"all {len(bad)} lines are bad (listed above)" if bad else "it holds no examples"
        console.print(f"[bold red]headlab:[/] nothing of {escape(str(data))} is in the store: {what}")
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


def info(
    store: Annotated[Path, typer.Argument(help="store directory")],
    example: Annotated[
        str | None, typer.Option(help="show what went into the model for this example id instead")
    ] = None,
    condition: Annotated[
        str | None, typer.Option(help="with --example: its condition (default: the store's only one)")
    ] = None,
) -> None:
    """Summarise a store: model, ids, (example, condition) rows, conditions, towers, what is stored (head
    stats, attention, head outputs, tokens, images, labels, answers), results; or, with --example, one
    example's prompt, tokens, image, label and answer."""
    from headlab.store import Store

    opened = Store.open(store)
    if example is not None:
        _example_info(opened, example, condition)
        return
    if condition is not None:
        raise InputError("--condition is for --example (the summary covers every condition)")
    labels = {"examples": "examples (ids)", "rows": "(example, condition) rows"}
    for key, value in opened.info().items():
        if key == "stored":
            for name, what in value.items():
                shown = ", ".join(f"{kind} {n}" for kind, n in what.items()) or "nothing"
                console.print(escape(f"{'stored [' + name + ']':>26}: {shown}"))
            continue
        shown = (", ".join(map(str, value)) or "none") if isinstance(value, list) else value
        console.print(escape(f"{labels.get(key, key.replace('_', ' ')):>26}: {shown}"))


def _example_info(store, example: str, condition: str | None) -> None:
    """Print one example's ExampleInfo (`Store.example_info`); what is not stored shows as "-"."""
    from headlab.store.ids import typed_id

    held = store.conditions()
    if condition is None and len(held) > 1:
        raise InputError(f"this store holds several conditions ({', '.join(held)}); pass --condition")
    ident = typed_id(example, store.id_kind)
    info = store.example_info(ident, condition=condition)
    tokens = "-" if info.tokens is None else f"{len(info.tokens)}: " + " ".join(repr(t) for t in info.tokens)
    thumbnail = "-" if info.thumbnail is None else f"PNG, {len(info.thumbnail)} bytes"
    rows = {
        "example": repr(ident),
        "prompt": "-" if info.prompt is None else repr(info.prompt),
        "token ids": "-" if info.token_ids is None else " ".join(map(str, info.token_ids)),
        "tokens": tokens,
        "image": info.image or "-",
        "thumbnail": thumbnail,
        "label": "-" if info.label is None else json.dumps(info.label),
        "answer": "-" if info.answer is None else json.dumps(info.answer),
    }
    for key, value in rows.items():
        console.print(escape(f"{key:>10}: {value}"))
