"""The probe: observing changes nothing, fused statistics equal the explicit reference, patterns equal
eager attention, generation is captured, the model is restored, and bad input gets a headlab error."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import (
    ALL_ARCHS,
    LLMS,
    assert_close_at_real_tokens,
    eager_attentions,
    inputs_for,
    logits_of,
    skip_unless_triton_runs_on_cpu,
)

import headlab as hl
from headlab.probe import stats as S
from headlab.probe.context import BatchContext
from headlab.probe.roles import text_roles

KEYS = ["example", "tower", "step", "layer", "head", "stat", "role"]
EVERYTHING = dict(
    patterns=hl.Select(layers=[1], heads=[0, 2], queries=[0, -1]),
    head_outputs=hl.Select(heads=[1, 3]),
    residuals=hl.Select(queries=[0, 1]),
)


def _capture(lm, inputs, **kwargs) -> tuple[torch.Tensor, hl.Record]:
    with torch.no_grad(), hl.capture(lm, **kwargs) as rec:
        out = logits_of(lm, inputs)
    return out, rec


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_observing_changes_nothing(tiny, name):
    lm = tiny(name)
    inputs = inputs_for(lm, padding_side="left")
    with torch.no_grad():
        before = logits_of(lm, inputs)
    during, rec = _capture(lm, inputs, **(EVERYTHING if lm.family is not hl.Family.VIT else {}))
    with torch.no_grad():
        after = logits_of(lm, inputs)
    assert_close_at_real_tokens(during, before, inputs)
    assert torch.equal(after, before)
    assert len(rec.head_stats) > 0


TRITON_CASES = [("mistral", "left", "triton"), ("vit", "right", "triton"), ("llava", "left", "triton")]


@pytest.mark.parametrize(
    "name,padding_side,backend",
    [(n, side, "auto") for n in ALL_ARCHS for side in ("left", "right")] + TRITON_CASES,
)
def test_fused_stats_equal_reference(tiny, name, padding_side, backend, monkeypatch):
    """Through the CPU default and through the Triton kernel (the interpreter; sliding window, 2-D grid,
    image roles): same statistics and outputs as the explicit reference."""
    if backend == "triton":
        skip_unless_triton_runs_on_cpu()
        monkeypatch.setenv("HEADLAB_ATTENTION", "triton")
    lm = tiny(name)
    inputs = inputs_for(lm, padding_side=padding_side)
    logits, fused = _capture(lm, inputs)
    monkeypatch.delenv("HEADLAB_ATTENTION", raising=False)
    with torch.no_grad():
        assert_close_at_real_tokens(logits, logits_of(lm, inputs), inputs)
    _, ref = _capture(lm, inputs, engine="reference")
    a, b = fused.head_stats, ref.head_stats
    assert len(a) == len(b) > 0
    merged = a.merge(b, on=KEYS, suffixes=("_fused", "_ref"), validate="one_to_one")
    assert len(merged) == len(a)
    torch.testing.assert_close(
        torch.tensor(merged.value_fused.values), torch.tensor(merged.value_ref.values), atol=2e-4, rtol=1e-4
    )
    stats = set(a.stat)
    assert {"mass", "mass_last", "entropy", "entropy_last", "distance", "distance_rms", "alpha"} <= stats


def test_masses_sum_to_one_and_roles_are_right(tiny):
    lm = tiny("llava")
    inputs = inputs_for(lm, padding_side="left")
    _, rec = _capture(lm, inputs)
    stats = rec.head_stats
    lm_mass = stats[(stats.tower == "lm") & (stats.stat == "mass")]
    assert set(lm_mass.role) == {"bos", "text", "image"}
    sums = lm_mass.groupby(["example", "layer", "head"]).value.sum()
    assert ((sums - 1).abs() < 1e-5).all()
    vision = stats[stats.tower == "vision"]
    assert set(vision[vision.stat == "mass"].role) == {"cls", "patch"}
    assert set(vision.example) == {0, 1}  # the image of example b is example b
    assert vision[vision.stat == "distance"].value.between(0, math.hypot(3, 3)).all()
    examples = rec.examples
    lengths = inputs["attention_mask"].sum(-1).tolist()
    assert examples[examples.tower == "lm"].n_tokens.tolist() == lengths


@pytest.mark.parametrize("name", LLMS)
def test_patterns_equal_eager_attention(tiny, name):
    lm = tiny(name)
    inputs = inputs_for(lm, padding_side="left")
    eager = eager_attentions(lm, inputs)
    _, rec = _capture(lm, inputs, stats=None, patterns=hl.Select(layers=[0, 1], heads=[0, 3]))
    valid = inputs["attention_mask"].bool()
    for rows in rec.patterns:
        b = rows.example
        full = eager[rows.layer][b, rows.head][valid[b]][:, valid[b]]  # [q, k] over real tokens
        torch.testing.assert_close(rows.probs, full[list(rows.queries)], atol=1e-5, rtol=1e-5)
    assert len(rec.patterns) == 2 * 2 * 2  # examples x layers x heads


def test_head_outputs_and_residuals(tiny):
    lm = tiny("llama")
    inputs = inputs_for(lm)
    _, rec = _capture(lm, inputs, **EVERYTHING)
    z = rec.z(0)
    assert z.shape == (2, 1, 2, lm.head_dim)  # examples, queries (last), selected heads, d_head
    res = rec.residuals
    assert set(res.position) == {0, 1} and set(res.layer) == {0, 1}
    ratio = rec.residual_ratios[0].ratios
    assert ratio.shape == (2, lm.main.d_model)
    torch.testing.assert_close(ratio.pow(2).mean(-1), torch.ones(2))  # |x|/RMS has unit mean square


def test_generation_with_kv_cache_is_captured(tiny):
    lm = tiny("llama")
    inputs = inputs_for(lm, padding_side="left")
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = lm.model.generate(**inputs, **kwargs)
    with torch.no_grad(), hl.capture(lm, patterns=hl.Select(layers=[1], heads=[0], queries=[-1])) as rec:
        captured = lm.model.generate(**inputs, **kwargs)
    with torch.no_grad(), hl.capture(lm, engine="reference") as ref:
        lm.model.generate(**inputs, **kwargs)
    assert torch.equal(plain, captured)
    stats = rec.head_stats
    assert sorted(set(stats.step)) == [0, 1, 2]
    assert set(stats[stats.step > 0].stat) == {
        "mass",
        "mass_last",
        "entropy",
        "entropy_last",
        "distance",
        "distance_rms",
    }
    assert "answer" in set(stats[stats.step > 0].role)
    merged = stats.merge(ref.head_stats, on=KEYS, suffixes=("_f", "_r"))
    assert len(merged) == len(stats)
    assert (merged.value_f - merged.value_r).abs().max() < 2e-4
    decode_rows = [r for r in rec.patterns if r.step == 2]
    assert len(decode_rows) == 2 and all(abs(float(r.probs.sum()) - 1) < 1e-5 for r in decode_rows)


def test_model_is_restored_also_after_an_exception(tiny):
    lm = tiny("gpt2")
    configs_before = lm.model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), hl.capture(lm, **EVERYTHING):
        raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == configs_before
    assert not lm.model._forward_pre_hooks
    for module in lm.model.modules():
        assert not hasattr(module, "_headlab_probe") and not module._forward_pre_hooks


def test_caller_given_segments(tiny):
    lm = tiny("gpt2")
    inputs = lm.tokenizer(["Document one. Document two. Question?"], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    n = len(ids)
    roles = [text_roles(ids, segments=[(1, 4), (4, n - 2)], flagged=[5])]
    _, rec = _capture(lm, inputs, roles=roles)
    stats = rec.head_stats
    assert {"segment_0", "segment_1"} <= set(stats[stats.stat == "mass"].role)
    assert "pos:5" in set(stats[stats.stat == "alpha"].role)


def test_hand_computed_three_token_case():
    """A 3x3 causal pattern with known alpha, entropy, distance and mass, through both engines."""
    probs = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    # q_i . k_j = log P[i, j] with k_j = e_j: softmax over j <= i gives back P.
    q = torch.log(probs.clamp(min=1e-30))[None, None]
    k = torch.eye(3)[None, None]
    v = torch.randn(1, 1, 3, 3)
    ctx = BatchContext(
        tower="lm",
        step=0,
        pass_id=0,
        examples=(0,),
        roles=(text_roles([7, 8, 9]),),
        key_valid=torch.ones(1, 3, dtype=torch.bool),
    )
    spec = hl.Stats(first_k=3)
    alpha_pos = S.alpha_keys(ctx, 3)
    from headlab.kernels.fused import fused_attention

    fspec = S.fused_spec(ctx, spec, n_q=3, scale=1.0, causal=True, keep=None)
    att = fused_attention(q, k, v, fspec)
    fused = S.from_attended(att, ctx, fspec)
    fused.alpha = S.alpha_from_lse(q, k, att.lse, None, scale=1.0, causal=True, ctx=ctx, alpha_pos=alpha_pos)
    explicit = S.from_probs(probs[None, None], ctx, spec, causal=True, alpha_pos=alpha_pos)
    for per_query in (fused, explicit):
        frame = pd.DataFrame(
            S.reduce(per_query, ctx, spec, layer=0, causal=True, alpha_pos=alpha_pos, keep=None)
        )
        got = {(r.stat, r.role): r.value for r in frame.itertuples()}
        assert got["alpha", "pos:0"] == pytest.approx((1 + 0.5 + 0.2) / 3, abs=1e-5)
        assert got["alpha", "pos:1"] == pytest.approx((0.5 + 0.3) / 2, abs=1e-5)
        assert got["alpha", "pos:2"] == pytest.approx(0.5, abs=1e-5)
        h2 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
        assert got["entropy_last", ""] == pytest.approx(h2, abs=1e-5)
        assert got["entropy", ""] == pytest.approx((0 + math.log(2) + h2) / 3, abs=1e-5)
        assert got["distance", ""] == pytest.approx((0 + 0.5 + (0.2 * 2 + 0.3)) / 3, abs=1e-5)
        assert got["distance_rms", ""] == pytest.approx(
            (0 + math.sqrt(0.5) + math.sqrt(0.2 * 4 + 0.3)) / 3, abs=1e-5
        )
        assert got["mass", "bos"] == pytest.approx((1 + 0.5 + 0.2) / 3, abs=1e-5)
        assert got["mass_last", "text"] == pytest.approx(0.8, abs=1e-5)


def test_selection_out_of_range(tiny):
    with (
        pytest.raises(hl.SelectionError, match="layer 7 is out of range"),
        hl.capture(tiny("gpt2"), patterns=hl.Select(layers=[7])),
    ):
        pass
    with (
        pytest.raises(hl.SelectionError, match="head 9"),
        hl.capture(tiny("gpt2"), head_outputs=hl.Select(heads=[9])),
    ):
        pass


def test_query_out_of_range(tiny):
    lm = tiny("gpt2")
    inputs = lm.tokenizer(["short"], return_tensors="pt")
    with pytest.raises(hl.SelectionError, match="query position 500"):
        _capture(lm, inputs, patterns=hl.Select(queries=[500]))


def test_absent_role_is_an_error(tiny):
    lm = tiny("gpt2")
    with pytest.raises(hl.InputError, match=r"'image'.* absent"):
        _capture(lm, inputs_for(lm), stats=hl.Stats(roles=("image",)))


def test_too_long_input_is_an_error(tiny):
    lm = tiny("gpt2")  # learned positions: 256
    ids = torch.randint(5, 100, (1, 300))
    with pytest.raises(hl.InputError, match=r"300 tokens .* at most 256"):
        _capture(lm, {"input_ids": ids})


def test_unsupported_model_is_an_error():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(hl.UnsupportedModelError, match="'bert'"):
        hl.describe(model)


def test_record_renders_in_a_notebook(tiny):
    lm = tiny("gpt2")
    _, rec = _capture(lm, inputs_for(lm))
    assert "headlab Record" in rec._repr_html_() and "<table" in rec._repr_html_()


def test_bfloat16_model_observing_changes_nothing(model_dirs):
    lm = hl.load(model_dirs["llama"], dtype=torch.bfloat16)
    inputs = inputs_for(lm, padding_side="left")
    with torch.no_grad():
        before = logits_of(lm, inputs).float()
    during, _ = _capture(lm, inputs)
    # bfloat16 tolerance: the statistics call runs in float32, the plain one in bfloat16.
    torch.testing.assert_close(during.float(), before, atol=3e-2, rtol=3e-2)


def test_query_selection_for_averages(tiny):
    lm = tiny("gpt2")
    inputs = inputs_for(lm, batch=1)
    _, rec = _capture(lm, inputs, stats=hl.Stats(queries=[-1], which=("mass", "entropy")))
    stats = rec.head_stats
    mean = stats[stats.stat == "mass"].set_index(["layer", "head", "role"]).value
    last = stats[stats.stat == "mass_last"].set_index(["layer", "head", "role"]).value
    pd.testing.assert_series_equal(mean, last, check_names=False)
    assert set(stats.stat) == {"mass", "mass_last", "entropy", "entropy_last"}


def test_a_mask_carrying_a_score_bias_keeps_it_apart():
    """Additive masks are 0 (keep) or very negative (drop); finite non-zero values are a score bias (BEiT's
    relative position bias) that a keep/drop view alone would drop: `score_bias` keeps it."""
    from headlab.probe.call import keep_mask, score_bias

    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 0, 1:] = torch.finfo(torch.float32).min
    keep = keep_mask(mask)
    assert keep.tolist() == [[[[True, False, False], [True, True, True], [True, True, True]]]]
    assert score_bias(mask, keep) is None
    mask[0, 0, 2, 0] = 0.3
    bias = score_bias(mask, keep_mask(mask))
    assert (
        bias[0, 0, 2, 0] == pytest.approx(0.3)
        and bias[0, 0, 0, 1] == 0
        and bias.abs().sum() == pytest.approx(0.3)
    )
