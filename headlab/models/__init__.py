"""Model families: what headlab must be told about each architecture, one small declarative file per family.

`adapter_for(config_or_model)` is the one lookup; `SUPPORTED` is a read-only view (model type -> adapter).
A family file (e.g. `gemma2.py`) declares a `ModelAdapter` in a function decorated with `@register`;
families with nothing special have no file (`DEFAULT`). Importing this package imports neither torch nor
any modeling code: adapters name transformers classes, which the loader resolves.
"""

from __future__ import annotations

# every family file, imported so that its adapter registers
from headlab.models import clip, dinov2, gemma2, llava, vit  # noqa: F401
from headlab.models.adapter import Family, ModelAdapter
from headlab.models.registry import DEFAULT, SUPPORTED, adapter_for, adapters, register

__all__ = ["DEFAULT", "SUPPORTED", "Family", "ModelAdapter", "adapter_for", "adapters", "register"]
