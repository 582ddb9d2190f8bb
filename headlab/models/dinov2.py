"""DINOv2 (`Dinov2Model`, without registers): one CLS token before the patch grid, no classification head."""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


@register
def dinov2() -> ModelAdapter:
    return ModelAdapter(
        model_types=("dinov2",),
        family=Family.VIT,
        auto_class="AutoModel",
        prefix_tokens=1,
        random_builders=("dinov2",),
    )
