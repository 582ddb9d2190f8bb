"""The seam: headlab's attention function, registered with transformers' AttentionInterface.

`switched_to_headlab(model)` switches every config of the model to the "headlab" implementation and back
on exit (also when an exception escapes); nothing is patched at import. Masks are built as for SDPA. The
function hands each call to the attention session tagged on the module (`module._headlab_session`, see
headlab.probe.session), which runs the open capture and intervene blocks' handlers; a module without one
falls back to plain SDPA, unchanged (soft-capped attention, which SDPA cannot express: headlab's fused
attention).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from headlab.kernels.fused import fused_attention
from headlab.kernels.spec import FusedSpec
from headlab.probe.call import is_causal_call, keep_mask

ATTENTION_NAME = "headlab"


def headlab_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface signature: q [batch, head, q, d], k/v [batch, kv_head, k, d] -> ([batch, q, head, d], None)."""
    session = getattr(module, "_headlab_session", None)
    attend = plain_attention if session is None else session.attend
    return attend(
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=scaling,
        is_causal=is_causal,
        dropout=dropout,
        **kwargs,
    )


def plain_attention(
    module, query, key, value, attention_mask, *, scaling=None, is_causal=None, dropout=0.0, **kwargs
):
    """The model's attention, unobserved: transformers' SDPA function, or, for soft-capped scores (which
    SDPA cannot express), headlab's fused attention."""
    softcap = kwargs.get("softcap")
    if softcap is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    keep = keep_mask(attention_mask)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    spec = FusedSpec(
        scale=scale,
        causal=is_causal_call(is_causal, module, keep, query.shape[2]),
        mask=keep,
        softcap=softcap,
    )
    out = fused_attention(query, key, value, spec).out
    return out.to(value.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the "headlab" attention and mask functions (idempotent)."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, headlab_attention)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    seen: dict[int, PretrainedConfig] = {}
    stack = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        stack += [
            c
            for key in getattr(config, "sub_configs", {})
            if isinstance(c := getattr(config, key, None), PretrainedConfig)
        ]
    return list(seen.values())


@contextmanager
def switched_to_headlab(model: nn.Module) -> Iterator[None]:
    """Route every attention layer of `model` through headlab_attention inside the block."""
    register()
    configs = _configs(model)
    before = [c._attn_implementation_internal for c in configs]
    try:
        for c in configs:
            c._attn_implementation_internal = ATTENTION_NAME
        yield
    finally:
        for c, impl in zip(configs, before, strict=True):
            c._attn_implementation_internal = impl
