"""ACT (hidden-attention-sink calibration): a hand-computed pattern, the fused engine against the explicit
oracle (random attention with padding and GQA, the zoo LM, generate with a KV cache), the fused column means,
no-op settings, restoring the model, the offline head search and its CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import headlab as hl
from headlab.cli import app
from headlab.interventions import AttentionCall, grouped_attention, intervene, reference_attention
from headlab.interventions.act import ACT, hidden_sinks, received_attention
from headlab.kernels import naive_attention
from headlab.probe.context import BatchContext
from headlab.probe.roles import text_roles
from headlab.runs.act_search import TASKS, search_heads

ZOO_LAYERS = (0, 1)  # the zoo LM has 2 layers: the code's default range (2 .. n-2) is empty
ALL_ZOO_HEADS = tuple((layer, head) for layer in ZOO_LAYERS for head in range(4))


@pytest.fixture(scope="module")
def zoo_lm():
    return hl.load("zoo:lm")


def _call(q, k, v, *, key_valid=None, mask=None, scale=1.0, step=0) -> AttentionCall:
    """A hand-built attention call of layer 0 (queries = the last n_q keys)."""
    batch, n_k = q.shape[0], k.shape[2]
    key_valid = torch.ones(batch, n_k, dtype=torch.bool) if key_valid is None else key_valid
    roles = tuple(text_roles([0] * int(n)) for n in key_valid.sum(-1))
    ctx = BatchContext(
        tower="lm", step=step, pass_id=0, examples=tuple(range(batch)), roles=roles, key_valid=key_valid
    )
    return AttentionCall(nn.Identity(), "lm", 0, q, k, v, mask, scale, True, ctx)


def test_hand_computed_detection_and_calibration(zoo_lm):
    # A causal 4x4 pattern (rows sum to 1):
    #   row 0: [1,    0,    0,    0   ]
    #   row 1: [0.5,  0.5,  0,    0   ]
    #   row 2: [0.45, 0.5,  0.05, 0   ]
    #   row 3: [0.35, 0.5,  0.1,  0.05]
    # column sums 2.3, 1.5, 0.15, 0.05 over 4, 3, 2, 1 queries that see them:
    #   a = [0.575, 0.5, 0.075, 0.05];  tau = 0.1 -> S = {0, 1}; the first (0) is dropped -> S' = {1}.
    # beta = 0.4: key 1 keeps 0.4 of its 0.5 (-> 0.2) and the freed 0.3 goes to the rest (mass 0.5) in
    # proportion, i.e. the rest is scaled by 1 + 0.3 / 0.5 = 1.6:
    #   row 1: [0.8, 0.2, 0, 0]; row 2: [0.72, 0.2, 0.08, 0]; row 3: [0.56, 0.2, 0.16, 0.08]; row 0 stays.
    A = torch.tensor(
        [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.45, 0.5, 0.05, 0], [0.35, 0.5, 0.1, 0.05]], dtype=torch.float64
    )
    expected = torch.tensor(
        [[1.0, 0, 0, 0], [0.8, 0.2, 0, 0], [0.72, 0.2, 0.08, 0], [0.56, 0.2, 0.16, 0.08]], dtype=torch.float32
    )
    # scores = log A with q_i = log A[i, :] and k_j = e_j (scale 1); V = I, so outputs are the rows.
    q = torch.where(A > 0, A.log(), 0.0).float()[None, None]
    k = torch.eye(4)[None, None]
    call = _call(q, k, torch.eye(4)[None, None])
    received = received_attention(call, tile=3)
    torch.testing.assert_close(received[0, 0], torch.tensor([0.575, 0.5, 0.075, 0.05]), atol=1e-6, rtol=0)
    assert hidden_sinks(received).tolist() == [[[False, True, False, False]]]
    patch = ACT(heads=[(0, 0)], layers=[0]).bind(zoo_lm)
    fused = grouped_attention(call, patch.edits(call))
    reference = reference_attention(call, patch.edits(call))
    torch.testing.assert_close(fused[0, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(reference[0, 0], expected, atol=1e-6, rtol=0)


CASES = [
    # batch, heads, kv_heads, n_q, n_k, padding
    (3, 4, 4, 11, 11, "right"),
    (3, 4, 2, 11, 11, "left"),  # GQA
    (2, 4, 2, 1, 12, "left"),  # a decode step: detection on the current row
    (1, 4, 2, 5, 13, "none"),  # chunked prefill: the queries are the last 5 keys
]


def _random_call(batch, heads, kv, n_q, n_k, padding, *, step=0):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, n_q, 8, generator=gen)
    k = torch.randn(batch, kv, n_k, 8, generator=gen)
    k[:, :, 3] += 2.0 * q.mean((1, 2))[:, None]  # a key most queries like: a hidden sink in many heads
    v = torch.randn(batch, kv, n_k, 5, generator=gen)
    valid = torch.ones(batch, n_k, dtype=torch.bool)
    for b in range(batch):
        pads = 2 * b
        if padding == "right" and pads:
            valid[b, -pads:] = False
        elif padding == "left":
            valid[b, :pads] = False
    mask = None if padding == "none" else valid[:, None, None, :].expand(batch, 1, n_q, n_k).clone()
    return _call(q, k, v, key_valid=valid, mask=mask, scale=0.7, step=step)


@pytest.mark.parametrize("case", CASES)
def test_fused_matches_reference_on_random_attention(case, zoo_lm):
    call = _random_call(*case, step=1 if case[3] == 1 else 0)
    heads = case[1]
    act = ACT(heads=[(0, h) for h in range(0, heads, 2)] + [(0, 1)], layers=[0])  # some heads stay plain
    patch = act.bind(zoo_lm)  # the zoo LM's 4 heads per layer; the call is hand-built
    edits = patch.edits(call)
    fused = grouped_attention(call, edits)
    reference = reference_attention(call, patch.edits(call))
    real = (call.query_pos >= 0)[:, None, :, None]
    torch.testing.assert_close(fused * real, reference * real, atol=1e-5, rtol=1e-5)
    assert edits[0].groups[0].any()  # the case really calibrates something
    plain = naive_attention(call.q, call.k, call.v, mask=call.mask, scale=call.scale, causal=True).out
    assert ((fused - plain) * real).abs().max() > 1e-3
    untouched = [h for h in range(heads) if (0, h) not in act.heads]
    torch.testing.assert_close(fused[:, untouched] * real, plain[:, untouched] * real, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_received_attention_is_the_column_mean_of_the_causal_pattern(padding):
    call = _random_call(3, 4, 2, 9, 9, padding)
    fused = received_attention(call, tile=4)  # 3 query tiles
    probs = naive_attention(call.q, call.k, call.v, mask=call.mask, scale=call.scale, causal=True).probs
    for b in range(3):
        valid = call.ctx.key_valid[b]
        n = int(valid.sum())
        explicit = probs[b][:, valid][:, :, valid].sum(1) / torch.arange(n, 0, -1)  # the code's statistic
        torch.testing.assert_close(fused[b][:, valid], explicit, atol=1e-6, rtol=1e-5)
        assert (fused[b][:, ~valid] == 0).all()


def _mixed_batch(lm):
    """Right-padded prompts of different lengths (IOI, colored objects, multi-doc QA)."""
    prompts = [
        e.prompt for name in ("ioi", "colored_objects", "multi_doc_qa") for e in TASKS[name].examples(2, 7)
    ]
    return prompts, lm.tokenizer(prompts, return_tensors="pt", padding=True)


@torch.no_grad()
def test_zoo_lm_fused_matches_reference_and_batches_match_single_examples(zoo_lm):
    prompts, enc = _mixed_batch(zoo_lm)
    real = enc["attention_mask"].bool()
    assert not real.all()  # padded
    act = ACT(heads=ALL_ZOO_HEADS, layers=ZOO_LAYERS)
    plain = zoo_lm.model(**enc).logits
    with intervene(zoo_lm, act) as runner:
        fused = zoo_lm.model(**enc).logits
    with intervene(zoo_lm, act, engine="reference"):
        reference = zoo_lm.model(**enc).logits
    assert (fused - reference)[real].abs().max() < 1e-4
    assert (fused - plain)[real].abs().max() > 0.1  # hidden sinks were found and calibrated
    assert runner.patches[0].hidden[(1, 3)][1] > 0
    with intervene(zoo_lm, act):  # detection is per example: each prompt alone gives the same logits
        for row in (0, 2, 5):
            alone = zoo_lm.model(**zoo_lm.tokenizer(prompts[row], return_tensors="pt")).logits[0]
            assert (alone - fused[row][real[row]]).abs().max() < 1e-4


@torch.no_grad()
def test_settings_that_change_nothing(zoo_lm):
    _, enc = _mixed_batch(zoo_lm)
    real = enc["attention_mask"].bool()
    plain = zoo_lm.model(**enc).logits
    with intervene(zoo_lm, ACT(heads=())):
        assert torch.equal(zoo_lm.model(**enc).logits, plain)
    for act in (
        ACT(heads=ALL_ZOO_HEADS, layers=ZOO_LAYERS, beta=1.0),  # sinks keep all their attention
        ACT(heads=ALL_ZOO_HEADS, layers=ZOO_LAYERS, tau=1.0),  # no key receives a mean attention > 1
    ):
        with intervene(zoo_lm, act):
            assert (zoo_lm.model(**enc).logits - plain)[real].abs().max() < 1e-4


@torch.no_grad()
def test_generate_with_a_kv_cache(zoo_lm):
    prompts = [e.prompt for e in TASKS["colored_objects"].examples(2, 3)]  # same length: no padding
    enc = zoo_lm.tokenizer(prompts, return_tensors="pt")
    kw = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    act = ACT(heads=ALL_ZOO_HEADS, layers=ZOO_LAYERS)
    plain = zoo_lm.model.generate(**enc, **kw)
    with intervene(zoo_lm, act):
        fused = zoo_lm.model.generate(**enc, **kw)
    with intervene(zoo_lm, act, engine="reference"):
        reference = zoo_lm.model.generate(**enc, **kw)
    assert torch.equal(fused.sequences, reference.sequences)
    for a, b in zip(fused.scores, reference.scores, strict=True):
        assert (a - b).abs().max() < 1e-4
    assert max((a - b).abs().max() for a, b in zip(fused.scores, plain.scores, strict=True)) > 0.1


def test_the_model_is_restored_after_an_exception(zoo_lm):
    _, enc = _mixed_batch(zoo_lm)
    with torch.no_grad():
        plain = zoo_lm.model(**enc).logits
    before = zoo_lm.model.config._attn_implementation
    with (
        pytest.raises(RuntimeError, match="boom"),
        intervene(zoo_lm, ACT(heads=ALL_ZOO_HEADS, layers=ZOO_LAYERS)),
    ):
        with torch.no_grad():
            zoo_lm.model(**enc)
        raise RuntimeError("boom")
    assert zoo_lm.model.config._attn_implementation == before
    assert not any(hasattr(m, "_headlab_runner") for m in zoo_lm.model.modules())
    with torch.no_grad():
        assert torch.equal(zoo_lm.model(**enc).logits, plain)


def test_bad_settings_are_clear_errors(zoo_lm):
    with pytest.raises(hl.SelectionError, match="beta"):
        ACT(heads=(), beta=1.5)
    with pytest.raises(hl.SelectionError, match="layers=range"):  # the code's layers: none of a 2-layer model
        ACT(heads=[(0, 1)]).bind(zoo_lm)
    with pytest.raises(hl.SelectionError, match="out of range"):
        ACT(heads=[(0, 7)], layers=ZOO_LAYERS).bind(zoo_lm)
    with pytest.raises(hl.SelectionError, match="--layers all"):
        search_heads(zoo_lm, [1], lambda lm, ex: 0.0)


def test_search_on_a_tiny_calibration_set(zoo_lm):
    task = TASKS["colored_objects"]
    calls = []
    result = search_heads(
        zoo_lm, task.examples(16, 30_000), task.accuracy, layers=[1], progress=lambda *a: calls.append(a)
    )
    table = result.table
    assert list(table.columns) == ["layer", "head", "accuracy", "delta", "kept", "hidden_sinks"]
    assert list(zip(table["layer"], table["head"], strict=True)) == [(1, h) for h in range(4)]
    assert calls == [(i, 4) for i in range(1, 5)]
    assert table.accuracy.between(0, 1).all() and 0 <= result.baseline <= 1
    assert (table.delta - (table.accuracy - result.baseline)).abs().max() < 1e-12
    assert (table.kept == (table.delta > 0)).all()
    assert result.kept == tuple((1, int(h)) for h in table[table.kept]["head"])
    assert (table.hidden_sinks >= 0).all() and table.hidden_sinks.max() > 0
    assert result.act().heads == result.kept and result.act().layers == (1,)


def test_cli_act_search(tmp_path):
    runner = CliRunner()
    out = tmp_path / "heads.csv"
    args = ["act", "search", "--model", "zoo:lm", "--task", "colored_objects", "--n", "8", "--layers", "1"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "heads kept" in result.output
    assert len(pd.read_csv(out)) == 4
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "h.json"), "--eval-n", "8"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "h.json").read_text())
    assert set(saved["held_out"]) == {"n", "seed", "plain", "act"} and len(saved["heads"]) == 4
    for bad, message in (
        (["--task", "nope"], "no ACT task named"),
        (["--out", str(tmp_path / "x.txt")], ".csv or .json"),
        (["--layers", "code"], "--layers all"),
        (["--n", "0"], "at least one"),
    ):
        argv = [*args, "--out", str(out), *bad]
        result = runner.invoke(app, argv)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, argv


@torch.no_grad()
def test_soft_capped_attention_gemma2_fused_equals_reference(tiny):
    """Gemma 2 (soft-capped scores): ACT's detection takes the tiled path (the transposed column sums need
    scores linear in q), its edit and a head scale equal the explicit reference engine; an untouched layer
    runs as plain soft-capped attention."""
    from conftest import assert_close_at_real_tokens, inputs_for

    lm = tiny("gemma2")
    inputs = inputs_for(lm, padding_side="left")
    base = lm.model(**inputs).logits
    plan = (ACT(heads=[(1, h) for h in range(4)], layers=[1], tau=0.05), hl.HeadScale(((1, 2),), 2.0))
    # layer 0 is touched by neither: it runs as plain soft-capped attention (SDPA cannot soft-cap)
    with intervene(lm, hl.HeadScale(((1, 2),), 1.0)):  # a no-op on layer 1: transformers' eager result
        assert_close_at_real_tokens(lm.model(**inputs).logits, base, inputs)
    out = {}
    for engine in ("fused", "reference"):
        with intervene(lm, *plan, engine=engine) as runner:
            out[engine] = lm.model(**inputs).logits
            assert sum(found for _, found in runner.patches[0].hidden.values()) > 0  # sinks were calibrated
    assert_close_at_real_tokens(out["fused"], out["reference"], inputs, tol=1e-4)
    real = inputs["attention_mask"].bool()
    assert (out["fused"] - base)[real].abs().max() > 1e-2
