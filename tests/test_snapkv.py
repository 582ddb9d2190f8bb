"""SnapKV's observation window (headlab.analyses.snapkv): the window scores against explicit eager patterns,
the official pooling against hand-computed cases, the kept keys by hand, the hit rate against explicit
patterns, the registry / store run, and on zoo:lm-long the hit rate of the retrieval heads' kept keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import eager_attentions

import headlab as hl
from headlab.analyses import retrieval as R
from headlab.analyses import snapkv as K
from headlab.analyses.registry import registered, run_analysis
from headlab.datasets import needles
from headlab.errors import InputError, SelectionError


@pytest.fixture(scope="module")
def tiny(tiny_lm_long):
    return tiny_lm_long


def _eager(lm, ids: torch.Tensor) -> torch.Tensor:
    """[layer, head, n, n] float32 attention from HF eager attention (the explicit [n, n] pattern)."""
    return torch.stack([a[0].float() for a in eager_attentions(lm, {"input_ids": ids[None]})])


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (n,), generator=g)


def test_window_scores_equal_the_explicit_pattern(tiny):
    ids, w = _ids(40), 8
    s = K.window_scores(tiny, ids, window=w)
    full = _eager(tiny, ids)
    assert s.shape == (tiny.n_layers, tiny.n_heads, 40 - w)
    expected = full[:, :, -w:, : 40 - w].sum(-2)  # official: attn_weights[..., -w:, :-w].sum(-2)
    torch.testing.assert_close(s, expected, atol=1e-5, rtol=1e-4)
    assert K.window_scores(tiny, ids[None], window=w).shape == s.shape  # [1, n] input
    with pytest.raises(InputError, match="window"):
        K.window_scores(tiny, ids[:8], window=8)


def test_pooling_matches_hand_computed_cases():
    s = torch.tensor([1.0, 5.0, 2.0, 0.0, 3.0, 4.0])
    # maxpool k=3, padding 1 (padding is -inf, never wins)
    assert K.pooled(s, 3, "max").tolist() == [5.0, 5.0, 5.0, 3.0, 4.0, 4.0]
    # avgpool k=3, padding 1 with ZEROS counted (count_include_pad): the edges are divided by 3 too
    torch.testing.assert_close(
        K.pooled(s, 3, "avg"), torch.tensor([6 / 3, 8 / 3, 7 / 3, 5 / 3, 7 / 3, 7 / 3])
    )
    # k=7 on 4 entries: every window covers them all
    assert K.pooled(torch.tensor([[1.0, 2.0, 0.5, 0.0]]), 7, "max").tolist() == [[2.0] * 4]
    assert K.pooled(s, 1, "avg").tolist() == s.tolist()  # k=1 is the identity
    for bad in ({"kernel": 4}, {"pool": "mean"}):
        with pytest.raises(SelectionError):
            K.pooled(s, **{"kernel": 3, "pool": "max", **bad})


def test_kept_keys_by_hand():
    s = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0]])  # 8 prefix keys, window 2 -> N = 10
    keep = K.kept_keys(s, window=2, capacity=4, kernel=1)  # top 2 prefix keys + the 2 window keys
    assert keep.shape == (1, 10)
    assert torch.nonzero(keep[0]).ravel().tolist() == [1, 6, 8, 9]
    # maxpool k=3 spreads 0.9 over keys 0..2 and 0.8 over 5..7: ties go to the earlier key
    keep = K.kept_keys(s, window=2, capacity=5, kernel=3, pool="max")
    assert torch.nonzero(keep[0]).ravel().tolist() == [0, 1, 2, 8, 9]
    # a larger capacity keeps a superset
    big = K.kept_keys(s, window=2, capacity=7, kernel=3, pool="max")
    assert bool((big | keep).eq(big).all()) and int(big.sum()) == 7
    # N < capacity: no compression, every key kept
    assert K.kept_keys(s, window=2, capacity=11, kernel=3).all()
    assert K.kept_keys(s, window=2, capacity=10, kernel=1).sum() == 10  # N == capacity compresses to all
    with pytest.raises(SelectionError, match="capacity"):
        K.kept_keys(s, window=2, capacity=2)


def test_hit_rates_equal_the_explicit_pattern(tiny):
    prompt, cont, w, cap = _ids(36, 1), _ids(5, 2), 6, 20
    got = K.hit_rates(tiny, prompt, cont, window=w, capacity=cap, kernel=5, pool="avg")
    full = _eager(tiny, torch.cat([prompt, cont]))
    n = len(prompt)
    s = full[:, :, n - w : n, : n - w].sum(-2)
    keep = K.kept_keys(s, window=w, capacity=cap, kernel=5, pool="avg")
    assert torch.equal(keep, got["keep"]) and got["compressed"]
    assert int(keep[0, 0].sum()) == cap
    later = full[:, :, n:, :]  # the continuation rows
    on_kept = (later[..., :n] * keep[:, :, None]).sum(-1)
    expected = (on_kept + later[..., n:].sum(-1)).mean(-1)
    torch.testing.assert_close(got["hit_rate"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        got["prompt_hit_rate"], (on_kept / later[..., :n].sum(-1)).mean(-1), atol=1e-5, rtol=1e-4
    )
    assert ((got["hit_rate"] >= 0) & (got["hit_rate"] <= 1 + 1e-6)).all()
    uncompressed = K.hit_rates(tiny, prompt, cont, window=w, capacity=n + 1)
    assert not uncompressed["compressed"]
    torch.testing.assert_close(uncompressed["hit_rate"], torch.ones_like(expected), atol=1e-5, rtol=0)


def test_snapkv_is_registered_and_runs_on_a_store(tiny, tmp_path):
    assert "snapkv-heads" in registered()
    store = hl.Store.create(tmp_path / "store", tiny)
    with torch.no_grad(), hl.capture(tiny) as rec:
        tiny.model(**tiny.tokenizer(["Mary has a red ball ."], return_tensors="pt"))
    store.append(rec, examples=[0])
    frame = run_analysis(
        "snapkv-heads", store, lengths="16", depths="0.5", per_cell=1, window="8", capacity="24", kernel="3"
    )
    assert len(frame) == tiny.n_layers * tiny.n_heads and "snapkv-heads" in store.results()
    assert frame.n_compressed.iloc[0] == 1 and frame.window.iloc[0] == 8 and frame.capacity.iloc[0] == 24
    assert frame.hit_rate.between(0, 1 + 1e-6).all() and frame.kept_fraction.lt(1).all()
    with pytest.raises(SelectionError, match="pool"):
        run_analysis("snapkv-heads", store, lengths="16", depths="0.5", per_cell=1, pool="mean")
    with pytest.raises(SelectionError, match="capacity"):
        run_analysis(
            "snapkv-heads", store, lengths="16", depths="0.5", per_cell=1, window="32", capacity="16"
        )


# ----------------------------------------------------------------------------------------- the zoo


def test_zoo_retrieval_heads_hit_rate_grows_with_capacity(capsys):
    """Reported, not a paper number: on zoo:lm-long needle probes (84-212 prompt tokens, window 16), the hit
    rate of the retrieval heads' kept keys for the answer rows; asserted only to lie in [0, 1], to grow with
    the capacity (kept sets are nested) and to reach 1 when nothing is compressed."""
    lm = hl.load("zoo:lm-long")
    probes = needles.needle_probes((64, 128, 192), (0.1, 0.5, 0.9), seed=7)
    top = R.top_heads(R.retrieval_scores(lm, probes, teacher_forced=True), 2)
    means = {}
    for cap in (48, 96, 256):
        frame = K.snapkv_heads(lm, probes, window=16, capacity=cap).set_index(["layer", "head"])
        rows = frame.loc[top]
        assert rows.hit_rate.between(0, 1 + 1e-6).all() and rows.prompt_hit_rate.between(0, 1 + 1e-6).all()
        means[cap] = (
            float(rows.hit_rate.mean()),
            float(rows.kept_fraction.mean()),
            int(frame.n_compressed.iloc[0]),
        )
    with capsys.disabled():
        print(
            f"\nsnapkv zoo:lm-long retrieval heads {top}: capacity -> (hit rate, kept fraction, compressed)",
            means,
        )
    assert means[48][0] <= means[96][0] + 1e-6 <= means[256][0] + 2e-6
    assert means[256][2] == 0 and np.isclose(means[256][0], 1.0, atol=1e-5)
    assert means[48][2] == len(probes)
