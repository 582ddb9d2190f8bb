"""`headlab info`, `headlab check`, `headlab stats` and `headlab demo`: look at a model, check that headlab
serves it, and capture its heads directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headlab.commands.console import check_table_path, console, write_table
from headlab.errors import HeadlabError, InputError, UnsupportedModelError


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
    for t in lm.towers:
        if t.sliding or t.softcap is not None:
            windows = ", ".join("full" if w is None else str(w) for w in t.windows)
            console.print(f"{t.name}: sliding windows per layer {windows}; soft-cap {t.softcap or '-'}")
    console.print(f"image tokens: {lm.image_tokens}")


CHECK_PROMPT = "Is there a cat in the image?"
# the largest pattern difference from eager, and relative logit change, accepted per dtype
_TOLERANCE = {"float32": 1e-4, "float64": 1e-6, "float16": 2e-3, "bfloat16": 1e-2}
EXIT_CODES = (
    "Exit codes: 0 headlab serves the model (patterns equal eager attention, logits unchanged); 1 it loaded "
    "but headlab's capture differs; 2 it cannot be served (refused, not loadable, or no inputs can be built)."
)


def _check_inputs(lm) -> dict:
    """A short batch of one for `lm`: its tokenizer on CHECK_PROMPT (token ids 1..8 without one), a blank
    image for vision models, the family's prompt template around a blank image for LVLMs."""
    import torch
    from PIL import Image

    from headlab.inputs import prepare
    from headlab.loading import Family

    if lm.family is Family.LLM and lm.processor is None:
        return {"input_ids": torch.arange(1, 9)[None]}
    if lm.family is Family.LLM:
        return prepare(lm, [CHECK_PROMPT])
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    try:
        prompt = "" if lm.family is Family.VIT else _check_prompt(lm)
        return prepare(lm, [prompt], [blank])
    except HeadlabError as err:
        raise UnsupportedModelError(f"cannot build inputs for {lm.model_type}: {err}") from None


def _check_prompt(lm) -> str:
    """CHECK_PROMPT in the LVLM's prompt template or chat template, else after its image placeholder."""
    from headlab.inputs import image_placeholder, question_prompt

    try:
        return question_prompt(lm, CHECK_PROMPT)
    except InputError:
        if image_placeholder(lm) is None:
            raise
        return f"{image_placeholder(lm)}{CHECK_PROMPT}"


def _eager_patterns(lm, inputs) -> tuple:
    """Every main-tower layer's [batch, head, q, k] pattern from transformers' eager attention."""
    import torch

    from headlab.loading import language_model_output

    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return language_model_output(lm.model(**inputs, output_attentions=True)).attentions
    finally:
        lm.model.set_attn_implementation(before)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _compare(lm, inputs) -> dict:
    """Capture every pattern of the main tower and compare it with eager attention, and the logits during
    capture with the model's own: the numbers `headlab check` prints."""
    import torch

    from headlab.probe import Select, capture

    tower = lm.main
    with torch.no_grad():
        plain = _logits(lm.model(**inputs))
        with capture(lm, stats=None, patterns=Select(tower=tower.name)) as rec:
            during = _logits(lm.model(**inputs))
    eager = _eager_patterns(lm, inputs)
    if not eager:
        raise UnsupportedModelError(
            f"{lm.model_type} returns no eager attention weights (output_attentions) to compare with"
        )
    errors = [
        float((rows.probs - eager[rows.layer][rows.example, rows.head][list(rows.queries)]).abs().max())
        for rows in rec.patterns
    ]
    seen = {rows.layer for rows in rec.patterns}
    return {
        "reached": len(seen),
        "layers": tower.n_layers,
        "pattern_error": max(errors) if errors else float("inf"),
        "logit_change": float((during - plain).abs().max() / plain.abs().max().clamp(min=1)),
        "tolerance": _TOLERANCE.get(str(plain.dtype).removeprefix("torch."), 1e-2),
        "eager_layers": len(eager),
    }


def check(model: Annotated[str, typer.Argument(help="local model directory, hub id or zoo:NAME")]) -> None:
    """Check that headlab serves a model: load it, capture every head of the main tower (the language
    model; a ViT's encoder) on one short input and compare the patterns with transformers' eager attention
    and the logits with the model's own."""
    from headlab.loading import load

    try:
        lm = load(model)
        inputs = _check_inputs(lm)
        console.print(f"{lm!r} from {lm.source}", markup=False)
        found = _compare(lm, inputs)
    except UnsupportedModelError as err:
        console.print("route: refused")
        console.print(f"why: {err}", markup=False)
        console.print("verdict: headlab cannot serve this model")
        raise typer.Exit(2) from None
    reached = found["reached"] == found["layers"] == found["eager_layers"]
    same = found["pattern_error"] <= found["tolerance"]
    unchanged = found["logit_change"] <= found["tolerance"]
    console.print(
        f"route: AttentionInterface, {found['reached']} of {found['layers']} {lm.main.name} attention layers "
        "reached headlab's function"
    )
    console.print(f"max |pattern - eager|: {found['pattern_error']:.1e} (tolerance {found['tolerance']:.0e})")
    console.print(
        f"logits unchanged by capture: {'yes' if unchanged else 'no'} ({found['logit_change']:.1e})"
    )
    if not (reached and same and unchanged):
        console.print("verdict: headlab's capture DIFFERS from the model's own attention")
        raise typer.Exit(1)
    console.print("verdict: headlab serves this model")


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
    from headlab.inputs import question_prompt
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
                line["prompt"] = question_prompt(lm, prompt)
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
