"""Fused attention with augmented values against the naive reference."""

from __future__ import annotations

import pytest
import torch

from headlab.kernels import attention_with_lse, naive_attention
from headlab.kernels import augmented as aug_mod
from headlab.kernels.rebuild import attention_scores, rebuild_rows, rows_from_lse

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}

CASES = [
    # batch, heads, kv_heads, n_q, n_k, d, d_v, causal, ragged padding
    (2, 4, 4, 9, 9, 16, 16, True, False),
    (2, 4, 2, 9, 9, 16, 43, True, True),  # GQA, wider values, left padding
    (1, 6, 3, 1, 12, 8, 20, True, True),  # a decode step with a KV cache
    (3, 2, 2, 7, 7, 8, 11, False, True),  # bidirectional with padding
    (1, 2, 1, 5, 13, 8, 8, True, False),  # chunked prefill: queries are the last 5 keys
]


def _live_rows(mask, n_q, n_k, causal, batch):
    """[batch, 1, q, 1] rows that can see at least one key (fully masked rows are undefined)."""
    from headlab.kernels.reference import causal_keep

    keep = torch.ones(batch, 1, n_q, n_k, dtype=torch.bool) if mask is None else mask.clone()
    if causal:
        keep &= causal_keep(n_q, n_k)
    return keep.any(-1, keepdim=True)


def _mask(batch, n_q, n_k, ragged):
    if not ragged:
        return None
    keep = torch.ones(batch, 1, n_q, n_k, dtype=torch.bool)
    for b in range(batch):
        keep[b, ..., : 2 * b] = False  # example b has 2b left pads
    return keep


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(case, dtype):
    batch, heads, kv, n_q, n_k, d, d_v, causal, ragged = case
    q = torch.randn(batch, heads, n_q, d, dtype=dtype)
    k = torch.randn(batch, kv, n_k, d, dtype=dtype)
    v = torch.randn(batch, kv, n_k, d_v, dtype=dtype)
    mask = _mask(batch, n_q, n_k, ragged)
    ref = naive_attention(q, k, v, mask=mask, scale=0.3, causal=causal)
    out, lse = attention_with_lse(q, k, v, mask=mask, scale=0.3, causal=causal)
    assert out.shape == ref.out.shape and lse.shape == ref.lse.shape
    live = _live_rows(mask, n_q, n_k, causal, batch)
    torch.testing.assert_close((out.float() * live), ref.out * live, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(
        lse.float()[live[..., 0].expand_as(lse)],
        ref.lse[live[..., 0].expand_as(lse)],
        atol=TOL[dtype] * 4,
        rtol=TOL[dtype],
    )


@pytest.mark.parametrize("case", CASES)
def test_tiled_path_matches_reference(case, monkeypatch):
    batch, heads, kv, n_q, n_k, d, d_v, causal, ragged = case
    monkeypatch.setattr(aug_mod, "_QUERY_TILE", 4)  # several tiles even at these sizes
    q, k, v = (
        torch.randn(batch, heads, n_q, d),
        torch.randn(batch, kv, n_k, d),
        torch.randn(batch, kv, n_k, d_v),
    )
    mask = _mask(batch, n_q, n_k, ragged)
    ref = naive_attention(q, k, v, mask=mask, scale=0.3, causal=causal)
    from headlab.kernels.reference import additive_mask, expand_kv

    fused_causal = causal and mask is None and n_q == n_k
    bias = (
        None
        if fused_causal or (mask is None and not causal)
        else additive_mask(mask, n_q, n_k, causal=causal, dtype=torch.float32, device=q.device)
    )
    out, lse = aug_mod._tiled(q, expand_kv(k, heads), expand_kv(v, heads), bias, fused_causal, 0.3)
    live = _live_rows(mask, n_q, n_k, causal, batch)
    torch.testing.assert_close(out * live, ref.out * live, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(
        lse[live[..., 0].expand_as(lse)], ref.lse[live[..., 0].expand_as(lse)], atol=2e-5, rtol=2e-5
    )


def test_reference_rows_are_distributions():
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    ref = naive_attention(q, k, v, causal=True)
    torch.testing.assert_close(ref.probs.sum(-1), torch.ones(1, 2, 6))
    assert (ref.probs.triu(1) == 0).all()


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_rows_from_lse_rebuild_the_oracle_pattern(softcap):
    """The one rebuild primitive: exp(scores + bias - lse) under the mask equals the naive softmax rows,
    with a soft-cap and with an additive (non-boolean) bias such as a relative position bias."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    bias = torch.randn(2, 1, 5, 5, generator=g)
    ref = naive_attention(q, k, v, mask=bias, scale=0.3, softcap=softcap)
    scores = attention_scores(q, k, scale=0.3, softcap=softcap)
    torch.testing.assert_close(rows_from_lse(scores, ref.lse, bias=bias), ref.probs, rtol=1e-5, atol=1e-6)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    ref = naive_attention(q, k, v, scale=0.3, causal=True, softcap=softcap)
    torch.testing.assert_close(rows_from_lse(scores, ref.lse, keep=causal), ref.probs, rtol=1e-5, atol=1e-6)
    rows = rebuild_rows(
        q[0, 1],
        k[0, 1],
        ref.lse[0, 1],
        scale=0.3,
        query_positions=torch.arange(5),
        causal=True,
        softcap=softcap,
    )
    torch.testing.assert_close(rows, ref.probs[0, 1], rtol=1e-5, atol=1e-6)
