"""`headlab act search`: ACT's offline head search (`runs.act_search`) on a calibration task."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from headlab.commands.console import check_file_target, console, layer_list
from headlab.errors import InputError


def _act_layers(text: str, n_layers: int) -> tuple[int, ...] | None:
    if text == "code":
        return None
    if text == "all":
        return tuple(range(n_layers))
    return layer_list(text, "--layers", "'code', 'all'")


@contextmanager
def _bar(desc: str):
    """A progress(done, total) callback drawing one bar of heads, closed on exit."""
    from tqdm import tqdm

    bar = tqdm(total=None, desc=desc, unit="head")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()


def search(
    model: Annotated[str, typer.Option(help="local model directory, hub id or zoo:NAME")],
    task: Annotated[str, typer.Option(help="calibration task: colored_objects, multi_doc_qa or ioi")],
    out: Annotated[Path, typer.Option(help="write the per-head table here (.csv or .json)")],
    n: Annotated[int, typer.Option(help="calibration examples")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="seed of the calibration examples")] = 30_000,
    layers: Annotated[
        str, typer.Option(help="'code' (as the official code: not the first two, not the last), 'all' or 0,1")
    ] = "code",
    tau: Annotated[float, typer.Option(help="threshold on the received-attention score")] = 0.1,
    beta: Annotated[float, typer.Option(help="share of attention a hidden sink keeps")] = 0.4,
    eval_n: Annotated[
        int, typer.Option(min=0, help="held-out examples to compare plain vs ACT on (0 = skip)")
    ] = 0,
    eval_seed: Annotated[int, typer.Option(min=0, help="seed of the held-out examples")] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per forward pass")] = 32,
) -> None:
    """Search the heads whose ACT calibration alone improves a task's zero-shot accuracy (keep/skip)."""
    from headlab.interventions import ACT, intervene
    from headlab.loading import load
    from headlab.runs.act_search import search_heads
    from headlab.runs.act_search import task as act_task

    if out.suffix not in (".csv", ".json"):
        raise InputError(f"--out must end in .csv or .json, got {out.name!r}")
    check_file_target(out, "--out")
    ACT(heads=(), tau=tau, beta=beta)  # ACT's own rules for tau and beta, before any work
    spec = act_task(task)
    examples = spec.examples(n, seed)
    lm = load(model)
    chosen = _act_layers(layers, lm.n_layers)

    def score(lm, examples) -> float:
        return spec.accuracy(lm, examples, batch_size=batch_size)

    with _bar(f"ACT head search on {task}") as progress:
        result = search_heads(lm, examples, score, layers=chosen, tau=tau, beta=beta, progress=progress)
    summary = {
        "model": model,
        "task": task,
        "n": n,
        "seed": seed,
        "tau": tau,
        "beta": beta,
        "layers": list(result.layers),
        "baseline": result.baseline,
        "kept": [list(h) for h in result.kept],
    }
    console.print(
        f"calibration accuracy without ACT {result.baseline:.4f} on {n} examples; "
        f"{len(result.kept)} of {len(result.table)} heads kept: {list(result.kept)}"
    )
    if eval_n > 0:
        held_out = spec.examples(eval_n, eval_seed)
        plain = score(lm, held_out)
        with intervene(lm, result.act()):
            calibrated = score(lm, held_out)
        summary["held_out"] = {"n": eval_n, "seed": eval_seed, "plain": plain, "act": calibrated}
        console.print(f"held-out accuracy on {eval_n} examples: plain {plain:.4f}, ACT {calibrated:.4f}")
    _write(result.table, summary, out)


def _write(table, summary: dict, out: Path) -> None:
    """The per-head table as CSV, or as JSON after the search's summary."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        table.to_csv(out, index=False)
    else:
        out.write_text(json.dumps({**summary, "heads": table.to_dict(orient="records")}, indent=1))
    console.print(f"wrote {len(table)} heads to {out}")
