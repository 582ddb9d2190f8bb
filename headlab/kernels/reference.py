"""The reference attention: softmax(scale * Q K^T + mask) V with the full [q, k] pattern in memory.

This is the oracle every fast path in headlab is tested against. It is also the engine of the explicit-
pattern backends (TransformerLens, nnsight), which hand headlab full patterns.

Shapes: q [batch, head, q, d_head]; k, v [batch, kv_head, k, d_head] with head a multiple of kv_head (GQA:
query head h reads kv head h // (head / kv_head)). Masks are boolean (True = may attend) or additive
floats, broadcastable to [batch, head, q, k]. Causal masks align the q queries with the LAST q keys
(bottom-right), which is what a decode step with a KV cache needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.errors import InputError
from headlab.kernels.rebuild import attention_scores


def boost_scores(scores: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """PAI's boost (PAINT) on explicit scores [batch, head, q, k]: s + coef |s| on the rows `rows` [batch|1,
    q] (bool; None = all), coef [batch|1, head|1, k]. The one torch-side definition of the boost; flex's
    score_mod writes the same formula per element."""
    add = coef.to(scores.device, torch.float32)[:, :, None, :] * scores.abs()
    if rows is not None:
        add = torch.where(rows.to(scores.device)[:, None, :, None], add, 0.0)
    return scores + add


@dataclass(frozen=True)
class ReferenceAttention:
    out: torch.Tensor  # [batch, head, q, d_v]
    probs: torch.Tensor  # [batch, head, q, k]
    lse: torch.Tensor  # [batch, head, q]: logsumexp of the masked scores


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, kv_head, k, d] -> [batch, head, k, d] by repeating each kv head for its query group."""
    n_kv = x.shape[1]
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise InputError(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly")
    return x.repeat_interleave(n_heads // n_kv, dim=1)


def causal_keep(n_q: int, n_k: int, device: torch.device | None = None) -> torch.Tensor:
    """[q, k] boolean: query i (at key position n_k - n_q + i) may see keys j <= its position."""
    q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    return torch.arange(n_k, device=device)[None, :] <= q_pos


def additive_mask(
    mask: torch.Tensor | None, n_q: int, n_k: int, *, causal: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Combine an HF-style mask with causality into one additive float mask (0 = keep, -inf = drop).

    A query row that can see no key gets an all -inf row; the kernels return zeros there, as torch SDPA does.
    """
    neg = float("-inf")
    out = None
    if mask is not None:
        out = torch.where(mask, 0.0, neg).to(dtype) if mask.dtype == torch.bool else mask.to(dtype)
        out = out[..., -n_q:, :] if out.shape[-2] != n_q and out.shape[-2] != 1 else out
    if causal:
        keep = causal_keep(n_q, n_k, device)
        causal_add = torch.where(keep, 0.0, neg).to(dtype)
        out = causal_add if out is None else out + causal_add
    return out


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    softcap: float | None = None,
    boost=None,
) -> ReferenceAttention:
    """Eager attention in float32 with the full pattern: the oracle. `boost` (`spec.ScoreBoost`) is applied
    to the scores before the mask (PAINT)."""
    n_heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = expand_kv(k, n_heads).float(), expand_kv(v, n_heads).float()
    scores = attention_scores(q, k, scale=scale, softcap=softcap)  # [batch, head, q, k]
    if boost is not None:
        scores = boost_scores(scores, boost.coef, boost.rows)
    bias = additive_mask(mask, n_q, n_k, causal=causal, dtype=torch.float32, device=q.device)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows that see no key: zeros, as SDPA
    return ReferenceAttention(out=torch.matmul(probs, v), probs=probs, lse=lse)
