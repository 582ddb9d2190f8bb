"""PINE: the position re-assignment matches the paper's worked example; the fused engine equals the literal
per-query reference (random q/k/v, a tiny GQA Llama with scaled RoPE, the zoo LM, decode with a KV cache);
with PINE the next-token logits do not depend on the order of the segments while plain attention's do;
generation with a cache equals recomputation; the model is restored; bad input gets headlab errors."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import transformers as tf
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import headlab as hl
from headlab.compat import cache_of, with_cache
from headlab.datasets import synthetic
from headlab.interventions import intervene
from headlab.interventions.pine import (
    PINE,
    Segments,
    model_rotary,
    pine_attention,
    pine_inputs,
    reassigned_positions,
    rotate,
    segment_ranks,
    token_ranks,
    unrotate,
)
from headlab.probe.roles import text_roles
from headlab.runs.pine_eval import judge_bias, judge_flip_rate, judge_parts

TOL = 1e-4


@pytest.fixture(scope="module")
def zoo_lm():
    return hl.load("zoo:lm")


@pytest.fixture(scope="module")
def gqa_lm():
    """A tiny random Llama with grouped-query attention (4 heads, 2 kv heads) and linearly scaled RoPE."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    return hl.describe(tf.LlamaForCausalLM(config).eval())


def _rope(d: int, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)

    def rotary(pos):
        freqs = pos[..., None].float() * inv
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos(), emb.sin()

    return rotary


def _docs(seed: int = 3, gold: int = 1):
    ex = synthetic.multi_doc_qa(1, k=4, gold=gold, seed=seed)[0]
    docs = re.findall(r"Document \[\d+\]: [^.]*\.", ex.prompt)
    return "", docs, ex.prompt[ex.prompt.index(docs[-1]) + len(docs[-1]) :].strip()


@torch.no_grad()
def _logits(lm, prefix, segments, suffix, *, pine: bool = False, **kw):
    """Logits [n, vocab] of the prompt built by pine_inputs, plain or with PINE(spans, **kw)."""
    inputs, spans = pine_inputs(lm.tokenizer, prefix, segments, suffix)
    if not pine:
        return lm.model(**inputs).logits[0]
    with intervene(lm, PINE(spans=spans, **kw)):
        return lm.model(**inputs).logits[0]


def test_position_reassignment_matches_the_worked_example():
    # P = 3, lengths (2, 3, 1), a query in segment 1 ranking [1, 0, 2]: seg1 = 6,7,8; seg0 = 4,5; seg2 = 3
    assert reassigned_positions(3, (2, 3, 1), (1, 0, 2)) == [0, 1, 2, 4, 5, 6, 7, 8, 3]
    # segment 0's view, input order: seg0 = 7,8 (base, nearest), seg1 shifted by 2 = 4,5,6, seg2 by 5 = 3
    assert reassigned_positions(3, (2, 3, 1), (0, 1, 2)) == [0, 1, 2, 7, 8, 4, 5, 6, 3]
    # the reverse of the input order tiles the segments in input order
    assert reassigned_positions(3, (2, 3, 1), (2, 1, 0)) == list(range(9))
    with pytest.raises(hl.InputError, match="permutation"):
        reassigned_positions(3, (2, 3, 1), (0, 0, 2))


def test_rankings_follow_importance_by_hand():
    # prefix 1, three one-token segments, keys along e0 with scores 0, 2, 4 against a query along e0
    seg = Segments(((1, 2), (2, 3), (3, 4)))
    k = torch.zeros(1, 5, 4)
    k[0, 2, 0], k[0, 3, 0] = 2.0, 4.0
    q = torch.zeros(1, 3, 4)
    q[0, :, 0] = 1.0
    assert token_ranks(q[:, :1], k, seg, 1.0).tolist() == [[[2, 1, 0]]]  # most important first
    assert token_ranks(q[:, :1], k, seg, 1.0, order="reversed").tolist() == [[[0, 1, 2]]]
    # from each segment: itself first, then the others by importance
    assert segment_ranks(q, k, seg, 1.0).tolist() == [[[0, 2, 1], [1, 2, 0], [2, 1, 0]]]
    k[0, 2, 0] = 0.0  # a tie between segments 0 and 1 keeps the input order (stable sort)
    assert token_ranks(q[:, :1], k, seg, 1.0).tolist() == [[[2, 0, 1]]]


def test_rotation_is_the_models_rope_and_inverts_exactly(gqa_lm):
    rotary = model_rotary(gqa_lm)
    x = torch.randn(2, 4, 7, 8)
    pos = torch.randint(0, 50, (7,))
    cos, sin = gqa_lm.model.model.rotary_emb(x, pos[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(rotate(x, pos, rotary), expected, atol=1e-6)
    assert torch.allclose(unrotate(expected, pos, rotary), x, atol=1e-5)


@pytest.mark.parametrize("lengths", [(3, 4), (3, 1, 4), (2, 2, 2, 5)])
@pytest.mark.parametrize(("importance", "order"), [("mean", "closer"), ("sum", "reversed")])
def test_fused_equals_the_per_query_reference_on_random_qkv(lengths, importance, order):
    g = torch.Generator().manual_seed(len(lengths))
    H, d, P, suffix = 3, 8, 2, 3
    spans = [(P + sum(lengths[:i]), P + sum(lengths[: i + 1])) for i in range(len(lengths))]
    N = spans[-1][1] + suffix
    q, k, v = (torch.randn(H, N, d, generator=g) for _ in range(3))
    rotary = _rope(d)
    kw = dict(spans=spans, scale=d**-0.5, rotary=rotary, importance=importance, order=order)
    prefill = torch.arange(N)
    fused = pine_attention(q, k, v, query_pos=prefill, engine="fused", **kw)
    reference = pine_attention(q, k, v, query_pos=prefill, engine="reference", **kw)
    assert (fused - reference).abs().max() < 1e-5
    decode = torch.tensor([N - 1])  # a decode step: one generated token over the cached keys
    fused = pine_attention(q[:, -1:], k, v, query_pos=decode, engine="fused", **kw)
    reference = pine_attention(q[:, -1:], k, v, query_pos=decode, engine="reference", **kw)
    assert (fused - reference).abs().max() < 1e-5
    # prefix queries: ordinary causal attention over the prefix at raw positions
    prefix_rows = pine_attention(q[:, :P], k, v, query_pos=prefill[:P], **kw)
    qr, kr = rotate(q[:, :P], prefill[:P], rotary), rotate(k[:, :P], prefill[:P], rotary)
    later = torch.ones(P, P, dtype=torch.bool).triu(1)
    causal = torch.softmax((qr @ kr.mT * d**-0.5).masked_fill(later, float("-inf")), -1) @ v[:, :P]
    assert torch.allclose(prefix_rows, causal, atol=1e-6)


def test_fused_equals_reference_on_models(zoo_lm, gqa_lm):
    for item in (judge_parts(synthetic.pairwise_judge(1, seed=1)[0].prompt), _docs()):
        fused = _logits(zoo_lm, *item, pine=True)
        reference = _logits(zoo_lm, *item, pine=True, engine="reference")
        assert (fused - reference).abs().max() < TOL
    ids = torch.randint(4, 64, (1, 22), generator=torch.Generator().manual_seed(1))
    spans = ((2, 7), (7, 9), (9, 17))
    with torch.no_grad():
        with intervene(gqa_lm, PINE(spans=spans)):
            fused = gqa_lm.model(input_ids=ids).logits
        with intervene(gqa_lm, PINE(spans=spans), engine="reference"):  # PINE follows intervene's engine
            reference = gqa_lm.model(input_ids=ids).logits
    assert (fused - reference).abs().max() < TOL


def test_next_token_logits_do_not_depend_on_segment_order(zoo_lm, gqa_lm):
    prefix, docs, suffix = _docs()
    base = _logits(zoo_lm, prefix, docs, suffix, pine=True)[-1]
    plain = _logits(zoo_lm, prefix, docs, suffix)[-1]
    for perm in list(itertools.permutations(range(4)))[1::5]:
        moved = [docs[i] for i in perm]
        assert (_logits(zoo_lm, prefix, moved, suffix, pine=True)[-1] - base).abs().max() < TOL
        assert (_logits(zoo_lm, prefix, moved, suffix)[-1] - plain).abs().max() > 1e-2
    # random weights, GQA, segments of unequal length: the invariance is structural
    g = torch.Generator().manual_seed(2)
    pieces = [torch.randint(4, 64, (n,), generator=g) for n in (3, 5, 2, 4, 6)]  # prefix, 3 segments, suffix
    outs = {}
    for name, order in (("input", (1, 2, 3)), ("moved", (3, 1, 2))):
        ids = torch.cat([pieces[0], *(pieces[i] for i in order), pieces[4]])[None]
        bounds = torch.tensor([3, *(len(pieces[i]) for i in order)]).cumsum(0).tolist()
        spans = tuple(itertools.pairwise(bounds))
        with torch.no_grad():
            plain_logits = gqa_lm.model(input_ids=ids).logits[0, -1]
            with intervene(gqa_lm, PINE(spans=spans)):
                outs[name] = (gqa_lm.model(input_ids=ids).logits[0, -1], plain_logits)
    assert (outs["input"][0] - outs["moved"][0]).abs().max() < TOL
    assert (outs["input"][1] - outs["moved"][1]).abs().max() > 1e-3


def test_generate_with_a_kv_cache_equals_recomputation_and_the_reference(zoo_lm):
    inputs, spans = pine_inputs(zoo_lm.tokenizer, *_docs())
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    runs = {}
    with torch.no_grad():
        for name, pine, cache in (
            ("cached", PINE(spans=spans), True),
            ("recomputed", PINE(spans=spans), False),
        ):
            with intervene(zoo_lm, pine):
                runs[name] = zoo_lm.model.generate(**inputs, use_cache=cache, **kw)
        with intervene(zoo_lm, PINE(spans=spans, engine="reference")):
            runs["reference"] = zoo_lm.model.generate(**inputs, **kw)
    cached = runs.pop("cached")
    for other in runs.values():
        assert torch.equal(cached.sequences, other.sequences)
        for a, b in zip(cached.scores, other.scores, strict=True):
            assert (a - b).abs().max() < TOL


def test_padded_batch_with_per_row_segments_from_roles_equals_rows_alone(zoo_lm):
    tok = zoo_lm.tokenizer
    items = [judge_parts(e.prompt) for e in synthetic.pairwise_judge(2, seed=4)]
    (in0, s0), (in1, s1) = pine_inputs(tok, *items[0]), pine_inputs(tok, "Question:", *items[1][1:])
    n0, n1 = in0["input_ids"].shape[1], in1["input_ids"].shape[1]
    ids = torch.full((2, n0), tok.pad_token_id)
    mask = torch.zeros(2, n0, dtype=torch.long)
    ids[0], mask[0] = in0["input_ids"][0], 1
    ids[1, n0 - n1 :], mask[1, n0 - n1 :] = in1["input_ids"][0], 1  # left padding
    roles = [
        text_roles(in0["input_ids"][0].tolist(), segments=s0),
        text_roles(in1["input_ids"][0].tolist(), segments=s1),
    ]
    with torch.no_grad(), intervene(zoo_lm, PINE()) as runner:
        runner.contexts.use_roles(roles)
        batch = zoo_lm.model(input_ids=ids, attention_mask=mask).logits
    assert (batch[0] - _logits(zoo_lm, *items[0], pine=True)).abs().max() < TOL
    assert (batch[1, n0 - n1 :] - _logits(zoo_lm, "Question:", *items[1][1:], pine=True)).abs().max() < TOL


def test_model_is_restored_after_the_block_and_after_an_exception(zoo_lm):
    inputs, spans = pine_inputs(zoo_lm.tokenizer, *_docs())
    with torch.no_grad():
        before = zoo_lm.model(**inputs).logits
        with intervene(zoo_lm, PINE(spans=spans)):
            changed = zoo_lm.model(**inputs).logits
        assert (changed - before).abs().max() > 1e-2
        assert torch.equal(zoo_lm.model(**inputs).logits, before)
        with pytest.raises(RuntimeError, match="boom"), intervene(zoo_lm, PINE(spans=spans)):
            zoo_lm.model(**inputs)
            raise RuntimeError("boom")
        assert torch.equal(zoo_lm.model(**inputs).logits, before)
    assert zoo_lm.model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_headlab_runner") for m in zoo_lm.model.modules())


def test_clear_errors_for_bad_input(zoo_lm):
    for bad, what in [
        (((1, 3),), "at least two"),
        (((1, 4), (3, 6)), "overlap"),
        (((1, 3), (4, 6)), "between two segments"),
        (((2, 2), (2, 4)), "empty"),
    ]:
        with pytest.raises(hl.InputError, match=what):
            PINE(spans=bad)
    with pytest.raises(hl.SelectionError, match="engine"):
        PINE(spans=((1, 2), (2, 3)), engine="fast")
    with pytest.raises(hl.InputError, match="nested"):
        pine_inputs(zoo_lm.tokenizer, "Question:", ["Response A: 1", ["Response B:", "2"]], "Answer:")
    inputs, _ = pine_inputs(zoo_lm.tokenizer, "Question:", ["Response A: 1", "Response B: 2"], "Answer:")
    with torch.no_grad():
        with (
            pytest.raises(hl.InputError, match="end at token 40"),
            intervene(zoo_lm, PINE(spans=((2, 5), (5, 40)))),
        ):
            zoo_lm.model(**inputs)
        with pytest.raises(hl.InputError, match="needs segments"), intervene(zoo_lm, PINE()):
            zoo_lm.model(**inputs)
        cache = cache_of(zoo_lm.model(input_ids=inputs["input_ids"][:, :3], use_cache=True))
        # a cache made outside the block is refused with a clear message
        with (
            pytest.raises(hl.InputError, match="built outside the headlab block"),
            intervene(zoo_lm, PINE(spans=((2, 5), (5, 9)))),
        ):
            zoo_lm.model(input_ids=inputs["input_ids"][:, 3:], **with_cache(cache))
    gpt2 = hl.describe(tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))
    with (
        pytest.raises(hl.UnsupportedModelError, match="no rotary embedding"),
        intervene(gpt2, PINE(spans=((1, 2), (2, 3)))),
    ):
        pass


def test_judge_verdicts_never_flip_with_pine(zoo_lm):
    assert judge_flip_rate(zoo_lm, 20, pine=False) > 0.5  # the zoo LM names the first block's label
    assert judge_flip_rate(zoo_lm, 20, pine=True) == 0.0
    pine, plain = judge_bias(zoo_lm, 20, pine=True), judge_bias(zoo_lm, 20, pine=False)
    assert pine.margin_shift < TOL < plain.margin_shift
