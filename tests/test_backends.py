"""TransformerLens 4 and nnsight produce the same records as headlab's fused capture."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_stats, inputs_for

import headlab as hl
from headlab.probe.backends import capture_nnsight, capture_transformer_lens

KEYS = ["example", "tower", "step", "layer", "head", "stat", "role"]
SEL = dict(
    patterns=hl.Select(layers=[1], heads=[0, 3], queries=[0, -1]), head_outputs=hl.Select(heads=[1, 2])
)


def _fused(lm, inputs):
    with torch.no_grad(), hl.capture(lm, **SEL) as rec:
        lm.model(**inputs)
    return rec


def _agree(a: hl.Record, b: hl.Record) -> None:
    merged = a.head_stats.merge(b.head_stats, on=KEYS, suffixes=("_a", "_b"), validate="one_to_one")
    assert len(merged) == len(a.head_stats) == len(b.head_stats) > 0
    assert (merged.value_a - merged.value_b).abs().max() < 2e-4
    assert len(a.patterns) == len(b.patterns) > 0
    for x, y in zip(a.patterns, b.patterns, strict=True):
        assert (x.example, x.layer, x.head, x.queries) == (y.example, y.layer, y.head, y.queries)
        torch.testing.assert_close(x.probs, y.probs, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.head_outputs, b.head_outputs, strict=True):
        torch.testing.assert_close(x.z, y.z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformer_lens_agrees_with_fused(tiny, name):
    lm = tiny(name)
    inputs = inputs_for(lm, batch=1)
    _agree(_fused(lm, inputs), capture_transformer_lens(lm, inputs, **SEL))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_nnsight_agrees_with_fused(tiny, name, padding_side):
    lm = tiny(name)
    inputs = inputs_for(lm, padding_side=padding_side)
    _agree(_fused(lm, inputs), capture_nnsight(lm, inputs, **SEL))
    assert lm.model.config._attn_implementation == "sdpa"  # switched back


def test_backends_refuse_lvlms(tiny):
    with pytest.raises(hl.UnsupportedModelError, match="text LLMs"):
        capture_nnsight(tiny("llava"), {})


def test_nnsight_with_a_weightless_description_and_the_model_to_trace(tmp_path):
    """The NDIF workflow, run locally: `lm` is described from a meta-device skeleton of the config (no
    weights), and the model traced is another object (on NDIF: LanguageModel(hub id), remote=True)."""
    import transformers as tf
    from nnsight import NNsight

    from headlab.zoo.random_models import build_random

    path = build_random("llama", tmp_path / "llama")
    with torch.device("meta"):
        skeleton = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(path))
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    lm = hl.describe(skeleton, source="skeleton", processor=tokenizer)
    inputs = dict(tokenizer(["The quick brown fox jumps"], return_tensors="pt"))
    traced = tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    rec = capture_nnsight(lm, inputs, model=NNsight(traced))
    whole = hl.load(path)
    with torch.no_grad(), hl.capture(whole) as ref:
        whole.model(**inputs)
    assert_same_stats(rec.head_stats, ref.head_stats, atol=1e-5)
    sdpa = tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    with pytest.raises(hl.UnsupportedModelError, match="no attention weights"):
        capture_nnsight(lm, inputs, model=NNsight(sdpa))
