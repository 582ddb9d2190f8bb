"""Every fused attention backend equals the naive reference, on random specs: ragged lengths, GQA, padding,
PINE segments, sliding windows, dense masks, soft-cap, score bias, token classes with class outputs,
entropy, 1-D and 2-D distance moments, head scales, decode steps and rows that see no key.

The Triton kernel runs under TRITON_INTERPRET=1 on the CPU (conftest sets it) at small sizes; the `gpu`
tests run it natively at real sizes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_ON_CPU_SKIP

from headlab.errors import InputError
from headlab.kernels.fused import fused_attention, keep_rows, pick_backend, sdpa_takes, structured_mask
from headlab.kernels.spec import Distance, FusedSpec
from headlab.kernels.triton_attention import INTERPRETED

FIELDS = ("out", "lse", "class_mass", "class_out", "entropy", "distance")
# absolute tolerance of the output per input dtype (statistics accumulate in fp32: STAT_TOL everywhere)
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
STAT_TOL = 2e-4


def _inputs(b, h, h_kv, n_q, n_k, d, d_v, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k = torch.randn(b, h_kv, n_k, d, generator=g)
    v = torch.randn(b, h_kv, n_k, d_v, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)], g


def _spec(case: str, b, h, n_q, n_k, d, g) -> FusedSpec:
    """A spec exercising `case` (see the ids below)."""
    scale = d**-0.5
    pos = torch.arange(n_k).float()[None].expand(b, n_k)
    text_distance = Distance(query_pos=pos[:, n_k - n_q :], key_pos=pos)
    if case == "causal":
        return FusedSpec(scale=scale, causal=True)
    if case == "padded_stats":  # left padding + roles + entropy + 1-D distance, as the probe asks
        valid = torch.ones(b, n_k, dtype=torch.bool)
        valid[0, :5] = False
        roles = torch.randint(0, 4, (b, 1, n_k), generator=g).masked_fill(~valid[:, None], -1)
        return FusedSpec(
            scale=scale, causal=True, key_valid=valid, key_class=roles, n_classes=4, entropy=True,
            distance=text_distance,
        )  # fmt: skip
    if case == "atoms":  # per-head intervention atoms with their outputs (ACT / VAR)
        atoms = torch.randint(0, 3, (b, h, n_k), generator=g)
        return FusedSpec(scale=scale, causal=True, key_class=atoms, n_classes=3, class_outputs=True)
    if case == "segments":  # PINE: documents see each other, causal elsewhere; VHR-style head scale
        seg_k = torch.zeros(b, n_k, dtype=torch.long)
        seg_k[:, 6:14], seg_k[:, 14:22], seg_k[:, 22:30] = 1, 2, 3
        return FusedSpec(
            scale=scale, causal=True, segments=(seg_k[:, n_k - n_q :], seg_k),
            head_scale=torch.linspace(0.5, 2.0, h), entropy=True,
        )  # fmt: skip
    if case == "window_mask":  # sliding window + a dense mask that leaves some rows with no key
        mask = torch.rand(b, 1, n_q, n_k, generator=g) > 0.3
        mask[:, :, 2] = False
        head_scale = torch.rand(b, h, generator=g) + 0.5  # per example and head, as VHR selects
        return FusedSpec(scale=scale, causal=True, window=9, mask=mask, entropy=True, head_scale=head_scale)
    if case == "softcap_bias":  # Gemma-2 soft-cap and a PAINT-like score edit; entropy stays exact
        bias = torch.randn(1, h, n_q, n_k, generator=g)
        classes = torch.randint(-1, 2, (b, 1, n_k), generator=g)
        return FusedSpec(
            scale=scale, causal=True, softcap=3.0, bias=bias, entropy=True, key_class=classes, n_classes=2,
            class_outputs=True,
        )  # fmt: skip
    if case == "vit_grid":  # bidirectional, 2-D patch distance weighted to patch keys
        coords = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1)
        coords = coords.reshape(-1, 2)[:n_k].float()[None].expand(b, n_k, 2)
        weight = torch.ones(b, n_k)
        weight[:, 0] = 0.0  # the CLS token is not a patch
        dist = Distance(query_pos=coords[:, n_k - n_q :], key_pos=coords, key_weight=weight)
        return FusedSpec(scale=scale, causal=False, entropy=True, distance=dist)
    raise ValueError(case)


CASES = ("causal", "padded_stats", "atoms", "segments", "window_mask", "softcap_bias", "vit_grid")
SHAPES = {  # (batch, heads, kv heads, n_q, n_k, d, d_v)
    "ragged_gqa": (2, 4, 2, 37, 45, 16, 16),
    "decode": (1, 4, 1, 1, 45, 16, 24),
}


def _check(got, ref, dtype):
    for name in FIELDS:
        r, x = getattr(ref, name), getattr(got, name)
        assert (r is None) == (x is None), name
        if r is None:
            continue
        x = x.float()
        assert torch.equal(torch.isfinite(r), torch.isfinite(x)), name
        fin = torch.isfinite(r)
        tol = OUT_TOL[dtype] if name in ("out", "class_out") else STAT_TOL
        scale = max(1.0, r[fin].abs().max().item()) if name == "distance" else 1.0
        torch.testing.assert_close(x[fin], r[fin], atol=tol * scale, rtol=tol, msg=name)


def _run(case, shape, dtype, backend, device="cpu"):
    b, h, h_kv, n_q, n_k, d, d_v = shape
    (q, k, v), g = _inputs(b, h, h_kv, n_q, n_k, d, d_v, dtype, device)
    spec = _spec(case, b, h, n_q, n_k, d, g)
    ref = fused_attention(q, k, v, spec, backend="reference")
    return fused_attention(q, k, v, spec, backend=backend), ref


needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason=TRITON_ON_CPU_SKIP)


@needs_interpreter
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_fp32(case):
    got, ref = _run(case, SHAPES["ragged_gqa"], torch.float32, "triton")
    _check(got, ref, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["padded_stats", "atoms", "softcap_bias"])
def test_triton_matches_reference_half(case, dtype):
    got, ref = _run(case, SHAPES["ragged_gqa"], dtype, "triton")
    assert got.out.dtype == dtype
    _check(got, ref, dtype)


@needs_interpreter
@pytest.mark.parametrize("case", ["padded_stats", "atoms"])
def test_triton_decode_step(case):
    got, ref = _run(case, SHAPES["decode"], torch.float32, "triton")
    _check(got, ref, torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_tiled_matches_reference(case):
    got, ref = _run(case, SHAPES["ragged_gqa"], torch.float32, "tiled")
    _check(got, ref, torch.float32)


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("softcap_bias", "vit_grid")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_reference(case, dtype):
    got, ref = _run(case, SHAPES["ragged_gqa"], dtype, "sdpa")
    _check(got, ref, dtype)


def test_auto_picks_a_backend_that_takes_the_spec():
    (q, _, _), _ = _inputs(1, 4, 4, 8, 8, 16, 16, torch.float32)
    plain = FusedSpec(scale=0.25, causal=True, entropy=True)
    capped = FusedSpec(scale=0.25, causal=True, softcap=5.0)
    assert sdpa_takes(plain) and not sdpa_takes(capped)
    assert pick_backend(q, plain) == "sdpa" and pick_backend(q, capped) == "tiled"
    with pytest.raises(InputError, match="cannot soft-cap"):
        fused_attention(q, q, q, capped, backend="sdpa")
    with pytest.raises(InputError, match="unknown attention backend"):
        pick_backend(q, plain, "cuda")


def test_spec_and_shape_errors_say_what_is_wrong():
    with pytest.raises(InputError, match="n_classes"):
        FusedSpec(scale=1.0, key_class=torch.zeros(1, 1, 4, dtype=torch.long))
    with pytest.raises(InputError, match="boolean"):
        FusedSpec(scale=1.0, mask=torch.zeros(1, 1, 4, 4))
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(InputError, match="3 query heads"):
        fused_attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), FusedSpec(scale=1.0))


# ------------------------------------------------------------------------------------------ on the GPU

GPU_SHAPE = (1, 32, 8, 1024, 1024, 128, 128)  # Llama-shaped, GQA 4:1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_triton_on_cuda_matches_reference(case, dtype):
    b, h, h_kv, n_q, n_k, d, d_v = GPU_SHAPE
    if case == "vit_grid":
        n_q = n_k = 64
    got, ref = _run(case, (b, h, h_kv, n_q, n_k, d, d_v), dtype, "triton", device="cuda")
    _check(got, ref, dtype)


@pytest.mark.gpu
def test_triton_on_cuda_decode_and_long_rows():
    got, ref = _run("padded_stats", (2, 32, 8, 1, 4096, 128, 128), torch.bfloat16, "triton", "cuda")
    _check(got, ref, torch.bfloat16)


@pytest.mark.parametrize("window", [None, 7])
def test_padding_masks_become_key_validity_and_others_stay_dense(window):
    """transformers' padded-batch mask (causal & padding, & window) turns into key_valid before the Triton
    kernel, with the same result; any other dense mask is left alone."""
    b, h, n = 2, 4, 29
    (q, k, v), g = _inputs(b, h, 2, n, n, 16, 16, torch.float32)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :6] = False  # left padding
    hf_like = keep_rows(
        FusedSpec(scale=0.25, causal=True, window=window, key_valid=valid), torch.arange(n), n, n, "cpu"
    )
    spec = FusedSpec(
        scale=0.25,
        causal=True,
        window=window,
        mask=hf_like,
        key_class=torch.zeros(b, 1, n, dtype=torch.long),
        n_classes=1,
    )
    simple = structured_mask(spec, n, n)
    assert simple.mask is None and torch.equal(simple.key_valid, valid)
    other = hf_like & (torch.rand(b, 1, n, n, generator=g) > 0.2)
    assert structured_mask(FusedSpec(scale=0.25, causal=True, mask=other), n, n).mask is other
    assert structured_mask(FusedSpec(scale=0.25, causal=False, mask=hf_like), n, n).mask is hf_like
    ref = fused_attention(q, k, v, spec, backend="reference")
    _check(fused_attention(q, k, v, simple, backend="reference"), ref, torch.float32)
    if INTERPRETED:
        _check(fused_attention(q, k, v, spec, backend="triton"), ref, torch.float32)


def test_gpu_benchmark_script_runs_its_quick_check():
    """benchmarks/fused_attention.py --quick (tiny shapes, the interpreter): every configuration it times
    on the GPU runs here and matches the reference."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "fused_attention.py"
    configs = ["sdpa_flash", "hl_stats", "hl_patch", "hl_groups", "flex_patch"]
    args = [
        sys.executable,
        str(script),
        "--quick",
        "--sizes",
        "64",
        "--variants",
        "gqa",
        "--configs",
        *configs,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "every configuration ran and matched the reference" in done.stdout
