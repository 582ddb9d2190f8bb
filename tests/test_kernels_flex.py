"""The FlexAttention backend (`kernels.flex`) against the oracle `fused.explicit_fused(..., tile=None)`: every
`Attended` field, for each mask, score modification and statistic, in float32 and bfloat16, with GQA and
ragged q != k; plus one call through the `fused_attention` dispatcher. Runs eagerly on the CPU."""

from __future__ import annotations

import pytest
import torch

from headlab.kernels.flex import flex_fused
from headlab.kernels.fused import explicit_fused, fused_attention
from headlab.kernels.spec import Distance, FusedSpec

N_Q, N_K, D = 37, 45, 16
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _inputs(batch: int, kv_heads: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, N_Q, D, generator=gen)
    k = torch.randn(batch, kv_heads, N_K, D, generator=gen)
    v = torch.randn(batch, kv_heads, N_K, D, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), gen


def _spec(case: str, batch: int, gen: torch.Generator) -> FusedSpec:
    """A FusedSpec exercising `case` (scale 0.3; most cases causal, as decoders are)."""
    kw: dict = {"scale": 0.3, "causal": True}
    if case == "plain":
        kw["causal"] = False
    elif case == "key_valid":
        valid = torch.ones(batch, N_K, dtype=torch.bool)
        valid[-1, :5] = False  # left padding of the last sequence
        valid[0, 20:23] = False
        kw["key_valid"] = valid
    elif case == "segments":
        qs = torch.tensor([0] * 10 + [1] * 12 + [2] * 15).repeat(batch, 1)
        ks = torch.tensor([0] * 18 + [1] * 12 + [2] * 15).repeat(batch, 1)
        kw["segments"] = (qs, ks)
    elif case == "window":
        kw["window"] = 6
    elif case == "mask":
        mask = torch.rand(batch, 4, N_Q, N_K, generator=gen) > 0.3
        mask[:, 1, 4] = False  # a row that sees no key
        kw.update(mask=mask, causal=False)
    elif case == "mask_shared":
        kw["mask"] = torch.rand(1, 1, 1, N_K, generator=gen) > 0.2
    elif case == "softcap":
        kw["softcap"] = 1.5
    elif case == "bias":
        kw["bias"] = torch.randn(batch, 4, N_Q, N_K, generator=gen)
    elif case == "softcap_bias_entropy":
        kw.update(softcap=2.0, bias=torch.randn(1, 4, 1, N_K, generator=gen), entropy=True, window=9)
    elif case == "classes_shared":
        cls = torch.randint(-1, 3, (batch, 1, N_K), generator=gen)
        kw.update(key_class=cls, n_classes=3, class_outputs=True)
    elif case == "classes_per_head":
        cls = torch.randint(-1, 3, (batch, 4, N_K), generator=gen)
        kw.update(key_class=cls, n_classes=3, class_outputs=True, softcap=3.0)
    elif case == "entropy":
        kw["entropy"] = True
    elif case == "distance_1d":
        qp = torch.arange(N_K - N_Q, N_K).repeat(batch, 1)
        kp = torch.arange(N_K).repeat(batch, 1)
        weight = (torch.rand(batch, N_K, generator=gen) > 0.2).float()
        kw["distance"] = Distance(query_pos=qp, key_pos=kp, key_weight=weight)
    elif case == "distance_2d":
        grid = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(9), indexing="ij"), -1).reshape(
            N_K, 2
        )
        kp = grid.float().repeat(batch, 1, 1)
        weight = torch.rand(batch, N_K, generator=gen) - 0.2  # some negative weights
        kw.update(distance=Distance(query_pos=kp[:, -N_Q:], key_pos=kp, key_weight=weight), bias=None)
    elif case == "head_scale":
        kw.update(
            head_scale=torch.tensor([1.0, 0.0, -2.0, 0.5]),
            key_valid=torch.rand(batch, N_K, generator=gen) > 0.3,
        )
    elif case == "everything":
        kw.update(
            segments=(
                torch.randint(0, 3, (batch, N_Q), generator=gen),
                torch.randint(0, 3, (batch, N_K), generator=gen),
            ),
            window=20,
            key_valid=torch.rand(batch, N_K, generator=gen) > 0.1,
            mask=torch.rand(batch, 1, N_Q, N_K, generator=gen) > 0.1,
            bias=torch.randn(batch, 1, N_Q, N_K, generator=gen),
            key_class=torch.randint(-1, 2, (batch, 1, N_K), generator=gen),
            n_classes=2,
            entropy=True,
            distance=Distance(
                query_pos=torch.arange(N_K - N_Q, N_K).repeat(batch, 1),
                key_pos=torch.arange(N_K).repeat(batch, 1),
            ),
            head_scale=torch.tensor([1.0, 2.0, 0.5, -1.0]),
        )
    return FusedSpec(**kw)


CASES = [
    # (case, batch, kv_heads)
    ("plain", 1, 4),
    ("key_valid", 2, 2),
    ("segments", 2, 1),
    ("window", 1, 2),
    ("mask", 2, 4),
    ("mask_shared", 1, 1),
    ("softcap", 1, 2),
    ("bias", 2, 2),
    ("softcap_bias_entropy", 2, 1),
    ("classes_shared", 2, 2),
    ("classes_per_head", 1, 2),
    ("entropy", 2, 4),
    ("distance_1d", 2, 2),
    ("distance_2d", 1, 1),
    ("head_scale", 2, 2),
    ("everything", 2, 2),
]


def _assert_matches(got, want, tol: float) -> None:
    for field in ("out", "lse", "class_mass", "class_out", "entropy", "distance"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is None:
            continue
        assert a.shape == b.shape, (field, a.shape, b.shape)
        a, b = a.float(), b.float()
        assert torch.equal(torch.isinf(a), torch.isinf(b)), field
        finite = torch.isfinite(b)
        scale = 1.0 + b[finite].abs().max().item() if field == "distance" else 1.0
        err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
        assert err <= tol * scale, f"{field}: max error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("case", "batch", "kv_heads"), CASES, ids=[c[0] for c in CASES])
def test_flex_matches_oracle(case, batch, kv_heads, dtype):
    q, k, v, gen = _inputs(batch, kv_heads, dtype, seed=[c[0] for c in CASES].index(case))
    spec = _spec(case, batch, gen)
    got = flex_fused(q, k, v, spec)
    want = explicit_fused(q, k, v, spec, tile=None)
    assert got.out.dtype == torch.float32 and got.lse.dtype == torch.float32
    _assert_matches(got, want, TOLERANCE[dtype])


def test_rows_that_see_no_key():
    q, k, v, _ = _inputs(1, 2, torch.float32, seed=3)
    valid = torch.ones(1, N_K, dtype=torch.bool)
    valid[0, : N_K - N_Q + 3] = False  # the first queries (causal) see only padding
    spec = FusedSpec(
        scale=0.3,
        causal=True,
        key_valid=valid,
        entropy=True,
        softcap=2.0,
        key_class=torch.zeros(1, 1, N_K, dtype=torch.long),
        n_classes=1,
    )
    got = flex_fused(q, k, v, spec)
    assert torch.isneginf(got.lse[..., :3]).all() and torch.isfinite(got.lse[..., 3:]).all()
    assert (got.out[..., :3, :] == 0).all() and (got.entropy[..., :3] == 0).all()
    assert (got.class_mass[..., :3, :] == 0).all()
    _assert_matches(got, explicit_fused(q, k, v, spec, tile=None), TOLERANCE[torch.float32])


def test_through_dispatcher():
    q, k, v, gen = _inputs(2, 2, torch.float32, seed=7)
    spec = _spec("everything", 2, gen)
    got = fused_attention(q, k, v, spec, backend="flex")
    _assert_matches(got, explicit_fused(q, k, v, spec, tile=None), TOLERANCE[torch.float32])
