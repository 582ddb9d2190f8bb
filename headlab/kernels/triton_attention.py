"""The Triton fused attention: one flash-style forward pass that returns the output, the per-row logsumexp
and every per-head statistic headlab captures, with the score-side patches applied inside the same pass.

Reads kernel -> wrapper. Grid: (query blocks of BLOCK_M rows, batch * head). Each program keeps, per query
row, the running maximum m, the running normaliser l and one accumulator per output, all rescaled by
exp(m_old - m_new) whenever the maximum grows (online softmax); key blocks of BLOCK_N are streamed, so the
[q, k] pattern never exists (O(BLOCK_M * BLOCK_N) registers per program, O(n) memory in all).

Accumulated besides sum_j p_ij v_j (every one divided by l at the end):
- class mass    sum_{j in c} p_ij               per key class c (token roles, or intervention atoms);
- class output  sum_{j in c} p_ij v_j           (CLASS_OUT: the group outputs ACT / VAR redistribute);
- entropy       H_i = lse_i - sum_j p_ij s_ij   (s = the final score, soft-capped and biased, so this is
                                                 exact where the augmented-K trick is not);
- distance      sum_j p_ij w_j f_ij and sum_j p_ij w_j f_ij^2 with f = q_pos - k_pos (1-D, signed) or
                ||q_pos - k_pos|| (2-D grids), w an optional per-key weight (1 for patches, 0 otherwise).

Score side, in this order: s = scale * q.k; soft-cap c * tanh(s / c); + dense bias; then masked to -inf
where the key is out of range, not kept by the dense boolean mask, not valid (padding), outside the sliding
window, or not causal (query row i sits at key position n_k - n_q + i, bottom-right) unless query and key
lie in two different segments (> 0): PINE's inter-document bidirectional mask. A dense mask that is exactly
causal & padding (& window), as transformers builds for a padded batch, is turned into per-key validity
first (`structured_mask`), so the kernel never reads [q, k] booleans per head.

Output side: an optional per-head (or per example and head) scale multiplies the output (VHR, HeadScale;
not the class outputs, which are the pre-edit decomposition).

Products: bf16/fp16 operands with fp32 accumulation on CUDA (as flash attention); fp32 products (fp32
inputs, and the class masses: p times exact one-hots) as "tf32x3" on NVIDIA, three TF32 tensor-core
products with fp32 accuracy (IEEE fp32 elsewhere). The interpreter (CPU) upcasts every product to fp32,
because its bf16 tl.dot is wrong (triton 3.9); loads, stores and bf16 output rounding are still exercised.

A row that sees no key returns zeros, lse = -inf and entropy 0, as the reference does.
"""

from __future__ import annotations

import math
import os

import torch

from headlab.errors import InputError
from headlab.kernels.spec import Attended, FusedSpec, check_shapes

try:  # triton is a dependency, but an exotic platform may lack a build: the dispatcher then falls back
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# triton.jit reads TRITON_INTERPRET when the kernel is defined, i.e. when this module is first imported
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device` (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


if triton is not None:

    @triton.jit
    def _fwd(
        Q, K, V, Out, Lse,
        Mask, Bias, KValid, QSeg, KSeg, KClass, ClassMass, ClassOut, Ent, QPos, KPos, KW, Dist, HeadScale,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m,
        smask_b, smask_h, smask_m, sbias_b, sbias_h, sbias_m, scls_b, scls_h,
        n_heads, group, n_q, n_k, n_classes, d_qk, d_v,
        scale, softcap, window, seg_end,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr,
        HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_CLASSES: tl.constexpr, N_CLASSES: tl.constexpr, CLASS_OUT: tl.constexpr, ENTROPY: tl.constexpr, DIST_DIMS: tl.constexpr,
        HAS_KW: tl.constexpr, HAS_HEAD_SCALE: tl.constexpr, DOT_F32: tl.constexpr, F32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // n_heads).to(tl.int64)  # 64-bit offsets: batch x head x n x d can pass 2^31 elements
        h = (bh % n_heads).to(tl.int64)
        kv_h = h // group  # GQA: query head h reads kv head h // (head / kv_head)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this block
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < n_q
        q_at = offs_m + (n_k - n_q)  # each query's key position (bottom-right alignment)

        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :],
            mask=row_ok[:, None] & (offs_d[None, :] < d_qk),
            other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = K + b * sk_b + kv_h * sk_h
        v_base = V + b * sv_b + kv_h * sv_h

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        cls_range = tl.arange(0, N_CLASSES)
        if HAS_CLASSES:
            cmass = tl.zeros([BLOCK_M, N_CLASSES], tl.float32)
        if CLASS_OUT:
            cacc = tl.zeros([BLOCK_M * N_CLASSES, BLOCK_DV], tl.float32)  # rows: (query, class)
        if ENTROPY:
            ent = tl.zeros([BLOCK_M], tl.float32)
        if DIST_DIMS > 0:
            dist1 = tl.zeros([BLOCK_M], tl.float32)
            dist2 = tl.zeros([BLOCK_M], tl.float32)
            qp0 = tl.load(QPos + (b * n_q + offs_m) * DIST_DIMS, mask=row_ok, other=0.0)
            if DIST_DIMS == 2:
                qp1 = tl.load(QPos + (b * n_q + offs_m) * 2 + 1, mask=row_ok, other=0.0)
        if HAS_SEG:
            qs = tl.load(QSeg + b * n_q + offs_m, mask=row_ok, other=0)

        # key blocks this query block can see: causal ends at the last row's position (with segments: or at
        # the last segment key, whichever is later); a sliding window starts at first row - window + 1
        hi = n_k
        if CAUSAL:
            hi = tl.minimum(n_k, (start_m + 1) * BLOCK_M + (n_k - n_q))
            if HAS_SEG:
                hi = tl.maximum(hi, seg_end)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(0, start_m * BLOCK_M + (n_k - n_q) - window + 1)
            lo = (lo // BLOCK_N) * BLOCK_N

        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < n_k
            k = tl.load(
                k_base + offs_n[:, None] * sk_n + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d[None, :] < d_qk),
                other=0.0,
            )
            if DOT_F32:
                k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=F32_DOT) * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            if HAS_SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # c * tanh(s / c)
            if HAS_BIAS:
                s += tl.load(
                    Bias
                    + b * sbias_b
                    + h * sbias_h
                    + offs_m[:, None].to(tl.int64) * sbias_m
                    + offs_n[None, :],
                    mask=row_ok[:, None] & key_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
            keep = row_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                see = offs_n[None, :] <= q_at[:, None]
                if HAS_SEG:
                    ks = tl.load(KSeg + b * n_k + offs_n, mask=key_ok, other=0)
                    see |= (qs[:, None] > 0) & (ks[None, :] > 0) & (qs[:, None] != ks[None, :])
                keep &= see
            if HAS_WINDOW:
                gap = q_at[:, None] - offs_n[None, :]
                keep &= (gap < window) & (gap > -window)
            if HAS_VALID:
                keep &= tl.load(KValid + b * n_k + offs_n, mask=key_ok, other=0)[None, :] != 0
            if HAS_MASK:
                keep &= (
                    tl.load(
                        Mask
                        + b * smask_b
                        + h * smask_h
                        + offs_m[:, None].to(tl.int64) * smask_m
                        + offs_n[None, :],
                        mask=row_ok[:, None] & key_ok[None, :],
                        other=0,
                    )
                    != 0
                )
            s = tl.where(keep, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])  # 0 where masked
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + offs_n[:, None] * sv_n + offs_dv[None, :],
                mask=key_ok[:, None] & (offs_dv[None, :] < d_v),
                other=0.0,
            )
            if DOT_F32:
                v = v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=F32_DOT)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            if ENTROPY:
                ent = ent * alpha + tl.sum(p * tl.where(keep, s, 0.0), 1)
            if HAS_CLASSES:
                cls = tl.load(KClass + b * scls_b + h * scls_h + offs_n, mask=key_ok, other=-1)
                onehot = (cls[:, None] == cls_range[None, :]).to(tl.float32)  # [BLOCK_N, classes]
                if CLASS_OUT:
                    # one row per (query, class): p masked to the class's keys, then one product with V
                    pc = tl.reshape(
                        p[:, None, :] * tl.trans(onehot)[None, :, :], [BLOCK_M * N_CLASSES, BLOCK_N]
                    )
                    a_rep = tl.reshape(
                        tl.broadcast_to(alpha[:, None], [BLOCK_M, N_CLASSES]), [BLOCK_M * N_CLASSES]
                    )
                    cmass = cmass * alpha[:, None] + tl.reshape(tl.sum(pc, 1), [BLOCK_M, N_CLASSES])
                    if DOT_F32:
                        cacc = cacc * a_rep[:, None] + tl.dot(pc, v, input_precision=F32_DOT)
                    else:
                        cacc = cacc * a_rep[:, None] + tl.dot(pc.to(v.dtype), v)
                else:  # N_CLASSES >= 16 here (tl.dot's smallest width)
                    cmass = cmass * alpha[:, None] + tl.dot(p, onehot, input_precision=F32_DOT)
            if DIST_DIMS > 0:
                kp0 = tl.load(KPos + (b * n_k + offs_n) * DIST_DIMS, mask=key_ok, other=0.0)
                f = qp0[:, None] - kp0[None, :]
                if DIST_DIMS == 2:
                    kp1 = tl.load(KPos + (b * n_k + offs_n) * 2 + 1, mask=key_ok, other=0.0)
                    f1 = qp1[:, None] - kp1[None, :]
                    f = tl.sqrt(f * f + f1 * f1)
                pw = p
                if HAS_KW:
                    pw = p * tl.load(KW + b * n_k + offs_n, mask=key_ok, other=0.0)[None, :]
                dist1 = dist1 * alpha + tl.sum(pw * f, 1)
                dist2 = dist2 * alpha + tl.sum(pw * f * f, 1)
            m_i = m_new

        seen = l_i > 0.0
        inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        row = b * n_heads * n_q + h * n_q + offs_m  # flat (batch, head, query) index of every row
        tl.store(Lse + row, lse, mask=row_ok)
        out = acc * inv_l[:, None]
        if HAS_HEAD_SCALE:
            out = out * tl.load(HeadScale + bh)
        tl.store(
            Out + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_dv[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dv[None, :] < d_v),
        )
        if ENTROPY:
            tl.store(Ent + row, tl.where(seen, lse - ent * inv_l, 0.0), mask=row_ok)
        if DIST_DIMS > 0:
            tl.store(Dist + row * 2, dist1 * inv_l, mask=row_ok)
            tl.store(Dist + row * 2 + 1, dist2 * inv_l, mask=row_ok)
        if HAS_CLASSES:
            cm_ptr = ClassMass + row[:, None] * n_classes + cls_range[None, :]
            tl.store(cm_ptr, cmass * inv_l[:, None], mask=row_ok[:, None] & (cls_range[None, :] < n_classes))
            if CLASS_OUT:
                rows_c = tl.reshape(
                    tl.broadcast_to(row[:, None], [BLOCK_M, N_CLASSES]), [BLOCK_M * N_CLASSES]
                )
                cls_c = tl.reshape(
                    tl.broadcast_to(cls_range[None, :], [BLOCK_M, N_CLASSES]), [BLOCK_M * N_CLASSES]
                )
                ok_c = tl.reshape(
                    tl.broadcast_to(row_ok[:, None], [BLOCK_M, N_CLASSES]), [BLOCK_M * N_CLASSES]
                )
                inv_c = tl.reshape(
                    tl.broadcast_to(inv_l[:, None], [BLOCK_M, N_CLASSES]), [BLOCK_M * N_CLASSES]
                )
                co_ptr = ClassOut + ((rows_c * n_classes + cls_c) * d_v)[:, None] + offs_dv[None, :]
                tl.store(
                    co_ptr,
                    cacc * inv_c[:, None],
                    mask=(ok_c & (cls_c < n_classes))[:, None] & (offs_dv[None, :] < d_v),
                )


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _strides4(x: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, head, query) strides of a [b|1, h|1, q|1, k] tensor whose key axis is contiguous; 0 where
    the axis is broadcast."""
    if x is None:
        return 0, 0, 0
    return tuple(0 if x.shape[i] == 1 else x.stride(i) for i in range(3))


def _blocks(spec: FusedSpec, n_classes: int, d_v: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Class outputs keep BLOCK_M * classes rows per program,
    so BLOCK_M shrinks with the number of classes to stay in registers."""
    if device.type != "cuda":
        return 16, 16, 1, 1  # the interpreter: small tiles, exact enough and fast to emulate
    block_m = 128 if d_v <= 64 else 64
    if spec.class_outputs:
        block_m = max(16, 64 // n_classes)
    return block_m, 64, 4 if d_v <= 64 else 8, 3


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: FusedSpec) -> Attended:
    """Run the fused kernel (CUDA, or the CPU under TRITON_INTERPRET=1); see the module docstring."""
    if not available(q.device):
        raise InputError(
            f"the Triton kernel cannot run on {q.device}: it needs CUDA, or TRITON_INTERPRET=1 set before "
            "headlab is imported (CPU emulation, slow); use backend='auto'"
        )
    check_shapes(q, k, v)
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(
            f"the Triton kernel takes q, k, v of one dtype among {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    batch, heads, n_q, d_qk = q.shape
    n_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[-1]
    device = q.device
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(batch, heads, n_q, d_v, dtype=v.dtype, device=device)
    lse = torch.empty(batch, heads, n_q, dtype=torch.float32, device=device)
    dummy = lse  # stands in for absent tensors (never read: their flags are off)
    f32 = dict(dtype=torch.float32, device=device)

    mask = spec.mask
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.int8)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(-1, -1, -1, n_k)
        mask = mask[..., -n_q:, :] if mask.shape[2] not in (1, n_q) else mask
        mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    bias = spec.bias
    if bias is not None:
        bias = bias.to(device=device, dtype=torch.float32)
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(-1, -1, -1, n_k)
        bias = bias[..., -n_q:, :] if bias.shape[2] not in (1, n_q) else bias
        bias = bias if bias.stride(-1) == 1 else bias.contiguous()
    key_valid = (
        None if spec.key_valid is None else spec.key_valid.to(device=device, dtype=torch.int8).contiguous()
    )
    q_seg = k_seg = None
    seg_end = 0
    if spec.segments is not None and spec.causal:
        q_seg, k_seg = (s.to(device=device, dtype=torch.int32).contiguous() for s in spec.segments)
        in_segment = (k_seg > 0).any(0).nonzero()
        seg_end = int(in_segment.max()) + 1 if len(in_segment) else 0  # keys past it are only seen causally

    n_classes = spec.n_classes
    key_class = class_mass = class_out = None
    c_pad = 1
    if n_classes:
        key_class = spec.key_class.to(device=device, dtype=torch.int32).expand(batch, -1, n_k).contiguous()
        c_pad = _pow2(n_classes, 2 if spec.class_outputs else 16)
        class_mass = torch.empty(batch, heads, n_q, n_classes, **f32)
        if spec.class_outputs:
            class_out = torch.empty(batch, heads, n_q, n_classes, d_v, **f32)
    entropy = torch.empty(batch, heads, n_q, **f32) if spec.entropy else None
    dist = spec.distance
    q_pos = k_pos = k_w = distance = None
    if dist is not None:
        q_pos = dist.query_pos.to(**f32).contiguous()
        k_pos = dist.key_pos.to(**f32).contiguous()
        k_w = None if dist.key_weight is None else dist.key_weight.to(**f32).contiguous()
        distance = torch.empty(batch, heads, n_q, 2, **f32)
    head_scale = None
    if spec.head_scale is not None:  # [batch, head], one factor per program
        head_scale = spec.head_scale.to(**f32).reshape(-1 if spec.head_scale.dim() == 2 else 1, heads)
        head_scale = head_scale.expand(batch, heads).contiguous()

    block_m, block_n, warps, stages = _blocks(spec, c_pad, d_v, device)
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    _fwd[grid](
        q, k, v, out, lse,
        *(x if x is not None else dummy for x in (
            mask, bias, key_valid, q_seg, k_seg, key_class, class_mass, class_out, entropy, q_pos, k_pos, k_w,
            distance, head_scale,
        )),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *_strides4(mask), *_strides4(bias),
        *((key_class.stride(0), 0 if key_class.shape[1] == 1 else key_class.stride(1)) if n_classes else (0, 0)),
        heads, heads // n_kv, n_q, n_k, n_classes, d_qk, d_v,
        float(spec.scale), float(spec.softcap or 1.0), int(spec.window or 0), seg_end,
        CAUSAL=spec.causal, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        HAS_VALID=key_valid is not None, HAS_SEG=q_seg is not None, HAS_WINDOW=spec.window is not None,
        HAS_SOFTCAP=spec.softcap is not None, HAS_CLASSES=bool(n_classes), N_CLASSES=c_pad,
        CLASS_OUT=spec.class_outputs, ENTROPY=spec.entropy, DIST_DIMS=0 if dist is None else dist.dims,
        HAS_KW=k_w is not None, HAS_HEAD_SCALE=head_scale is not None, DOT_F32=q.dtype == torch.float32 or device.type != "cuda",
        F32_DOT="tf32x3" if device.type == "cuda" and torch.version.hip is None else "ieee",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(d_qk, 16), BLOCK_DV=_pow2(d_v, 16),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return Attended(out, lse, class_mass, class_out, entropy, distance)
