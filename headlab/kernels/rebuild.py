"""Rebuilding exact attention rows from compact attention: post-RoPE q and k plus the row logsumexp.

A stored head's pattern is never kept dense: rows = exp(scale * q k^T (+ soft-cap) - lse) under the mask
the model used (causal and/or a sliding window; padding is already gone because only real tokens are
stored). This is exact: it is the same softmax, normalised by the same logsumexp the fused kernel returned.

Shapes: q [q, d_head], k [k, d_head], lse [q]; query_positions [q] are the queries' positions among the k
keys (example coordinates).
"""

from __future__ import annotations

import torch


def rebuild_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    query_positions: torch.Tensor,
    causal: bool,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention rows [q, k] of one head, exactly as the model computed them."""
    scores = (q.float() @ k.float().T) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keys = torch.arange(k.shape[0])[None, :]
    queries = query_positions.long()[:, None]
    keep = torch.ones_like(scores, dtype=torch.bool)
    if causal:
        keep &= keys <= queries
    if window is not None:
        keep &= (queries - keys).abs() < window
    probs = torch.exp(scores - lse.float()[:, None])
    return torch.where(keep, probs, 0.0)
