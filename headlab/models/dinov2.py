"""DINOv2 (`Dinov2Model`) and DINOv2 with registers (`Dinov2WithRegistersModel`): one CLS token before the
patch grid, no classification head; with registers, `config.num_register_tokens` register tokens between
the CLS token and the grid (role "register")."""

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


@register
def dinov2_with_registers() -> ModelAdapter:
    return ModelAdapter(
        model_types=("dinov2_with_registers",),
        family=Family.VIT,
        auto_class="AutoModel",
        prefix_tokens=1,  # CLS; the registers after it are counted by the config
        register_tokens_attr="num_register_tokens",
        random_builders=("dinov2_with_registers",),
    )
