"""Training a zoo model from its recipe: `train(name)` trains, reloads the saved copy with `headlab.load`,
evaluates it and writes its `zoo.json` card.

This sits above the loader (it loads what it trained); the catalogue it trains from (`zoo/registry.py`) sits
below it, so `hl.load("zoo:NAME")` and training do not import each other.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

from headlab.zoo import registry


def train(
    name: str,
    out: str | Path | None = None,
    *,
    seed: int | None = None,
    steps: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Train zoo model `name` from its recipe into `out` (default: the shipped location), evaluate it and
    write its `zoo.json`. seed: default the shipped weights' seed. Returns the directory."""
    import torch
    import transformers as tf

    from headlab.loading import load

    model = registry.entry(name)
    seed = model.seed if seed is None else seed
    out = Path(out) if out is not None else registry.WEIGHTS / name
    summary = model.train(out, seed=seed, steps=steps, progress=progress)
    metrics = model.evaluate(load(out))
    info = {
        "name": name,
        "family": model.family,
        "description": model.description,
        "seed": seed,
        "training": summary,
        "evaluation": metrics,
        **({"cca": True, "usage": "with hl.intervene(lm, hl.CCA()): ..."} if model.cca else {}),
        "built_with": {
            "torch": torch.__version__,
            "transformers": tf.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    (out / "zoo.json").write_text(json.dumps(info, indent=1) + "\n")
    return out
