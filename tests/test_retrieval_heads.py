"""Long-context head roles (headlab.analyses.retrieval, headlab.analyses.longctx): the needle and repeated-
token probes, the offset statistic against explicit patterns (and that capturing it changes nothing), the
retrieval score against an explicit decode-row computation, masking and streaming interventions against
explicit references, Razor's scores against its explicit N x N masks, the registry entries, the atlas roles,
and on the shipped zoo:lm-long that retrieval heads exist and masking them breaks NIAH while masking as many
random non-retrieval heads does not."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import eager_attentions

import headlab as hl
from headlab.analyses import atlas as A
from headlab.analyses import longctx as C
from headlab.analyses import retrieval as R
from headlab.analyses.registry import registered, run_analysis
from headlab.compat import cache_of, with_cache
from headlab.datasets import needles
from headlab.errors import InputError, SelectionError
from headlab.probe.select import Stats


@pytest.fixture(scope="module")
def tiny(tiny_lm_long):
    return tiny_lm_long


def _eager_attentions(lm, ids: torch.Tensor):
    return [a[0] for a in eager_attentions(lm, {"input_ids": ids})]  # [head, q, k] each


# ------------------------------------------------------------------------------------------- probes


def test_needle_probes_are_deterministic_and_hold_the_needle():
    grid = needles.needle_probes((16, 40), (0.0, 0.5, 1.0), per_cell=2, seed=3)
    assert len(grid) == 12 and grid == needles.needle_probes((16, 40), (0.0, 0.5, 1.0), per_cell=2, seed=3)
    for p in grid:
        assert p.needle in p.prompt and p.prompt.endswith(p.question) and p.real_needle in p.needle
        words = p.prompt.split()
        assert p.needle_at == 0 or words[p.needle_at - 1] == "."  # walked back to a sentence boundary
        assert words[p.needle_at : p.needle_at + len(p.needle.split())] == p.needle.split()
    assert grid[0].needle_at == 0  # depth 0
    with pytest.raises(InputError, match="depth"):
        needles.needle_probe(10, 1.5)


def test_repeated_random_tokens_layout():
    probe = needles.repeated_random_tokens(5, ids=range(10, 20), bos_id=0, repeats=3, seed=1)
    ids = probe.input_ids
    assert len(ids) == 16 and ids[0] == 0 and ids[1:6] == ids[6:11] == ids[11:16]
    distinct = needles.repeated_random_tokens(10, ids=range(10, 20), bos_id=0, distinct=True)
    assert len(set(distinct.input_ids[1:11])) == 10
    with pytest.raises(InputError, match="distinct"):
        needles.repeated_random_tokens(11, ids=range(10, 20), bos_id=0, distinct=True)


def test_rouge1_recall_and_needle_span():
    assert R.rouge1_recall([1, 2, 3, 4], [4, 2, 9]) == 0.5
    assert R.rouge1_recall([1, 1, 2], [1, 2]) == pytest.approx(2 / 3)  # clipped counts
    assert R.needle_span([5, 6, 1, 2, 3, 4, 7], [1, 2, 3, 4]) == (2, 6)
    assert R.needle_span([5, 3, 2, 1, 4, 7], [1, 2, 3, 4]) == (1, 5)  # a token-set match, in any order
    with pytest.raises(InputError, match="not in the prompt"):
        R.needle_span([5, 6, 7], [1, 2])


# ---------------------------------------------------------------------------------- offset statistic


def test_offset_statistic_matches_explicit_patterns(tiny):
    probe = needles.repeated_random_tokens(7, ids=R_ids(tiny), bos_id=tiny.tokenizer.bos_token_id, repeats=3)
    ids = torch.tensor([probe.input_ids])
    offsets = (0, 1, 6, 7, 14)
    got = {}
    for engine in ("fused", "reference"):
        stats = Stats(which=("entropy",), offsets=offsets)
        with hl.capture(tiny, stats=stats, engine=engine) as rec, torch.no_grad():
            tiny.model(input_ids=ids)
        hs = rec.head_stats
        got[engine] = hs[hs.stat == "offset"].set_index(["layer", "head", "role"]).value.sort_index()
    att = _eager_attentions(tiny, ids)
    for layer, a in enumerate(att):
        for head in range(a.shape[0]):
            for d in offsets:
                want = a[head].diagonal(-d).sum().item()  # sum_i A[i, i - d]
                assert got["fused"][(layer, head, f"d:{d}")] == pytest.approx(want, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(got["fused"].values, got["reference"].values, rtol=1e-4, atol=1e-6)


def test_capturing_offsets_changes_nothing(tiny):
    ids = torch.tensor([needles.repeated_random_tokens(9, ids=R_ids(tiny), bos_id=0, repeats=2).input_ids])
    with torch.no_grad():
        plain = tiny.model(input_ids=ids).logits
        with hl.capture(tiny, stats=Stats(offsets=(1, 9, 8))):
            observed = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(observed, plain, rtol=1e-5, atol=1e-5)


def test_bad_offsets_are_refused():
    with pytest.raises(SelectionError, match="offsets"):
        Stats(offsets=(-1,))


def R_ids(lm) -> list[int]:
    return lm.tokenizer.convert_tokens_to_ids([f"w{i}" for i in range(128)])


# ----------------------------------------------------------------------------------- retrieval score


def test_retrieval_events_match_explicit_decode_rows(tiny):
    probe = needles.needle_probe(24, 0.3, seed=5)
    r, _, _ = R.probe_retrieval(tiny, probe)
    p = R._tokenized(tiny, probe)
    stops = R._stop_ids(tiny, (".",))
    got = R._cut(R._generate(tiny, p, len(p.answer) + 2), stops)
    full = torch.tensor([p.prompt + got])
    att = _eager_attentions(tiny, full)
    a, b = p.span
    want = np.zeros_like(r)
    for t, token in enumerate(got):  # the row at position len(prompt) - 1 + t produced token t
        row = len(p.prompt) - 1 + t
        for layer, x in enumerate(att):
            j = x[:, row].argmax(-1)  # [head]
            for head in range(x.shape[0]):
                jj = int(j[head])
                want[layer, head] += a <= jj < b and p.prompt[jj] == token
    np.testing.assert_allclose(r, want / (b - a))


def test_retrieval_scores_average_successful_probes_only(tiny):
    probes = needles.needle_probes((16,), (0.0, 1.0), seed=2)
    frame = R.retrieval_scores(tiny, probes)
    assert len(frame) == tiny.n_layers * tiny.n_heads and set(frame.columns) >= {
        "layer",
        "head",
        "retrieval_score",
        "n_success",
    }
    assert (frame.n_success == 0).all() and frame.retrieval_score.isna().all()  # untrained: nothing copied


def test_random_heads_exclude_retrieval_heads_unless_official():
    scores = pd.DataFrame(
        {"layer": [0] * 6, "head": range(6), "retrieval_score": [0.9, 0.5, 0.0, 0.0, 0.0, 0.0]}
    )
    for seed in range(10):
        drawn = R.random_heads(scores, 2, seed=seed)
        assert not {(0, 0), (0, 1)} & set(drawn)
    official = {h for s in range(30) for h in R.random_heads(scores, 2, seed=s, official=True)}
    assert (0, 0) in official or (0, 1) in official
    with pytest.raises(SelectionError, match="non-retrieval"):
        R.random_heads(scores, 5)


def test_uniform_mask_equals_a_zeroed_query(tiny):
    ids = torch.tensor([tiny.tokenizer("Mary has a red ball . Tom sees a blue cup .")["input_ids"]])
    heads = ((1, 3), (2, 0))
    twin = copy.deepcopy(tiny.model)
    d = tiny.head_dim
    with torch.no_grad():
        for layer, head in heads:  # q = 0 before RoPE is q = 0 after it
            twin.model.layers[layer].self_attn.q_proj.weight[head * d : (head + 1) * d] = 0.0
        want = twin(input_ids=ids).logits
        with hl.intervene(tiny, R.RetrievalMask(heads, decode_only=False)):
            got = tiny.model(input_ids=ids).logits
        with hl.intervene(tiny, R.RetrievalMask(heads)):  # decode only: only the prompt's last row masked
            prefill = tiny.model(input_ids=ids).logits
        plain = tiny.model(input_ids=ids).logits
        # the official split, in plain transformers: prompt[:-1] prefilled unmasked, the last prompt token fed
        # as a decode step through the twin whose masked heads' queries are 0
        first = tiny.model(input_ids=ids[:, :-1], use_cache=True)
        split = twin(input_ids=ids[:, -1:], use_cache=True, **with_cache(cache_of(first))).logits
        with hl.intervene(tiny, R.RetrievalMask(heads, kind="zero", decode_only=False)):
            zeroed = tiny.model(input_ids=ids).logits
        with hl.intervene(tiny, hl.HeadAblation(heads)):
            ablated = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prefill[:, :-1], plain[:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefill[:, -1:], split, rtol=1e-4, atol=1e-4)
    assert (prefill[:, -1] - plain[:, -1]).abs().max() > 1e-3
    torch.testing.assert_close(zeroed, ablated, rtol=1e-5, atol=1e-5)
    with pytest.raises(SelectionError, match="out of range"):
        R.RetrievalMask(((9, 0),)).bind(tiny)


# -------------------------------------------------------------------------------------- DuoAttention


def test_streaming_heads_match_an_explicit_streaming_mask(tiny):
    ids = torch.tensor(
        [tiny.tokenizer("Mary has a red ball . Tom sees a blue cup . Anna likes a hat")["input_ids"]]
    )
    layer, head, sink, recent = 1, tiny.n_heads - 1, 2, 3
    values = {}
    hook = tiny.model.model.layers[layer].self_attn.v_proj.register_forward_hook(
        lambda m, i, o: values.__setitem__("v", o.detach())
    )
    try:
        with torch.no_grad(), hl.capture(tiny, stats=None, compact=hl.Select(layers=[layer])) as rec:
            tiny.model(input_ids=ids)
    finally:
        hook.remove()
    c = rec.compact[0]
    q, k = c.q[head], c.k[head // c.group]
    n, d = q.shape[0], tiny.head_dim
    v = values["v"][0].view(n, -1, d)[:, head // c.group]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = ((j < sink) | ((j > i - recent) & (j <= i))) & (j <= i)
    want = torch.softmax((q @ k.T * c.scale).masked_fill(~keep, float("-inf")), -1) @ v
    streaming = C.StreamingHeads(((layer, head),), sink=sink, recent=recent)
    outputs = hl.Select(layers=[layer], queries=list(range(n)))
    with (
        torch.no_grad(),
        hl.intervene(tiny, streaming),
        hl.capture(tiny, stats=None, head_outputs=outputs) as out,
    ):
        tiny.model(input_ids=ids)
    torch.testing.assert_close(out.z(layer)[0][:, head], want, rtol=1e-4, atol=1e-5)


def test_streaming_mass_matches_eager_rows(tiny):
    probe = needles.needle_probe(20, 0.5, seed=1)
    frame = C.streaming_scores(tiny, [probe], sink=2, recent=4)
    ids, rows = C._qa(tiny, probe)
    att = _eager_attentions(tiny, ids)
    for layer, a in enumerate(att):
        want = C.streaming_mass(a[:, rows], rows, sink=2, recent=4).mean(-1)  # [head]
        got = frame[frame.layer == layer].sort_values("head").local_mass.to_numpy()
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4)
    assert np.allclose(frame.local_mass + frame.distant_mass, 1.0)


def test_binarize_is_the_official_quantile_rule():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])
    keep = C.binarize(scores, sparsity=0.75)
    assert keep.sum() == 2 and keep[1] and keep[6]  # 25% retrieval heads: the two highest
    assert C.binarize(scores, sparsity=0.0).all()
    with pytest.raises(SelectionError, match="sparsity"):
        C.binarize(scores, sparsity=1.5)


def test_duo_heads_gates_per_kv_head(tiny):
    probes = needles.needle_probes((16,), (0.5,), seed=4)
    frame = C.duo_heads(tiny, probes, sink=2, recent=4, sparsity=0.5)
    per_kv = frame.groupby(["layer", "kv_head"]).streaming.nunique()
    n_kv = tiny.n_layers * tiny.n_kv_heads
    assert (per_kv == 1).all() and frame.drop_duplicates(["layer", "kv_head"]).streaming.sum() == n_kv // 2
    kv = frame.groupby(["layer", "kv_head"]).distant_mass.max().to_numpy()
    np.testing.assert_allclose(frame.drop_duplicates(["layer", "kv_head"]).duo_score.to_numpy(), kv)


# ------------------------------------------------------------------------------------ RazorAttention


def test_razor_scores_match_the_explicit_masks(tiny):
    L, reps = 6, 4
    probe = needles.repeated_random_tokens(
        L, ids=R_ids(tiny), bos_id=tiny.tokenizer.bos_token_id, repeats=reps
    )
    frame = C.razor_scores(tiny, probe)
    n = len(probe.input_ids)
    echo_mask, ind_mask = torch.zeros(n, n), torch.zeros(n, n)
    for i in range(n):  # golden-stick _get_score_mask
        if i // L >= 1:
            for j in range(i % L, i, L):
                echo_mask[i, j] = ind_mask[i, j + 1] = 1
    att = _eager_attentions(tiny, torch.tensor([probe.input_ids]))
    echo = torch.stack([(a * echo_mask).sum((-1, -2)) for a in att]).flatten() / n**2
    ind = torch.stack([(a * ind_mask).sum((-1, -2)) for a in att]).flatten() / n**2
    np.testing.assert_allclose(frame.echo_razor, echo.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(frame.induction_razor, ind.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(frame.induction, ind.numpy() * n**2 / (n - L), rtol=1e-4)  # per repeated query
    kv = frame.groupby(["layer", "kv_head"]).induction_razor.max().sort_values(ascending=False)
    chosen = set(frame[frame.razor_induction][["layer", "kv_head"]].itertuples(index=False, name=None))
    n_kv = tiny.n_layers * tiny.n_kv_heads
    assert len(chosen) == round(0.14 * n_kv) >= 1 and chosen == set(kv.index[: round(0.14 * n_kv)])
    assert round(0.01 * n_kv) == 0  # 1% echo heads of a small model rounds to none
    assert not frame.razor_echo.any() and (frame.razor_retrieval == frame.razor_induction).all()


# ------------------------------------------------------------------------------- registry and atlas


def test_analyses_are_registered_and_run_on_a_store(tiny, tmp_path):
    assert {"retrieval-heads", "streaming-heads", "razor-heads"} <= set(registered())
    store = hl.Store.create(tmp_path / "store", tiny)
    with torch.no_grad(), hl.capture(tiny) as rec:
        tiny.model(**tiny.tokenizer(["Mary has a red ball ."], return_tensors="pt"))
    store.append(rec, examples=[0])
    razor = run_analysis("razor-heads", store, length="8", repeats="3")
    assert len(razor) == tiny.n_layers * tiny.n_heads and "razor-heads" in store.results()
    streaming = run_analysis("streaming-heads", store, lengths="16", depths="0.5", per_cell=1, sparsity=0.25)
    n_kv = tiny.n_layers * tiny.n_kv_heads
    assert streaming.drop_duplicates(["layer", "kv_head"]).streaming.sum() == round(0.25 * n_kv)
    with pytest.raises(SelectionError, match="lengths"):
        run_analysis("retrieval-heads", store, lengths="long")
    atlas = run_analysis("atlas", store, razor="razor-heads", streaming="streaming-heads")
    group = tiny.n_heads // tiny.n_kv_heads
    assert atlas.role.str.contains("streaming").sum() == round(0.25 * n_kv) * group  # their query heads


def test_atlas_roles_from_long_context_scores():
    features = pd.DataFrame(
        {
            "tower": "lm",
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "entropy": [2.0, 2.1, 1.9, 2.2],
            "distance": [5.0, 6.0, 7.0, 8.0],
        }
    )
    scores = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "retrieval_score": [0.5, 0.0, 0.05, 0.0],
            "streaming": [False, True, False, False],
            "echo": [0.0, 0.0, 0.6, 0.0],
            "induction": [0.0, 0.0, 0.0, 0.7],
        }
    )
    roles = A.head_roles(A._with_scores(features, scores)).tolist()
    assert roles == ["retrieval", "streaming", "echo", "induction"]


# ----------------------------------------------------------------------------------------- the zoo


@pytest.fixture(scope="module")
def zoo_long():
    return hl.load("zoo:lm-long")


def test_zoo_retrieval_heads_are_causal_for_niah(zoo_long):
    """Wu et al.'s claim on the shipped weights: a few heads score > 0.1; masking the top 2 (the paper's
    setting: query := 0, decode only) breaks NIAH, masking 2 random non-retrieval heads (mean of 3 draws)
    does not."""
    probes = needles.needle_probes((64, 128, 192), (0.1, 0.5, 0.9), seed=7)
    scores = R.retrieval_scores(zoo_long, probes)
    assert scores.n_success.iloc[0] == len(probes)
    n_retrieval = int(scores.is_retrieval.sum())
    assert 2 <= n_retrieval <= len(scores) // 2
    top = R.top_heads(scores, 2)
    assert {layer for layer, _ in top} == {2}  # the copying heads of the shipped seed
    base = R.niah_accuracy(zoo_long, probes)
    masked = R.niah_accuracy(zoo_long, probes, mask=top)
    draws = [R.random_heads(scores, 2, seed=s) for s in range(3)]
    assert all(
        not set(d) & set(top) and scores.set_index(["layer", "head"]).loc[d].retrieval_score.max() <= 0.1
        for d in draws
    )
    rand = np.mean([R.niah_accuracy(zoo_long, probes, mask=d) for d in draws])
    assert base > 0.95
    assert masked < 0.5 * base
    assert rand > 0.8 * base


def test_zoo_long_has_induction_heads_where_razor_looks(zoo_long):
    tok = zoo_long.tokenizer
    probe = needles.repeated_random_tokens(
        40, ids=R_ids(zoo_long), bos_id=tok.bos_token_id, repeats=3, distinct=True
    )
    frame = C.razor_scores(zoo_long, probe)
    assert frame.induction.max() > A.INDUCTION  # at least one induction head by the atlas's rule
    # Razor's selection keeps the KV heads whose best query head scores highest (max over the group)
    kv = frame.groupby(["layer", "kv_head"]).agg(
        score=("induction_razor", "max"), chosen=("razor_induction", "first")
    )
    assert kv.chosen.sum() == round(C.INDUCTION_RATIO * len(kv)) >= 1
    assert kv[kv.chosen].score.min() >= kv[~kv.chosen].score.max()
