"""Attention compute: the naive reference (the oracle) and fused attention with augmented values."""

from headlab.kernels.augmented import attention_with_lse
from headlab.kernels.reference import (
    ReferenceAttention,
    additive_mask,
    causal_keep,
    expand_kv,
    naive_attention,
)

__all__ = [
    "ReferenceAttention",
    "additive_mask",
    "attention_with_lse",
    "causal_keep",
    "expand_kv",
    "naive_attention",
]
