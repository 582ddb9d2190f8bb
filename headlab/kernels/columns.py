"""Augmented value columns, shared by the backends that ride on a plain fused attention (SDPA on the CPU,
FlexAttention): any statistic linear in the attention row p_i is p_i @ C for per-key columns C, so one call
over [V | K | class one-hots | class-masked V | distance columns] returns the output and the statistics.

- entropy (plain scores only): H_i = lse_i - scale * q_i . (P K)_i;
- class masses and outputs: one-hot columns and V masked to each class;
- distance moments: w, w k_pos (per dim), w |k_pos|^2 with positions centred on each batch row's mean
  query position (fewer cancellations in the second moment); the 1-D first moment follows, the 2-D one is
  not linear in the row (the caller computes it another way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headlab.kernels.reference import expand_kv
from headlab.kernels.spec import FusedSpec


def plain_scores(spec: FusedSpec) -> bool:
    """Whether scores are scale * q.k (then H = lse - scale q.(A K) holds)."""
    return spec.softcap is None and spec.bias is None


def augmented_values(q, k, v, spec: FusedSpec, dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(keys, [V | K | one-hots | class-masked V | distance columns], enable_gqa) for the main flex call."""
    b, h = q.shape[:2]
    n_k, device = k.shape[2], q.device
    per_head = spec.key_class is not None and spec.key_class.shape[1] != 1
    width_kv = h if per_head else k.shape[1]
    kk, vv = expand_kv(k, width_kv).to(dtype), expand_kv(v, width_kv).to(dtype)
    parts = [vv]
    if spec.entropy and plain_scores(spec):
        parts.append(kk)
    if spec.n_classes:
        cls = spec.key_class.to(device).long()
        onehot = F.one_hot(cls.clamp(min=0), spec.n_classes).float() * (cls >= 0)[..., None]
        onehot = onehot.expand(b, width_kv, n_k, spec.n_classes)
        parts.append(onehot)
        if spec.class_outputs:
            parts.append((vv[..., None, :] * onehot[..., None]).flatten(-2))
    if spec.distance is not None:
        parts.append(distance_columns(spec, device)[:, None].expand(b, width_kv, n_k, -1))
    return kk, torch.cat(parts, -1), width_kv != h


def positions(spec: FusedSpec, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query_pos [b, q, dims], key_pos [b, k, dims], key weight [b, k]), float32, centred on the mean
    query position of each batch row (fewer cancellations in the second moment)."""
    d = spec.distance
    qp, kp = d.query_pos.to(device).float(), d.key_pos.to(device).float()
    if d.dims == 1:
        qp, kp = qp[..., None], kp[..., None]
    centre = qp.mean(1, keepdim=True)
    w = torch.ones_like(kp[..., 0]) if d.key_weight is None else d.key_weight.to(device).float()
    return qp - centre, kp - centre, w


def distance_columns(spec: FusedSpec, device) -> torch.Tensor:
    """[b, k, 2 + dims]: w, w * key_pos (each dim), w * |key_pos|^2."""
    _, kp, w = positions(spec, device)
    return torch.cat([w[..., None], w[..., None] * kp, (w * (kp * kp).sum(-1))[..., None]], -1)


def decode_columns(aug, lse, q, spec: FusedSpec, d_v: int):
    """(out, class_mass, class_out, entropy, distance) from the augmented output; for dims != 1 the
    distance's first moment is left for `_radial_moment`."""
    seen = torch.isfinite(lse)
    out, off = aug[..., :d_v], d_v
    class_mass = class_out = entropy = distance = None
    if spec.entropy and plain_scores(spec):
        pk = aug[..., off : off + q.shape[-1]]  # (A K)_i
        entropy = torch.where(seen, lse - spec.scale * (q.float() * pk).sum(-1), 0.0)
        off += q.shape[-1]
    if spec.n_classes:
        class_mass = aug[..., off : off + spec.n_classes]
        off += spec.n_classes
        if spec.class_outputs:
            width = spec.n_classes * d_v
            class_out = aug[..., off : off + width].unflatten(-1, (spec.n_classes, d_v))
            off += width
    if spec.distance is not None:
        qp, _, _ = positions(spec, aug.device)
        dims = qp.shape[-1]
        w, wk, wk2 = aug[..., off], aug[..., off + 1 : off + 1 + dims], aug[..., off + 1 + dims]
        qp = qp[:, None]  # [b, 1, q, dims]
        second = (qp * qp).sum(-1) * w - 2 * (qp * wk).sum(-1) + wk2
        first = qp[..., 0] * w - wk[..., 0] if dims == 1 else torch.zeros_like(w)
        distance = torch.stack([first, second], -1)
    return out, class_mass, class_out, entropy, distance
