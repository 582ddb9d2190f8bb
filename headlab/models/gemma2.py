"""Gemma 2: attention soft-capping, which SDPA cannot express.

Everything else (alternating sliding-window and full layers, the soft-cap value, the scale from
`query_pre_attn_scalar`) is read from the module tree and the config."""

from __future__ import annotations

from headlab.models.registry import ModelAdapter, register


@register
def gemma2() -> ModelAdapter:
    # soft-capped scores are not expressible in SDPA: transformers runs Gemma 2 eagerly; headlab's own
    # attention (inside capture / intervene) soft-caps in its fused kernels
    return ModelAdapter(model_types=("gemma2",), attention="eager", random_builders=("gemma2",))
