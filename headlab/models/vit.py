"""ViT and DeiT image classifiers: a bidirectional encoder over CLS-like tokens and a patch grid.

The grid is read from the config (`image_size // patch_size`); what precedes it is declared: ViT's CLS
token, DeiT's CLS and distillation tokens."""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


@register
def vit() -> ModelAdapter:
    return ModelAdapter(
        model_types=("vit",),
        family=Family.VIT,
        auto_class="AutoModelForImageClassification",
        prefix_tokens=1,
        random_builders=("vit",),
    )


@register
def deit() -> ModelAdapter:
    return ModelAdapter(
        model_types=("deit",),
        family=Family.VIT,
        auto_class="AutoModelForImageClassification",
        prefix_tokens=2,  # CLS, then the distillation token
        random_builders=("deit",),
    )
