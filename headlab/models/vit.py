"""ViT-style encoders: ViT and DeiT image classifiers, ViT-MSN and I-JEPA backbones; a bidirectional
encoder over CLS-like tokens and a patch grid.

The grid is read from the config (`image_size // patch_size`); what precedes it is declared: ViT's and
ViT-MSN's CLS token, DeiT's CLS and distillation tokens, none for I-JEPA."""

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


@register
def vit_msn() -> ModelAdapter:
    # ViT pre-trained with Masked Siamese Networks: ViT's encoder and CLS token, no head
    return ModelAdapter(
        model_types=("vit_msn",),
        family=Family.VIT,
        auto_class="AutoModel",
        prefix_tokens=1,
        random_builders=("vit_msn",),
    )


@register
def ijepa() -> ModelAdapter:
    # I-JEPA's context encoder: ViT's encoder over the patch grid alone (no CLS token)
    return ModelAdapter(
        model_types=("ijepa",),
        family=Family.VIT,
        auto_class="AutoModel",
        prefix_tokens=0,
        random_builders=("ijepa",),
    )
