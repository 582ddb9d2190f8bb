"""Model families: what headlab must be told about each architecture, one small declarative file per family.

`adapter_for(config_or_model)` is the one lookup: a registered adapter, else `DEFAULT` (any causal LM whose
attention routes through transformers' AttentionInterface needs nothing declared: the loader reads the rest
from the model with `discovery`). A family file (e.g. `gemma2.py`) declares a `ModelAdapter` in a function
decorated with `@register`; a family no adapter can make servable is declared refused with its
reason (`refuse`, e.g. `swin.py`). `matrix` lists the tested model types and prints the README's coverage
table; `SUPPORTED` is a read-only view (tested model type -> adapter). Importing this package imports neither
torch nor any modeling code: adapters name transformers classes, which the loader resolves.
"""

from __future__ import annotations

# every family file, imported so that its adapter registers
from headlab.models import (  # noqa: F401
    beit,
    blip2,
    clip,
    dinov2,
    gemma2,
    gemma3,
    idefics3,
    llava,
    llava_next,
    mllama,
    qwen2_vl,
    siglip,
    swin,
    vit,
)
from headlab.models.adapter import Family, ModelAdapter
from headlab.models.registry import DEFAULT, DEFAULT_LVLM, SUPPORTED, adapter_for, adapters, register

__all__ = [
    "DEFAULT",
    "DEFAULT_LVLM",
    "SUPPORTED",
    "Family",
    "ModelAdapter",
    "adapter_for",
    "adapters",
    "register",
]
