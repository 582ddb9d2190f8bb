"""Attention compute: one dispatcher (`fused_attention`) over the Triton kernel, FlexAttention, SDPA with
augmented values and exact torch tiles, and the naive reference (the oracle) they are all tested against."""

from headlab.kernels.augmented import attention_with_lse
from headlab.kernels.fused import BACKENDS, fused_attention, pick_backend
from headlab.kernels.reference import (
    ReferenceAttention,
    additive_mask,
    boost_scores,
    causal_keep,
    expand_kv,
    naive_attention,
)
from headlab.kernels.spec import Attended, Distance, FusedSpec, ScoreBoost

__all__ = [
    "BACKENDS",
    "Attended",
    "Distance",
    "FusedSpec",
    "ReferenceAttention",
    "ScoreBoost",
    "additive_mask",
    "attention_with_lse",
    "boost_scores",
    "causal_keep",
    "expand_kv",
    "fused_attention",
    "naive_attention",
    "pick_backend",
]
