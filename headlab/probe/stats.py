"""Per-head statistics: computed inside one fused attention call (`kernels.fused_attention`, statistics as
a `FusedSpec`), or read off explicit patterns (the reference), then reduced to tidy rows.

Both paths produce the same `PerQuery` tensors, so the fast path is tested against the explicit one:

- mass [batch, head, q, role]: sum_{j in role} A[i, j]                      (key classes = token roles)
- entropy [batch, head, q]: -sum_j A log A = lse_i - sum_j A_ij s_ij
- distance / distance_rms [batch, head, q]:
    text (causal, 1-D): E[i - j] and sqrt(E[(i - j)^2])
    patch grid (2-D): sum over patch keys of A[i, j] * ||g_i - g_j|| (and its RMS), for patch queries, in
    patch units, without renormalising over patches (the ViT "mean attention distance" convention).
- alpha [batch, head, q, a]: A[i, k_a] for the first K keys and flagged keys, rebuilt for those few keys
    from the logsumexp; reduced to Gu et al.'s alpha_k = sum_i A[i, k] / #(real queries that can see k).
- offset [batch, head, q, d]: A[i, i - D] for the requested offsets D (NaN where query i has no visible key
    at example position i - D), rebuilt for those keys from the logsumexp (O(n * offsets) per head);
    reduced to the offset histogram D(D) = sum_i A[i, i - D] over the selected queries.

How each backend computes them (Triton natively in its loop; SDPA on the CPU as augmented value columns;
2-D distances on the CPU in query tiles) is the kernels package's business (`kernels/fused.py`).
Precision: statistics are accumulated in float32. On the SDPA path the 1-D RMS comes from first and second
moments of key positions (centred on the mean query position), with an absolute error of up to about
1e-7 * n^2 in squared-position units; Triton accumulates (i - j)^2 itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from headlab.errors import InputError
from headlab.kernels.rebuild import attention_scores, rows_from_lse
from headlab.kernels.reference import expand_kv
from headlab.kernels.spec import Attended, Distance, FusedSpec
from headlab.probe.context import BatchContext
from headlab.probe.select import Stats, resolve_queries


@dataclass
class PerQuery:
    """Per-query statistics of one attention call (None where not asked for)."""

    mass: torch.Tensor | None = None  # [batch, head, q, role]
    entropy: torch.Tensor | None = None  # [batch, head, q]
    distance: torch.Tensor | None = None  # [batch, head, q]
    distance_rms: torch.Tensor | None = None  # [batch, head, q]
    alpha: torch.Tensor | None = None  # [batch, head, q, a]
    offset: torch.Tensor | None = None  # [batch, head, q, d]


def alpha_keys(ctx: BatchContext, first_k: int) -> torch.Tensor:
    """[batch, a] example positions whose alpha is reported (first K and flagged keys; -1 = none)."""
    per_example = []
    for r in ctx.roles:
        keys = list(range(min(first_k, len(r))))
        keys += [p for p in r.flagged if p not in keys]
        per_example.append(keys)
    width = max((len(k) for k in per_example), default=0)
    return torch.tensor([k + [-1] * (width - len(k)) for k in per_example], dtype=torch.long).reshape(
        ctx.batch, width
    )


def _alpha_onehots(ctx: BatchContext, alpha_pos: torch.Tensor) -> torch.Tensor:
    """[batch, n_k, a] float: 1 where key j is alpha key a."""
    return ((ctx.key_pos[:, :, None] == alpha_pos[:, None, :]) & (alpha_pos[:, None, :] >= 0)).float()


def fused_spec(
    ctx: BatchContext,
    spec: Stats,
    *,
    n_q: int,
    scale: float,
    causal: bool,
    keep: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> FusedSpec:
    """The fused attention call that yields this spec's statistics (all but alpha) with the output."""
    key_class = n_classes = None
    if "mass" in spec.which:
        n_classes = len(ctx.names)
        key_class = torch.where(ctx.key_valid, ctx.key_role.clamp(min=0), -1)[:, None]  # [batch, 1, k]
    distance = None
    if "distance" in spec.which and causal:  # 1-D text distance i - j
        pos = ctx.key_pos.clamp(min=0).float()
        distance = Distance(query_pos=pos[:, -n_q:], key_pos=pos, key_weight=ctx.key_valid.float())
    elif "distance" in spec.which and any(r.grid for r in ctx.roles):  # 2-D patch distance, patch keys
        coords, is_patch = _grid_coords(ctx)
        distance = Distance(query_pos=coords[:, -n_q:], key_pos=coords, key_weight=is_patch.float())
    return FusedSpec(
        scale=scale,
        causal=causal,
        mask=keep,
        bias=bias,
        softcap=softcap,
        window=window,
        key_class=key_class,
        n_classes=n_classes or 0,
        entropy="entropy" in spec.which,
        distance=distance,
    )


def from_attended(att: Attended, ctx: BatchContext, fspec: FusedSpec) -> PerQuery:
    """PerQuery statistics of a fused call made with `fused_spec` (alpha comes from `alpha_from_lse`)."""
    stats = PerQuery(mass=att.class_mass, entropy=att.entropy)
    if fspec.distance is not None:
        mean, rms = att.distance[..., 0], att.distance[..., 1].clamp(min=0).sqrt()
        if fspec.distance.dims == 2:
            is_patch = fspec.distance.key_weight.bool().to(mean.device)
            mean, rms = _patch_queries_only(mean.shape[2], mean, rms, is_patch)
        stats.distance, stats.distance_rms = mean, rms
    return stats


def alpha_from_lse(
    q,
    k,
    lse,
    keep,
    *,
    scale: float,
    causal: bool,
    ctx: BatchContext,
    alpha_pos,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """[batch, head, q, a] = A[i, k_a], rebuilt exactly for the few alpha keys as exp(s_ia + b_ia - lse_i)
    (`bias`: a score bias broadcastable to [batch, head, q, k], BEiT's)."""
    index = ctx.key_index(alpha_pos)  # [batch, a]; -1: not a key of this call
    idx = index.clamp(min=0).to(q.device)
    n_q, n_k = q.shape[2], k.shape[2]
    k = expand_kv(k, q.shape[1])
    k_a = k.gather(2, idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1]))  # [batch, head, a, d]
    scores = attention_scores(q, k_a, scale=scale, softcap=softcap)  # [batch, head, q, a]
    if bias is not None:
        full = bias.to(q.device).expand(q.shape[0], q.shape[1], -1, -1)[:, :, -n_q:]  # [batch, head, q, k]
        scores = scores + full.gather(-1, idx[:, None, None, :].expand(-1, q.shape[1], n_q, -1))
    sees = (index >= 0).to(q.device)[:, None, None, :]
    if causal:
        sees = sees & (idx[:, None, None, :] <= torch.arange(n_k - n_q, n_k, device=q.device)[:, None])
    if keep is not None:
        rows = keep.expand(q.shape[0], -1, n_q if keep.shape[2] == 1 else -1, -1)[:, :, -n_q:]
        sees = sees & rows.gather(-1, idx[:, None, None, :].expand(-1, rows.shape[1], n_q, -1))
    return rows_from_lse(scores, lse, keep=sees)


def offset_keys(ctx: BatchContext, n_q: int, offsets: tuple[int, ...]) -> torch.Tensor:
    """[batch, q, d] key index of example position (query position - D) for each query of the call and
    offset D (-1 where that position is not a key of the call, or the query is padding)."""
    q_pos = ctx.key_pos[:, -n_q:]  # [batch, q]
    target = q_pos[:, :, None] - torch.tensor(offsets, dtype=torch.long)  # [batch, q, d]
    target = torch.where((q_pos[:, :, None] >= 0) & (target >= 0), target, -1)
    return ctx.key_index(target.flatten(1)).view(target.shape)


def offset_from_lse(
    q,
    k,
    lse,
    keep,
    *,
    scale: float,
    ctx: BatchContext,
    offsets: tuple[int, ...],
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """[batch, head, q, d] = A[i, i - D], rebuilt exactly as exp(s + b - lse_i) for the key at example
    position i - D of each query i (0 where the mask hides it, NaN where the call has no such key).
    O(q * d) per head."""
    n_q = q.shape[2]
    index = offset_keys(ctx, n_q, offsets).to(q.device)  # [batch, q, d]
    idx = index.clamp(min=0)
    k = expand_kv(k, q.shape[1])
    rows_b = torch.arange(k.shape[0], device=q.device)[:, None, None, None]
    rows_h = torch.arange(k.shape[1], device=q.device)[None, :, None, None]
    k_d = k[rows_b, rows_h, idx[:, None]]  # [batch, head, q, d, d_head]
    scores = attention_scores(q[:, :, :, None, :], k_d, scale=scale, softcap=softcap)  # [b, h, q, 1, d]
    scores = scores[..., 0, :]  # [batch, head, q, d]
    if bias is not None:
        full = bias.to(q.device).expand(q.shape[0], q.shape[1], -1, -1)[:, :, -n_q:]  # [batch, head, q, k]
        scores = scores + full.gather(-1, idx[:, None].expand(-1, q.shape[1], -1, -1))
    sees = (index >= 0)[:, None]  # [batch, 1, q, d]
    if keep is not None:
        rows = keep.expand(q.shape[0], -1, n_q if keep.shape[2] == 1 else -1, -1)[:, :, -n_q:]
        sees = sees & rows.gather(-1, idx[:, None].expand(-1, rows.shape[1], -1, -1))
    probs = rows_from_lse(scores, lse, keep=sees)  # 0 where the mask hides the key
    return torch.where((index >= 0)[:, None], probs, float("nan"))


def _grid_coords(ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, n_k, 2] grid (row, col) of every key and [batch, n_k] whether it is a patch."""
    coords = torch.zeros(ctx.batch, ctx.n_keys, 2)
    is_patch = torch.zeros(ctx.batch, ctx.n_keys, dtype=torch.bool)
    for b, r in enumerate(ctx.roles):
        if r.grid is None:
            continue
        rows, cols = r.grid
        idx = ctx.key_pos[b] - r.grid_start  # patch index of each key (keys evicted from a cache are absent)
        patch = (idx >= 0) & (idx < rows * cols)
        coords[b, patch] = torch.stack([idx[patch] // cols, idx[patch] % cols], -1).float()
        is_patch[b, patch] = True
    return coords, is_patch


def _grid_moments(probs, query_coords, coords, is_patch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and RMS patch distance [batch, head, q] over patch keys, for rows probs [batch, head, q, k]."""
    dist = torch.cdist(query_coords, coords) * is_patch[:, None, :]  # [batch, q, k]
    return (probs * dist[:, None]).sum(-1), (probs * dist[:, None] ** 2).sum(-1).sqrt()


def _patch_queries_only(n_q, mean, rms, is_patch):
    """NaN for queries that are not patches (the statistic is defined for patch queries only)."""
    keep = is_patch[:, None, -n_q:]
    nan = torch.tensor(float("nan"))
    return torch.where(keep, mean, nan), torch.where(keep, rms, nan)


def grid_distance_from_probs(probs: torch.Tensor, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference 2-D distances from explicit probs [batch, head, q, k] (q = last q keys)."""
    coords, is_patch = _grid_coords(ctx)
    n_q = probs.shape[2]
    mean, rms = _grid_moments(probs.float(), coords[:, -n_q:], coords, is_patch)
    return _patch_queries_only(n_q, mean, rms, is_patch)


def from_probs(
    probs: torch.Tensor, ctx: BatchContext, spec: Stats, *, causal: bool, alpha_pos: torch.Tensor | None
) -> PerQuery:
    """The reference: every statistic read off explicit attention probabilities [batch, head, q, k]."""
    probs = probs.float()
    n_q = probs.shape[2]
    stats = PerQuery()
    if "mass" in spec.which:
        onehot = F.one_hot(ctx.key_role.clamp(min=0), len(ctx.names)).float() * ctx.key_valid[..., None]
        stats.mass = torch.einsum("bhqk,bkr->bhqr", probs, onehot)
    if "entropy" in spec.which:
        stats.entropy = -torch.special.xlogy(probs, probs).sum(-1)
    if "distance" in spec.which:
        if causal:
            qpos = ctx.key_pos[:, -n_q:].float()
            kpos = ctx.key_pos.float()
            gap = (qpos[:, :, None] - kpos[:, None, :]).abs() * ctx.key_valid[:, None, :]  # [batch, q, k]
            stats.distance = (probs * gap[:, None]).sum(-1)
            stats.distance_rms = (probs * gap[:, None] ** 2).sum(-1).sqrt()
        elif any(r.grid is not None for r in ctx.roles):
            stats.distance, stats.distance_rms = grid_distance_from_probs(probs, ctx)
    if alpha_pos is not None and alpha_pos.shape[1]:
        stats.alpha = torch.einsum("bhqk,bka->bhqa", probs, _alpha_onehots(ctx, alpha_pos))
    if spec.offsets:
        index = offset_keys(ctx, n_q, tuple(spec.offsets)).to(probs.device)  # [batch, q, d]
        got = probs.gather(-1, index.clamp(min=0)[:, None].expand(-1, probs.shape[1], -1, -1))
        stats.offset = torch.where((index >= 0)[:, None], got, float("nan"))
    return stats


def _query_selection(ctx: BatchContext, n_q: int, queries) -> torch.Tensor:
    """[batch, q] bool: real queries of this call that the spec averages over."""
    q_valid = ctx.key_valid[:, -n_q:]
    if queries is None:
        return q_valid.clone()
    q_pos = ctx.key_pos[:, -n_q:]
    sel = torch.zeros_like(q_valid)
    for b, length in enumerate(ctx.lengths):
        wanted = torch.tensor(resolve_queries(queries, length), dtype=torch.long)
        sel[b] = torch.isin(q_pos[b], wanted) & q_valid[b]
    return sel


def _visible_counts(
    ctx: BatchContext, alpha_pos: torch.Tensor, keep: torch.Tensor | None, causal: bool, n_q: int
):
    """[batch, a] number of real queries of the call that can see alpha key a."""
    q_valid = ctx.key_valid[:, -n_q:]
    q_pos = ctx.key_pos[:, -n_q:]
    index = ctx.key_index(alpha_pos)  # [batch, a]; -1: not a key of this call
    sees = q_valid[:, :, None] & (index[:, None, :] >= 0)
    if causal:
        sees = sees & (q_pos[:, :, None] >= alpha_pos[:, None, :])
    if keep is not None:  # a mask may hide more (sliding windows): read the alpha columns of it
        idx = index.clamp(min=0)
        rows = keep[:, 0].expand(ctx.batch, -1, -1)  # masks may be shared across the batch
        cols = rows.gather(-1, idx[:, None, :].expand(-1, rows.shape[-2], -1))  # [batch, q, a]
        sees = sees & cols[:, -n_q:]
    return sees.sum(1)


def reduce(
    stats: PerQuery,
    ctx: BatchContext,
    spec: Stats,
    *,
    layer: int,
    causal: bool,
    alpha_pos: torch.Tensor | None,
    keep: torch.Tensor | None,
    head_offset: int = 0,
) -> dict[str, np.ndarray]:
    """Tidy rows (example, tower, step, layer, head, stat, role, value) of one attention call; the call's
    heads are global heads head_offset, head_offset + 1, ... (a tensor-parallel rank's share)."""
    blocks: list[tuple[torch.Tensor, str, list[list[str]], torch.Tensor]] = []
    any_stat = next(
        t for t in (stats.mass, stats.entropy, stats.distance, stats.alpha, stats.offset) if t is not None
    )
    n_q = any_stat.shape[2]
    sel = _query_selection(ctx, n_q, spec.queries).to(any_stat.device)
    q_valid = ctx.key_valid[:, -n_q:]
    if not bool(q_valid.any(-1).all()):
        raise InputError("an example has no real query token in this attention call")
    last = (q_valid.long() * torch.arange(1, n_q + 1)).argmax(-1)  # [batch]
    rows = torch.arange(ctx.batch)

    def mean(x: torch.Tensor) -> torch.Tensor:  # [batch, head, q(, r)] -> [batch, head, r]
        x = x if x.dim() == 4 else x[..., None]
        w = sel[:, None, :, None].float()
        total = torch.nan_to_num(x * w).sum(2)
        count = (w * ~x.isnan()).sum(2)
        return torch.where(count > 0, total / count.clamp(min=1), float("nan"))

    def at_last(x: torch.Tensor) -> torch.Tensor:
        x = x if x.dim() == 4 else x[..., None]
        return x[rows, :, last]  # [batch, head, r]

    one = [[""]] * ctx.batch
    everyone = torch.ones(ctx.batch, 1, dtype=torch.bool)
    if stats.mass is not None:
        present = ctx.role_present.clone()
        if spec.roles is not None:
            missing = [r for r in spec.roles if r not in ctx.names]
            if missing:
                raise InputError(
                    f"roles {missing} are absent from every example of this batch; present: {ctx.names}"
                )
            present &= torch.tensor([n in spec.roles for n in ctx.names])
        labels = [list(ctx.names)] * ctx.batch
        blocks += [
            (mean(stats.mass), "mass", labels, present),
            (at_last(stats.mass), "mass_last", labels, present),
        ]
    if stats.entropy is not None:
        blocks += [
            (mean(stats.entropy), "entropy", one, everyone),
            (at_last(stats.entropy), "entropy_last", one, everyone),
        ]
    if stats.distance is not None:
        blocks += [
            (mean(stats.distance), "distance", one, everyone),
            (mean(stats.distance_rms), "distance_rms", one, everyone),
        ]
    if stats.offset is not None:
        w = sel[:, None, :, None].float()
        defined = (~stats.offset.isnan() * w).sum(2) > 0  # [batch, head, d]
        total = torch.nan_to_num(stats.offset * w).sum(2)
        labels = [[f"d:{d}" for d in spec.offsets]] * ctx.batch
        everywhere = torch.ones(ctx.batch, len(spec.offsets), dtype=torch.bool)
        blocks.append((torch.where(defined, total, float("nan")), "offset", labels, everywhere))
    if stats.alpha is not None and ctx.step == 0:
        counts = _visible_counts(ctx, alpha_pos, keep, causal, n_q).to(stats.alpha.device)  # [batch, a]
        real = q_valid[:, None, :, None].to(stats.alpha.device)  # padding queries attend nowhere real
        received = (stats.alpha * real).sum(2) / counts[:, None, :].clamp(min=1)
        labels = [[f"pos:{p}" for p in row] for row in alpha_pos.tolist()]
        blocks.append((received, "alpha", labels, (alpha_pos >= 0) & (counts > 0)))
    return _rows(blocks, ctx, layer, head_offset)


def _rows(blocks, ctx: BatchContext, layer: int, head_offset: int = 0) -> dict[str, np.ndarray]:
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("example", "step", "layer", "head", "stat", "role", "value")
    }
    for values, stat, labels, keep in blocks:
        values = values.detach().float().cpu()  # [batch, head, r]
        batch, n_heads, n_r = values.shape
        ok = keep[:, None, :].expand(batch, n_heads, n_r) & ~values.isnan()
        b_idx, h_idx, r_idx = (t.numpy() for t in torch.nonzero(ok, as_tuple=True))
        label_arr = np.array(
            [[labels[b][r] for r in range(n_r)] for b in range(batch)], dtype=object
        ).reshape(batch, n_r)
        cols["example"].append(np.asarray(ctx.examples)[b_idx])
        cols["head"].append(h_idx + head_offset)
        cols["role"].append(label_arr[b_idx, r_idx])
        cols["value"].append(values[ok].numpy())
        cols["stat"].append(np.full(len(b_idx), stat, dtype=object))
    n = sum(len(v) for v in cols["value"])
    out = {k: np.concatenate(v) if v else np.empty(0) for k, v in cols.items() if k not in ("step", "layer")}
    out["step"] = np.full(n, ctx.step)
    out["layer"] = np.full(n, layer)
    out["tower"] = np.full(n, ctx.tower, dtype=object)
    return out
