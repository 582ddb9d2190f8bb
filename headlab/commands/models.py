"""`headlab info`, `headlab stats` and `headlab demo`: look at a model and capture its heads directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headlab.commands.console import check_table_path, console, write_table


def info(model: Annotated[str, typer.Argument(help="local model directory or hub id")]) -> None:
    """Load a model and show its family, towers and attention shapes."""
    from headlab.loading import load

    lm = load(model)
    table = Table(title=f"{lm.model_type} ({lm.family.value}) from {lm.source}")
    for col in ("tower", "module path", "layers", "heads", "kv heads", "head dim", "causal", "patch grid"):
        table.add_column(col)
    for t in lm.towers:
        table.add_row(
            t.name,
            t.path,
            str(t.n_layers),
            str(t.n_heads),
            str(t.n_kv_heads),
            str(t.head_dim),
            str(t.causal),
            "x".join(map(str, t.grid)) if t.grid else "-",
        )
    console.print(table)
    console.print(f"image tokens: {lm.image_tokens}")


def summary_table(frame, title: str) -> Table:
    """Per (tower, layer, head): first-token mass, entropy, mean distance, alpha of key 0."""
    import pandas as pd

    picks = {
        "mass:bos": ("mass", "bos"),
        "mass:cls": ("mass", "cls"),
        "mass:image": ("mass", "image"),
        "entropy": ("entropy", ""),
        "distance": ("distance", ""),
        "alpha pos:0": ("alpha", "pos:0"),
    }
    cols = {}
    for label, (stat, role) in picks.items():
        sub = frame[(frame.stat == stat) & (frame.role == role)]
        if len(sub):
            cols[label] = sub.groupby(["tower", "layer", "head"]).value.mean()
    joined = pd.DataFrame(cols).reset_index()
    table = Table(title=title)
    for c in joined.columns:
        table.add_column(str(c), justify="right")
    for row in joined.itertuples(index=False):
        table.add_row(*(("-" if v != v else f"{v:.3f}") if isinstance(v, float) else str(v) for v in row))
    return table


def stats(
    model: Annotated[str, typer.Argument(help="local model directory or hub id")],
    prompt: Annotated[list[str], typer.Option(help="a prompt (repeat for a batch)")],
    image: Annotated[list[Path] | None, typer.Option(help="an image per prompt (LVLMs, ViTs)")] = None,
    out: Annotated[
        Path | None, typer.Option(help="write the tidy head_stats table (.csv or .parquet)")
    ] = None,
) -> None:
    """Capture per-head attention statistics of every head for a few prompts."""
    import torch

    from headlab.inputs import prepare
    from headlab.loading import load
    from headlab.probe import capture

    if out is not None:
        check_table_path(out, "--out")
    lm = load(model)
    inputs = prepare(lm, prompt, image or [])
    with torch.no_grad(), capture(lm) as rec:
        lm.model(**inputs)
    frame = rec.head_stats
    console.print(summary_table(frame, f"per-head statistics of {lm.model_type}, {len(prompt)} example(s)"))
    if out is not None:
        write_table(frame, out)


_DEMO_PROMPTS = {
    "lm": [
        "When Mary and John went to the store, John gave a drink to",
        "w3 w41 w7 w12 w60 w3 w41 w7",
    ],
    "llava": ["Is there an apple in the image?", "Is there a car in the image?"],
}


def demo(
    out: Annotated[Path, typer.Option(help="where to write the demo outputs")] = Path("out/demo"),
) -> None:
    """The offline end-to-end path: the zoo's LM and LLaVA -> fused capture of every head -> store -> tables."""
    import numpy as np

    from headlab.datasets import scenes
    from headlab.datasets.prompts import read_prompts
    from headlab.loading import Family, load
    from headlab.runs.batch import capture_to_store
    from headlab.store import Store

    out.mkdir(parents=True, exist_ok=True)
    for name, prompts in _DEMO_PROMPTS.items():
        lm = load(f"zoo:{name}")
        lines = []
        for i, (prompt, scene) in enumerate(zip(prompts, scenes.make_scenes(len(prompts)), strict=True)):
            line = {"id": i, "prompt": prompt}
            if lm.family is Family.LVLM:
                line["prompt"] = lm.adapter.prompt(prompt)
                scenes.render(scene).save(out / scene.filename)
                line["image"] = scene.filename
            lines.append(json.dumps(line))
        data = out / f"{name}_prompts.jsonl"
        data.write_text("\n".join(lines) + "\n")
        store = Store.create(out / f"{name}_store", lm, exist_ok=True)
        items = read_prompts(data, need_images=lm.family is Family.LVLM).items
        report = capture_to_store(lm, store, items, batch_size=2, attention_layers=None, progress=False)
        frame = store.head_stats()
        console.print(
            summary_table(frame, f"{name}: per-head statistics of every head, read back from the store")
        )
        pattern = store.pattern(0, layer=lm.n_layers - 1, head=0, queries=[-1])[0]
        console.print(
            f"{name}: last-token attention of layer {lm.n_layers - 1} head 0 rebuilt exactly from the "
            f"store: top keys {np.argsort(-pattern)[:5].tolist()}, row sum {pattern.sum():.4f}; "
            f"{report.done} captured, {report.skipped} already there; verify: "
            f"{'OK' if store.verify().ok else 'PROBLEMS'}"
        )
        write_table(frame, out / f"{name}_head_stats.csv")
    console.print(f"[bold]demo done[/]: the zoo's LM and LLaVA captured into stores under {out.resolve()}")
