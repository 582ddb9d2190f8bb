"""CLIP's vision tower (`CLIPVisionModel`): one CLS token before the patch grid, no classification head.

Also the vision tower of LLaVA: an LVLM's vision tower takes its CLS-like prefix from this adapter."""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


@register
def clip_vision() -> ModelAdapter:
    return ModelAdapter(
        model_types=("clip_vision_model",),
        family=Family.VIT,
        auto_class="AutoModel",
        prefix_tokens=1,
        random_builders=("clip_vision",),
    )
