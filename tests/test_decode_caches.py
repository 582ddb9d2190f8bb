"""Generation under capture and intervene with every KV cache transformers uses: sliding-window caches that
evict keys (Mistral), hybrid caches of sliding and full layers (Gemma 2 with soft-caps, Gemma 3 text) and
static caches (`cache_implementation="static"`, unfilled slots masked), on a left-padded batch whose
prompt plus generated tokens outgrow the window.

The oracle for every decode step is HF eager attention over the whole generated sequence (no cache, its
own sliding-window mask): the captured row of each step must equal that sequence's row at the step's
query, keys a cache evicted included (they get 0 there as in the cached step), and the statistics must
be those of that row."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

import headlab as hl
from headlab.interventions.act import ACT
from headlab.interventions.heads import HeadScale
from headlab.interventions.pine import PINE
from headlab.loading import describe
from headlab.probe.keys import call_keys, token_validity

VOCAB, PAD, WINDOW = 128, 0, 4
PROMPT, NEW = 6, 5  # prompt columns (example 1 has 2 of them padding) and generated tokens
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD,
)
CONFIGS = {
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(sliding_window=WINDOW, **SIZES)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(
        tf.Gemma2Config(
            sliding_window=WINDOW,
            attn_logit_softcapping=2.0,  # low, so that the cap binds on random weights
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=8,
            **SIZES,
        )
    ),
    "gemma3": lambda: tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(
            sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], **SIZES
        )
    ),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SIZES)),
}
CASES = [
    ("mistral", None),
    ("mistral", "static"),
    ("gemma2", None),
    ("gemma2", "static"),
    ("gemma3", None),
    ("llama", "static"),
]
_BUILT: dict[str, hl.LoadedModel] = {}


def _model(name: str) -> hl.LoadedModel:
    """The tiny random model `name`, built once (seeded) and wrapped by describe()."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = describe(CONFIGS[name]().eval())
    return _BUILT[name]


def _prompt(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of two prompts: 6 tokens, and 4 tokens after 2 padding columns (batch=1: the
    first alone, unpadded)."""
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0
    return ids[:batch], mask[:batch]


def _generate(lm: hl.LoadedModel, cache: str | None, batch: int = 2, **extra):
    ids, mask = _prompt(batch)
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=PAD, **extra)
    if cache is not None:
        kwargs["cache_implementation"] = cache
    with torch.no_grad():
        return lm.model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def _eager_rows(model, seq: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every layer's [batch, head, n, n] pattern of HF eager attention over the whole sequence, positions
    as generate() gives them (left padding)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(
                input_ids=seq,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
                output_attentions=True,
            )
    finally:
        model.set_attn_implementation(before)
    return out.attentions


def _row_stats(row: torch.Tensor, n_prompt: int) -> dict[tuple[str, str], float]:
    """A decode step's statistics from its explicit row [n] over example positions (query = the last)."""
    pos = torch.arange(len(row), dtype=torch.float32)
    roles = {"bos": row[:1], "text": row[1:n_prompt], "answer": row[n_prompt:]}
    got = {("mass_last", r): float(p.sum()) for r, p in roles.items()}
    got["entropy_last", ""] = float(-torch.special.xlogy(row, row).sum())
    got["distance", ""] = float((row * (pos[-1] - pos)).sum())
    got["distance_rms", ""] = math.sqrt(float((row * (pos[-1] - pos) ** 2).sum()))
    return got


@pytest.mark.parametrize("name,cache", CASES, ids=[f"{n}-{c or 'dynamic'}" for n, c in CASES])
def test_decode_steps_equal_eager_attention(name, cache):
    lm = _model(name)
    plain = _generate(lm, cache)
    with hl.capture(lm, patterns=hl.Select(queries=[-1])) as rec:
        captured = _generate(lm, cache)
    assert torch.equal(captured, plain)  # capture changes no generated token

    mask = _prompt()[1]
    full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], 1)
    eager = _eager_rows(lm.model, captured, full_mask)
    stats = rec.head_stats.set_index(["example", "step", "layer", "head", "stat", "role"]).value
    assert sorted({r.step for r in rec.patterns}) == list(range(NEW))
    assert len(rec.patterns) == NEW * 2 * 2 * 4  # steps x examples x layers x heads
    for rows in rec.patterns:
        b, col = rows.example, PROMPT - 1 + rows.step  # the step's query column
        real = full_mask[b, : col + 1].bool()
        want = eager[rows.layer][b, rows.head, col, : col + 1][real]  # over example positions
        assert rows.queries == (len(want) - 1,)
        torch.testing.assert_close(rows.probs[0], want, atol=1e-5, rtol=1e-5)
        if rows.step == 0:
            continue
        n_prompt = int(mask[b].sum())
        for (stat, role), value in _row_stats(want, n_prompt).items():
            got = stats[b, rows.step, rows.layer, rows.head, stat, role]
            assert got == pytest.approx(value, abs=2e-4, rel=1e-4), (stat, role, rows)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_evicted_keys_get_no_attention(name):
    """Once the window slides past the first token, it is gone from layer 0's cache (a sliding layer): its
    mass is 0 by definition, as in eager attention; Gemma 2's full layer 1 still sees it."""
    lm = _model(name)
    with hl.capture(lm, stats=hl.Stats(which=("mass",)), patterns=hl.Select(queries=[-1])) as rec:
        _generate(lm, None)
    stats = rec.head_stats
    last = stats[(stats.step == NEW - 1) & (stats.stat == "mass_last") & (stats.role == "bos")]
    assert (last[last.layer == 0].value == 0).all() and len(last[last.layer == 0]) == 2 * 4
    rows = [r for r in rec.patterns if r.step == NEW - 1 and r.layer == 0]
    assert len(rows) == 2 * 4  # examples x heads
    for r in rows:  # the query at position p sees p - WINDOW + 1 .. p only
        assert r.probs.shape[1] == r.queries[0] + 1
        assert float(r.probs[0, :-WINDOW].abs().max()) == 0.0
        assert float(r.probs[0, -WINDOW:].sum()) == pytest.approx(1.0, abs=1e-5)
    if name == "gemma2":
        assert (last[last.layer == 1].value > 0).all()


def _scaled_o_proj(model, heads, factor):
    """Multiply the o_proj input columns of `heads` [(layer, head)] by `factor` in place; returns an undo."""
    layers = model.model.layers
    saved = {layer: layers[layer].self_attn.o_proj.weight.detach().clone() for layer, _ in heads}
    d = model.config.head_dim
    with torch.no_grad():
        for layer, head in heads:
            layers[layer].self_attn.o_proj.weight[:, head * d : (head + 1) * d] *= factor

    def undo():
        with torch.no_grad():
            for layer, weight in saved.items():
                layers[layer].self_attn.o_proj.weight.copy_(weight)

    return undo


@pytest.mark.parametrize(
    "name,cache,batch",
    [("mistral", None, 2), ("gemma2", None, 2), ("gemma2", "static", 2), ("gemma2", "static", 1)],
)
def test_head_scale_in_decode_equals_scaled_weights(name, cache, batch):
    """HeadScale under generate (fused and reference engines) equals plain generation with the scaled
    heads' o_proj columns scaled: an oracle that shares nothing with headlab's attention. One layer is
    scaled, the other runs headlab's plain attention (Gemma 2: a soft-capped full layer; unpadded into a
    static cache, its prefill comes without a mask, i.e. SDPA's top-left causal over the cache slots)."""
    lm = _model(name)
    heads, factor = {"mistral": ((1, 2),), "gemma2": ((0, 1), (0, 2))}[name], 0.25
    kwargs = dict(output_scores=True, return_dict_in_generate=True)
    undo = _scaled_o_proj(lm.model, heads, factor)
    try:
        want = _generate(lm, cache, batch, **kwargs)
    finally:
        undo()
    for engine in ("fused", "reference"):
        with hl.intervene(lm, HeadScale(heads, factor=factor), engine=engine):
            got = _generate(lm, cache, batch, **kwargs)
        assert torch.equal(got.sequences, want.sequences), engine
        for a, b in zip(got.scores, want.scores, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_act_in_decode_equals_its_reference(name):
    """ACT (a post-softmax group edit) on windowed caches: fused equals the paper's rule on explicit rows,
    and it does change the output."""
    lm = _model(name)
    act = ACT(heads=((0, 0), (0, 3), (1, 1)), layers=range(2), tau=0.2)
    kwargs = dict(output_scores=True, return_dict_in_generate=True)
    plain = _generate(lm, None, **kwargs)
    runs = {}
    for engine in ("fused", "reference"):
        with hl.intervene(lm, act, engine=engine):
            runs[engine] = _generate(lm, None, **kwargs)
    fused, ref = runs["fused"], runs["reference"]
    assert torch.equal(fused.sequences, ref.sequences)
    for a, b in zip(fused.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(fused.scores, plain.scores, strict=True))


def test_pine_refuses_a_cache_that_evicted_keys():
    """PINE re-ranks every key by position: a prompt inside the window is fine, a decode step whose cache
    dropped the first token is refused with the reason."""
    lm = _model("mistral")
    ids = torch.randint(3, VOCAB, (1, WINDOW), generator=torch.Generator().manual_seed(2))
    pine = PINE(spans=((1, 2), (2, 3)))
    with (
        pytest.raises(hl.UnsupportedModelError, match=r"evicted the first \d+ token columns"),
        torch.no_grad(),
        hl.intervene(lm, pine),
    ):
        lm.model.generate(
            input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD
        )


def test_call_keys_map_every_layout_to_the_last_columns():
    """Hand-made layouts: a static cache's unfilled slots are dropped (mask columns too); a sliding window
    that evicted columns keeps its keys and counts what it dropped; an exact fit is left alone."""
    k = torch.arange(10.0).view(1, 1, 10, 1)
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    k2, v2, m2, start = call_keys(k, -k, mask, columns=7, n_q=1)  # static: 10 slots, 7 tokens
    assert (
        k2.flatten().tolist() == list(range(7)) == (-v2).flatten().tolist()
        and m2.shape[-1] == 7
        and start == 0
    )
    k3, _, m3, start = call_keys(k[:, :, -4:], k[:, :, -4:], mask[..., -4:], columns=9, n_q=1)  # window
    assert k3.shape[2] == 4 and m3.shape[-1] == 4 and start == 5
    assert call_keys(k, k, None, columns=10, n_q=10)[3] == 0
    with pytest.raises(hl.InputError, match="3 queries"):
        call_keys(k, k, None, columns=2, n_q=3)


def test_token_validity_from_2d_4d_and_per_layer_masks():
    padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert token_validity(padded, batch=2, past=0, n_new=3, previous=None).tolist() == padded.bool().tolist()
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    causal[0, :, :, 0] = False  # example 0: column 0 is padding, hidden from every query
    unfilled = torch.zeros(2, 1, 3, 2, dtype=torch.bool)  # two static-cache slots beyond the tokens
    keep = torch.cat([causal, unfilled], -1)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    for mask in (causal, additive, {"sliding_attention": None, "full_attention": causal}):
        got = token_validity(mask, batch=2, past=0, n_new=3, previous=None)
        assert got.tolist() == padded.bool().tolist()
    step = token_validity({"full_attention": None}, batch=2, past=3, n_new=1, previous=padded.bool())
    assert step.tolist() == [[False, True, True, True], [True, True, True, True]]
    with pytest.raises(hl.InputError, match="no prefill"):
        token_validity(causal, batch=2, past=3, n_new=1, previous=None)
