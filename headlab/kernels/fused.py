"""One dispatcher for fused attention: `fused_attention(q, k, v, spec)` picks a backend by device and by
what the spec asks for, and every backend returns the same `Attended`.

Backends:
- "triton": the Triton kernel (`kernels.triton_attention`): everything natively, one pass; CUDA (and the
  CPU under TRITON_INTERPRET=1, for tests).
- "flex": torch FlexAttention (`kernels.flex`): masks as a BlockMask, soft-cap and bias as a score_mod,
  statistics as augmented values; compiled on CUDA, eager (explicit scores) elsewhere.
- "sdpa": the augmented-value path (`kernels.columns` + `kernels.augmented`): statistics as extra value
  columns of one fused SDPA call (the CPU's flash kernel). Cannot soft-cap, cannot do 2-D distances (not
  linear in the row), and its entropy trick needs plain scores; such specs go to "tiled".
- "tiled": exact torch over query tiles, O(tile * k) memory; takes every spec.
- "reference": the naive oracle with the full [q, k] pattern (the same code as "tiled", one tile).

"auto": CUDA -> triton (flex where Triton is missing); CPU -> sdpa (tiled where sdpa cannot). A spec with
a score boost (`ScoreBoost`, PAINT) goes to flex on CUDA and to tiled on the CPU: neither SDPA nor the
Triton kernel can apply a score-dependent change (asking for them by name is an InputError). Before the
GPU backends, a dense mask that is exactly causal & padding becomes per-key validity (`structured_mask`). The
environment variable HEADLAB_ATTENTION=<backend> forces one (e.g. to run the Triton path under the
interpreter).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.nn.functional as F

from headlab.errors import InputError
from headlab.kernels.augmented import attention_with_lse
from headlab.kernels.columns import augmented_values, decode_columns
from headlab.kernels.rebuild import attention_scores
from headlab.kernels.reference import boost_scores, expand_kv
from headlab.kernels.spec import Attended, FusedSpec, check_shapes

BACKENDS = ("auto", "triton", "flex", "sdpa", "tiled", "reference")
_TILE = 256


def pick_backend(q: torch.Tensor, spec: FusedSpec, backend: str = "auto") -> str:
    """The backend `fused_attention` would use for this call."""
    forced = os.environ.get("HEADLAB_ATTENTION", backend) if backend == "auto" else backend
    if forced not in BACKENDS:
        raise InputError(f"unknown attention backend {forced!r}; choose one of {', '.join(BACKENDS)}")
    if spec.boost is not None and forced != backend and forced in ("triton", "sdpa"):
        forced = "auto"  # the environment's choice cannot boost: the boost's own route
    backend = forced
    if backend != "auto":
        if spec.boost is not None and backend in ("triton", "sdpa"):
            raise InputError(
                f"the {backend} backend cannot apply a score boost (PAINT's s + c|s|); use 'tiled', 'flex' or "
                "'reference' (or 'auto')"
            )
        return backend
    if spec.boost is not None:
        return "flex" if q.device.type == "cuda" else "tiled"
    if q.device.type == "cuda":
        from headlab.kernels.triton_attention import available

        return "triton" if available(q.device) else "flex"
    return "sdpa" if sdpa_takes(spec) else "tiled"


def sdpa_takes(spec: FusedSpec) -> bool:
    """Whether the augmented-value SDPA path computes `spec` exactly."""
    two_d = spec.distance is not None and spec.distance.dims != 1
    plain = spec.softcap is None and spec.boost is None
    return plain and not two_d and not (spec.entropy and spec.bias is not None)


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: FusedSpec, *, backend: str = "auto"
) -> Attended:
    """Attention of q [batch, head, q, d] over k, v [batch, kv_head, k, d(_v)] as `spec` says."""
    check_shapes(q, k, v)
    name = pick_backend(q, spec, backend)
    if name == "triton":
        from headlab.kernels.triton_attention import triton_attention  # triton is imported only when used

        return triton_attention(q, k, v, structured_mask(spec, q.shape[2], k.shape[2]))
    if name == "flex":
        from headlab.kernels.flex import flex_fused  # imports torch's flex module only when used

        return flex_fused(q, k, v, structured_mask(spec, q.shape[2], k.shape[2]))
    if name == "sdpa":
        if not sdpa_takes(spec):
            raise InputError(
                "the sdpa backend cannot soft-cap, do 2-D distances or entropy under a bias; use 'tiled'"
            )
        return augmented_fused(q, k, v, spec)
    return explicit_fused(q, k, v, spec, tile=None if name == "reference" else _TILE)


# --------------------------------------------------------------------------------------------- masks


def keep_rows(spec: FusedSpec, rows: torch.Tensor, n_q: int, n_k: int, device) -> torch.Tensor | None:
    """Boolean keep [batch|1, head|1, len(rows), k] for query rows `rows` (indices among the n_q), or None
    when nothing is masked."""
    keep = None
    q_at = (rows + n_k - n_q).to(device)[:, None]  # [r, 1] key position of each query
    kj = torch.arange(n_k, device=device)[None, :]

    def both(a, b):
        return b if a is None else a & b

    if spec.causal:
        see = (kj <= q_at)[None, None]
        if spec.segments is not None:
            qs, ks = (s.to(device) for s in spec.segments)
            qs = qs[:, rows.to(device)]
            cross = (qs[:, :, None] > 0) & (ks[:, None, :] > 0) & (qs[:, :, None] != ks[:, None, :])
            see = see | cross[:, None]
        keep = see
    if spec.window is not None:
        keep = both(keep, ((q_at - kj).abs() < spec.window)[None, None])
    if spec.key_valid is not None:
        keep = both(keep, spec.key_valid.to(device)[:, None, None, :].bool())
    if spec.mask is not None:
        m = spec.mask.to(device)
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        if m.shape[2] != 1:
            m = m[..., -n_q:, :][..., rows.to(device), :]
        keep = both(keep, m)
    return keep


def structured_mask(spec: FusedSpec, n_q: int, n_k: int) -> FusedSpec:
    """`spec` with its dense mask replaced by per-key validity when the mask is exactly causal & window (as
    the spec says) & "key seen by some query" (what transformers builds for a padded batch), so a kernel
    reads [batch, k] instead of [batch, q, k]; `spec` unchanged otherwise (checked exactly, once per call
    rather than once per head)."""
    m = spec.mask
    if m is None or not spec.causal or spec.segments is not None or spec.key_valid is not None:
        return spec
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    if m.shape[1] != 1 or m.shape[2] == 1 or m.shape[3] != n_k:
        return spec
    m = m[..., -n_q:, :]
    valid = m.any(-2)[:, 0]  # [batch, k]
    plain = FusedSpec(scale=spec.scale, causal=True, window=spec.window, key_valid=valid)
    if not torch.equal(keep_rows(plain, torch.arange(n_q), n_q, n_k, m.device).expand_as(m), m):
        return spec
    return replace(spec, mask=None, key_valid=valid)


def _bias_rows(spec: FusedSpec, rows: torch.Tensor, n_q: int, device) -> torch.Tensor | None:
    if spec.bias is None:
        return None
    b = spec.bias.to(device=device, dtype=torch.float32)
    b = b.reshape((1,) * (4 - b.dim()) + tuple(b.shape))
    return b if b.shape[2] == 1 else b[..., -n_q:, :][..., rows.to(device), :]


# --------------------------------------------------------------------------------- explicit (torch) paths


def explicit_fused(q, k, v, spec: FusedSpec, *, tile: int | None) -> Attended:
    """Exact torch attention over query tiles of `tile` rows (None: all rows at once, the oracle)."""
    n_q = q.shape[2]
    k32, v32 = expand_kv(k, q.shape[1]).float(), expand_kv(v, q.shape[1]).float()
    step = max(1, n_q if tile is None else tile)
    parts = [
        _explicit_tile(q, k32, v32, spec, torch.arange(s, min(n_q, s + step)))
        for s in range(0, max(n_q, 1), step)
    ]
    fields = zip(*parts, strict=True)
    out, lse, *stats = (None if p[0] is None else torch.cat(p, 2) for p in fields)
    out = spec.scale_output(out)
    return Attended(out, lse, *stats)


def _explicit_tile(q, k32, v32, spec: FusedSpec, rows: torch.Tensor):
    """(out, lse, class_mass, class_out, entropy, distance) of query rows `rows`, from explicit scores."""
    device, n_q, n_k = q.device, q.shape[2], k32.shape[2]
    s = attention_scores(
        q[:, :, rows.to(device)], k32, scale=spec.scale, softcap=spec.softcap
    )  # [b, h, r, k]
    bias = _bias_rows(spec, rows, n_q, device)
    if bias is not None:
        s = s + bias
    if spec.boost is not None:  # PAINT: s + c|s| on the boosted rows, after the bias, before the masks
        boosted = None if spec.boost.rows is None else spec.boost.rows.to(device)[:, rows.to(device)]
        s = boost_scores(s, spec.boost.coef, boosted)
    keep = keep_rows(spec, rows, n_q, n_k, device)
    if keep is not None:
        keep = keep.expand_as(s)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    probs = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows that see no key: zeros
    out = probs @ v32
    class_mass = class_out = entropy = distance = None
    if spec.n_classes:
        onehot = F.one_hot(spec.key_class.to(device).long().clamp(min=0), spec.n_classes).float()
        onehot = onehot * (spec.key_class.to(device) >= 0)[..., None]  # [b, 1|h, k, c]
        class_mass = probs @ onehot
        if spec.class_outputs:
            class_out = torch.einsum(
                "bhrk,bhkc,bhkd->bhrcd", probs, onehot.expand(-1, s.shape[1], -1, -1), v32
            )
    if spec.entropy:
        finite = torch.isfinite(s)
        plogp = (probs * torch.where(finite, s, 0.0)).sum(-1)
        entropy = torch.where(torch.isfinite(lse), lse - plogp, 0.0)
    if spec.distance is not None:
        distance = _moments(probs, spec, rows, n_q, device)
    return out, lse, class_mass, class_out, entropy, distance


def _moments(probs, spec: FusedSpec, rows, n_q, device) -> torch.Tensor:
    d = spec.distance
    qp = d.query_pos.to(device).float()[:, rows.to(device)]
    kp = d.key_pos.to(device).float()
    f = qp[:, :, None] - kp[:, None, :] if d.dims == 1 else torch.cdist(qp, kp)  # [b, r, k]
    w = (
        torch.ones_like(kp[..., 0] if d.dims != 1 else kp)
        if d.key_weight is None
        else d.key_weight.to(device).float()
    )
    wf = f * w[:, None, :]
    return torch.stack([(probs * wf[:, None]).sum(-1), (probs * (wf * f)[:, None]).sum(-1)], -1)


# ------------------------------------------------------------------------------- augmented values (SDPA)


def augmented_fused(q, k, v, spec: FusedSpec) -> Attended:
    """Statistics as extra value columns (`kernels.columns`) of ONE fused SDPA call. Masks other than
    causal become one boolean [batch, head|1, q, k] mask."""
    n_q, n_k, d_v = q.shape[2], k.shape[2], v.shape[-1]
    kk, v_aug, _ = augmented_values(q, k, v, spec, torch.float32)
    keep = keep_rows(spec, torch.arange(n_q), n_q, n_k, q.device) if _needs_mask(spec) else None
    mask = keep
    if spec.bias is not None:
        bias = _bias_rows(spec, torch.arange(n_q), n_q, q.device)
        mask = bias if keep is None else bias.masked_fill(~keep, float("-inf"))
    causal = spec.causal and keep is None
    aug, lse = attention_with_lse(q.float(), kk, v_aug, mask=mask, scale=spec.scale, causal=causal)
    if keep is not None:  # the CPU kernel reports lse 0 for a row that sees no key: -inf, as the reference
        lse = lse.masked_fill(~keep.any(-1).expand_as(lse), float("-inf"))
    aug = torch.where(torch.isfinite(lse)[..., None], aug, 0.0)  # such rows may be NaN: zeros
    out, *stats = decode_columns(aug, lse, q, spec, d_v)
    out = spec.scale_output(out)
    return Attended(out, lse, *stats)


def _needs_mask(spec: FusedSpec) -> bool:
    return any(x is not None for x in (spec.mask, spec.key_valid, spec.window)) or (
        spec.causal and spec.segments is not None
    )
