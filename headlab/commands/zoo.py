"""`headlab zoo random | list | train`: tiny random models of real architectures, and the trained zoo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from headlab.commands.console import check_creatable, console


def random(
    name: Annotated[
        str,
        typer.Argument(
            help="a causal-LM model type of transformers (gpt_neox, phi3, qwen3, ...; see README 'Coverage "
            "matrix'), or one of the hand-written builders: gpt2, llama, mistral, qwen2, gemma2, llava, vit, "
            "deit, dinov2, clip_vision"
        ),
    ],
    out: Annotated[Path, typer.Argument(help="directory to write the model into (created if missing)")],
    seed: Annotated[int, typer.Option(min=0, help="seed of the random weights")] = 0,
) -> None:
    """Build a tiny random-weight model of a real architecture (with tokenizer/processor) for offline use:
    2 layers, width 32-64, 4 heads, a 300-token BPE vocabulary, saved with save_pretrained."""
    from headlab.zoo.random_models import build_random

    check_creatable(out, "OUT")
    path = build_random(name, out, seed=seed)
    console.print(f"wrote a tiny random {name} to {path}")


def listing() -> None:
    """The trained zoo models, whether their weights are present, and their shipped evaluation."""
    from headlab.zoo.registry import WEIGHTS, ZOO, card

    for name, model in ZOO.items():
        info = card(name)
        built = "shipped" if info else "not built"
        console.print(f"[bold]{name}[/bold] ({model.family}, {built}): {model.description}")
        if info:
            training = info["training"]
            console.print(
                f"    {training['steps']} steps, {training['seconds']:.0f} s, final loss {training['final_loss']:.3f}"
                f"; load with hl.load('zoo:{name}'); files in {WEIGHTS / name}"
            )


def train(
    name: Annotated[
        str, typer.Argument(help="zoo model, e.g. lm, lm-long, llava, llava-cca or vit (`headlab zoo list`)")
    ],
    out: Annotated[
        Path | None, typer.Option(help="directory to write into (default: the shipped location)")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="default: the shipped weights' seed")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps (default: the recipe's)")] = None,
) -> None:
    """Reproduce a zoo model from its recipe (deterministic seeds), evaluate it and write its zoo.json."""
    from tqdm import tqdm

    from headlab.zoo.recipes import train as train_recipe
    from headlab.zoo.registry import entry

    entry(name)
    if out is not None:
        check_creatable(out, "--out")
    bar = tqdm(total=None, desc=f"training {name}", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        path = train_recipe(name, out, seed=seed, steps=steps, progress=progress)
    finally:
        bar.close()
    console.print(json.dumps(json.loads((path / "zoo.json").read_text())["evaluation"], indent=1))
    console.print(f"wrote the zoo model {name} to {path}")
