"""Fused attention with augmented values: one pass gives the output, the per-row logsumexp and any
statistic that is linear in the attention row.

For a row p_i = softmax_j(s_ij), p_i @ C gives sum_j p_ij C_j for any per-key columns C. headlab appends
such columns to V (role one-hots, key positions, K itself for entropy, one-hots of single keys) and runs
ONE fused attention over [V | C]; the [q, k] pattern never exists in memory (O(n) per row block).

Backends, picked by device:
- CPU: torch's flash kernel for CPU (`aten._scaled_dot_product_flash_attention_for_cpu`), which also returns
  the logsumexp. It needs Q, K and V of one width, so Q and K are zero-padded to V's width (zeros change no
  score; the scale is passed explicitly).
- elsewhere: a query-tiled exact kernel in torch (O(tile * k) memory), until the Triton/FlexAttention
  kernels take over on GPU.

Contract: `attention_with_lse(q, k, v_aug, ...)` == reference softmax(scale QK^T + mask) @ v_aug and its
logsumexp, to float tolerance; tested against `kernels.reference.naive_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headlab.kernels.reference import additive_mask, expand_kv

_QUERY_TILE = 256
_FLASH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pad_width(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _flash_cpu(q, k, v, bias, causal, scale):
    d_v = v.shape[-1]
    width = max(q.shape[-1], d_v)
    width += -width % 8  # the CPU kernel is fastest on widths that are a multiple of its vector size
    q, k, v = _pad_width(q, width), _pad_width(k, width), _pad_width(v, width)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, attn_mask=bias, scale=scale
    )
    return out[..., :d_v], lse


def _tiled(q, k, v, bias, causal, scale):
    n_q, n_k = q.shape[2], k.shape[2]
    if causal:
        bias = additive_mask(None, n_q, n_k, causal=True, dtype=q.dtype, device=q.device)
    outs, lses = [], []
    for start in range(0, n_q, _QUERY_TILE):
        stop = min(n_q, start + _QUERY_TILE)
        scores = torch.matmul(q[:, :, start:stop].float(), k.float().transpose(-1, -2)) * scale
        if bias is not None:
            scores = (
                scores + bias[..., start:stop, :].float() if bias.shape[-2] != 1 else scores + bias.float()
            )
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows that see no key: zeros, as SDPA
        outs.append(torch.matmul(probs, v.float()).to(v.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention returning (out [batch, head, q, d_v], lse [batch, head, q]).

    q [batch, head, q, d]; k [batch, kv_head, k, d]; v [batch, kv_head, k, d_v] (d_v may differ from d).
    `mask`: None, boolean (True = keep) or additive float, broadcastable to [batch, head, q, k].
    `causal`: apply the bottom-right causal mask on top.
    """
    n_heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_kv(k, n_heads), expand_kv(v, n_heads)
    # The fused kernels' own causal flag is top-left aligned; it is only used when that equals bottom-right.
    fused_causal = causal and mask is None and n_q == n_k
    bias = None
    if mask is not None or (causal and not fused_causal):
        bias = additive_mask(mask, n_q, n_k, causal=causal, dtype=q.dtype, device=q.device)
        bias = (
            bias.expand(q.shape[0], n_heads, n_q, n_k)
            if bias.dim() == 4 and bias.shape[1] != n_heads
            else bias
        )
    if q.device.type == "cpu" and q.dtype in _FLASH_CPU_DTYPES:
        return _flash_cpu(q, k, v, bias, fused_causal, scale)
    return _tiled(q, k, v, bias, fused_causal, scale)
