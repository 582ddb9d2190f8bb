"""The FlexAttention backend of `kernels.fused`: `flex_fused(q, k, v, spec)` computes a `FusedSpec` with
torch's `flex_attention` and returns the same `Attended` as the oracle `fused.explicit_fused`.

How each part of the spec maps onto flex:
- masks (bottom-right causal with PINE segments, sliding window, key_valid, the dense boolean `mask`) are
  one `mask_mod`, turned into a BlockMask by `create_block_mask` so fully masked blocks are skipped; the
  semantics are exactly those of `fused.keep_rows`.
- soft-cap (c * tanh(s / c)) and the dense additive `bias` (added after the soft-cap) are a `score_mod`;
  so is PAINT's score boost (s + coef_j |s| on the boosted rows, after the bias, `spec.ScoreBoost`).
- GQA is flex's `enable_gqa=True` (per-head key classes need per-query-head values, so then k and v are
  expanded); the scale is passed explicitly; the logsumexp comes from `return_aux=AuxRequest(lse=True)`
  (torch 2.13 returns it in natural log; the deprecated `return_lse=True` is not used).
- statistics linear in the attention row are extra value columns of the same call, as in
  `fused.augmented_fused`: [V | K | class one-hots | class-masked V | distance columns], padded with zero
  columns to a power of two >= 16 (what the compiled kernels want) and sliced off again.
- statistics that are NOT linear in the row are exact "mass passes": for a weight g_ij >= 0, a second flex
  call with score s_ij + log g_ij has logsumexp lse2_i = lse_i + log sum_j p_ij g_ij, so the statistic is
  exp(lse2_i - lse_i), a sum of non-negative terms without cancellation. Entropy under a soft-cap or a bias
  uses g = lse_i - s_ij (then sum_j p g = H exactly; the cheaper H = lse - scale q.(A K) of plain scores
  rides along as K value columns instead); the first moment of a 2-D (or n-D) distance uses g = w_j f_ij
  (split into w+ and w- passes when key weights can be negative). Every spec is therefore supported.
- rows that see no key give zeros, lse -inf, entropy 0 and zero statistics, as the oracle does.

Precision and devices: with statistics the flex call runs in float32 (the augmented columns hold squared
positions); without, in the inputs' dtype. `Attended.out` is float32 either way, like the other torch
backends. On CUDA `flex_attention` is compiled once (module-level cached `torch.compile`); elsewhere it runs
eagerly, which materialises the scores (fine for tests and small inputs): compiled flex on the CPU in torch
2.13 refuses to return the logsumexp. The BlockMask is built by `create_block_mask`, compiled on CUDA
(block by block) and eager elsewhere (it then evaluates the mask_mod densely: [batch|1, head|1, q, k]
booleans, once per call).
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from headlab.kernels.columns import augmented_values, decode_columns, plain_scores, positions
from headlab.kernels.spec import Attended, FusedSpec, check_shapes

_NEG_INF = float("-inf")
_MIN_VALUE_WIDTH = 16


def flex_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: FusedSpec) -> Attended:
    """Attention of q [batch, head, q, d] over k, v [batch, kv_head, k, d(_v)] as `spec` says, via flex."""
    check_shapes(q, k, v)
    n_q, n_k, d_v = q.shape[2], k.shape[2], v.shape[-1]
    block_mask = _block_mask(spec, q.shape[0], q.shape[1], n_q, n_k, q.device)
    score_mod = _score_mod(spec, *q.shape[:3], n_k, q.device)
    wants_stats = spec.entropy or spec.n_classes > 0 or spec.distance is not None
    dtype = torch.float32 if wants_stats else q.dtype
    kk, v_aug, gqa = augmented_values(q, k, v, spec, dtype)
    aug, lse = _flex(q.to(dtype), kk, v_aug, score_mod, block_mask, spec.scale, gqa)
    seen = torch.isfinite(lse)
    aug = torch.where(seen[..., None], aug.float(), 0.0)
    out, class_mass, class_out, entropy, distance = decode_columns(aug, lse, q, spec, d_v)
    if spec.entropy and not (plain_scores(spec) and spec.boost is None):
        entropy = _mass(q, kk, spec, block_mask, score_mod, lse, gqa, _entropy_weight(lse))
    if spec.distance is not None and spec.distance.dims != 1:
        first = _radial_moment(q, kk, spec, block_mask, score_mod, lse, gqa)
        distance = torch.stack([first, distance[..., 1]], -1)
    out = spec.scale_output(out)
    return Attended(out, lse.float(), class_mass, class_out, entropy, distance)


# ----------------------------------------------------------------------------------------------- flex call


@functools.cache
def _compiled_flex() -> Callable:
    return torch.compile(flex_attention)


def _flex(q, k, v, score_mod, block_mask, scale, gqa) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, h, q, d_v], natural-log lse [b, h, q]) of one flex call; v padded to a width flex takes."""
    d_v = v.shape[-1]
    width = max(_MIN_VALUE_WIDTH, 1 << (d_v - 1).bit_length())
    if width != d_v:
        v = F.pad(v, (0, width - d_v))
    run = _compiled_flex() if q.device.type == "cuda" else flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out, aux = run(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=gqa,
            return_aux=AuxRequest(lse=True),
        )
    return out[..., :d_v], aux.lse


# ------------------------------------------------------------------------------------------ masks, scores


def _block_mask(spec: FusedSpec, b: int, h: int, n_q: int, n_k: int, device) -> BlockMask | None:
    """The BlockMask of every mask in `spec` (None when nothing is masked); same semantics as keep_rows."""
    dense = None
    if spec.mask is not None:
        m = spec.mask.to(device)
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        dense = (m if m.shape[2] == 1 else m[..., -n_q:, :]).expand(b, h, n_q, n_k)
    per_batch = spec.key_valid is not None or (spec.causal and spec.segments is not None)
    per_batch = per_batch or (spec.mask is not None and spec.mask.dim() == 4 and spec.mask.shape[0] > 1)
    per_head = spec.mask is not None and spec.mask.dim() >= 3 and spec.mask.shape[-3] > 1
    mask_mod = _mask_mod(spec, dense, n_q, n_k, device)
    if mask_mod is None:
        return None
    compiled = torch.device(device).type == "cuda"  # compiled: no dense [q, k] evaluation of the mask_mod
    return create_block_mask(
        mask_mod,
        b if per_batch else None,
        h if per_head else None,
        n_q,
        n_k,
        device=device,
        _compile=compiled,
    )


def _mask_mod(spec: FusedSpec, dense, n_q: int, n_k: int, device) -> Callable | None:
    """mask_mod(b, h, q_idx, kv_idx) -> keep, or None when `spec` masks nothing."""
    offset, window = n_k - n_q, spec.window
    if not (spec.causal or window is not None or spec.key_valid is not None or dense is not None):
        return None
    valid = None if spec.key_valid is None else spec.key_valid.to(device).bool()
    segs = None
    if spec.causal and spec.segments is not None:
        segs = tuple(s.to(device) for s in spec.segments)

    def mask_mod(b, h, q_idx, kv_idx):
        q_at = q_idx + offset
        clauses = []
        if spec.causal:
            see = kv_idx <= q_at
            if segs is not None:
                qs, ks = segs[0][b, q_idx], segs[1][b, kv_idx]
                see = see | ((qs > 0) & (ks > 0) & (qs != ks))
            clauses.append(see)
        if window is not None:
            clauses.append((q_at - kv_idx).abs() < window)
        if valid is not None:
            clauses.append(valid[b, kv_idx])
        if dense is not None:
            clauses.append(dense[b, h, q_idx, kv_idx])
        return functools.reduce(operator.and_, clauses)

    return mask_mod


def _score_mod(spec: FusedSpec, b: int, h: int, n_q: int, n_k: int, device) -> Callable | None:
    """score_mod for the soft-cap, then the additive bias, then the boost (None when none is asked for)."""
    if plain_scores(spec) and spec.boost is None:
        return None
    cap = spec.softcap
    bias = None
    if spec.bias is not None:
        bias = spec.bias.to(device=device, dtype=torch.float32)
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        bias = (bias if bias.shape[2] == 1 else bias[..., -n_q:, :]).expand(b, h, n_q, n_k)
    coef = rows = None
    if spec.boost is not None:
        coef = spec.boost.coef.to(device=device, dtype=torch.float32).expand(b, h, n_k)
        rows = spec.boost.rows
        rows = torch.ones(b, n_q, dtype=torch.bool, device=device) if rows is None else rows.to(device)
        rows = rows.expand(b, n_q)

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if bias is not None:
            score = score + bias[b, h, q_idx, kv_idx]
        if coef is not None:
            score = score + torch.where(rows[b, q_idx], coef[b, h, kv_idx] * score.abs(), 0.0)
        return score

    return score_mod


# ------------------------------------------------------------------------------------------ mass passes


def _mass(q, kk, spec: FusedSpec, block_mask, score_mod, lse, gqa, log_weight: Callable) -> torch.Tensor:
    """sum_j p_ij g_ij [b, h, q] for g = exp(log_weight(score, b, h, q_idx, kv_idx)) >= 0, from one more
    flex call whose scores are s_ij + log g_ij (see the module docstring); 0 for rows that see no key."""

    def weighted(score, b, h, q_idx, kv_idx):
        s = score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)
        return torch.where(torch.isfinite(s), s + log_weight(s, b, h, q_idx, kv_idx), _NEG_INF)

    zeros = kk.new_zeros(*kk.shape[:3], 1)
    _, lse2 = _flex(q.float(), kk.float(), zeros, weighted, block_mask, spec.scale, gqa)
    return torch.where(torch.isfinite(lse), torch.exp(lse2 - lse), 0.0)


def _entropy_weight(lse: torch.Tensor) -> Callable:
    """log g with g_ij = lse_i - s_ij >= 0, so that sum_j p_ij g_ij is the entropy of row i."""

    def log_weight(s, b, h, q_idx, kv_idx):
        return torch.log((lse[b, h, q_idx] - s).clamp(min=0.0))

    return log_weight


def _radial_moment(q, kk, spec: FusedSpec, block_mask, score_mod, lse, gqa) -> torch.Tensor:
    """sum_j a_ij w_j |q_pos_i - k_pos_j| [b, h, q] for n-D positions, by mass passes over w+ and w-."""
    qp, kp, w = positions(spec, q.device)
    dims = qp.shape[-1]

    def weight_of(part: torch.Tensor) -> Callable:
        log_part = torch.log(part)

        def log_weight(s, b, h, q_idx, kv_idx):
            sq = sum((qp[b, q_idx, i] - kp[b, kv_idx, i]) ** 2 for i in range(dims))
            return log_part[b, kv_idx] + 0.5 * torch.log(sq)

        return log_weight

    moment = _mass(q, kk, spec, block_mask, score_mod, lse, gqa, weight_of(w.clamp(min=0.0)))
    if bool((w < 0).any()):
        moment = moment - _mass(q, kk, spec, block_mask, score_mod, lse, gqa, weight_of((-w).clamp(min=0.0)))
    return moment
