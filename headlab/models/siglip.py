"""SigLIP's vision tower (`SiglipVisionModel`): the patch grid alone, no CLS token (its pooled output comes
from an attention-pooling head after the encoder, outside the tower's attention)."""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


@register
def siglip_vision() -> ModelAdapter:
    return ModelAdapter(
        model_types=("siglip_vision_model",),
        family=Family.VIT,
        auto_class="AutoModel",
        prefix_tokens=0,
        random_builders=("siglip_vision",),
    )
