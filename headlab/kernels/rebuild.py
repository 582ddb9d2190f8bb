"""Exact attention rows from the logsumexp: the one torch-side place where scores are formed and rows rebuilt.

Every consumer that needs explicit attention probabilities without a dense softmax over [q, k] (the
probe's selected rows and alpha keys, the store's compact attention, the interventions' grouped edits,
ACT's received attention, the explicit kernel backends) goes through the two functions here:

- `attention_scores(q, k, scale=, softcap=)`: s = scale * q . k (fp32), then the soft-cap c * tanh(s / c)
  (Gemma 2). A new score feature on the torch side (it must also go into the Triton kernel and the Flex
  score_mod) is added here once.
- `rows_from_lse(scores, lse, keep=, bias=)`: A = exp(s + bias - lse), 0 where `keep` is False. Exact: it is
  the same softmax, normalised by the logsumexp the fused kernel returned for the same row.

`rebuild_rows` applies both to one stored head (compact attention: post-RoPE q and k plus the row lse),
with the mask the model used (causal and/or a sliding window; padding is already gone because only real
tokens are stored).

Shapes: q [..., q, d_head], k [..., k, d_head], lse [..., q]; keep / bias broadcast to [..., q, k].
"""

from __future__ import annotations

import torch


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """Scores [..., q, k] in float32 as the model forms them: scale * q k^T, then the soft-cap if any."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return scores


def rows_from_lse(
    scores: torch.Tensor,
    lse: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities exp(scores + bias - lse) [..., q, k]; 0 where `keep` is False."""
    if bias is not None:
        scores = scores + bias
    probs = torch.exp(scores - lse.float()[..., None])
    return probs if keep is None else torch.where(keep, probs, 0.0)


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
    """Attention rows [q, k] of one stored head, exactly as the model computed them.

    q [q, d_head], k [k, d_head], lse [q]; query_positions [q]: the queries' positions among the k keys."""
    keys = torch.arange(k.shape[0])[None, :]
    queries = query_positions.long()[:, None]
    keep = torch.ones(len(queries), k.shape[0], dtype=torch.bool)
    if causal:
        keep &= keys <= queries
    if window is not None:
        keep &= (queries - keys).abs() < window
    return rows_from_lse(attention_scores(q, k, scale=scale, softcap=softcap), lse, keep=keep)
