"""The LLM coverage matrix (headlab.models.matrix): every entry's tiny random model, built from its real
config class, saved with save_pretrained and loaded back with `hl.load`, is served as declared.

Served types: discovered as declared (no adapter needed, head counts, windows, soft-cap), patterns equal
HF eager attention, logits unchanged by capture, statistics equal the reference engine, the store round
trip rebuilds eager's patterns, generation with a KV cache is captured (sliding-window caches included),
head scaling / ablation, PINE where declared. Refused types: a clear
UnsupportedModelError saying why. The README's "Coverage matrix" table is the one these entries print.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import assert_close_at_real_tokens, assert_same_stats, eager_attentions

import headlab as hl
from headlab import models
from headlab.compat import TRANSFORMERS_VERSION
from headlab.models import matrix
from headlab.models.matrix import Route
from headlab.store import Store
from headlab.zoo.random_models import build_random

ENTRIES = matrix.entries(hl.Family.LLM)
SERVED = [e for e in ENTRIES if e.served]
REFUSED = [e for e in ENTRIES if not e.served]
PROMPTS = ["Is there a cat in the image?", "Yes."]  # 16 and 4 tokens
KEYS = ["example", "tower", "step", "layer", "head", "stat", "role"]
# PINE runs on these without refusing but is not position-invariant: it rotates with rotate_half, they
# interleave RoPE's pairs (headlab/interventions/pine.py should refuse them, or rotate their way)
# what each refusal says
REASONS = {Route.EAGER_ONLY: "only eagerly or through its own SDPA call", Route.SINKS: "attention sinks"}


def _ids(entries):
    return [e.model_type for e in entries]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """model type -> its tiny random model's directory (built once per module, on first use)."""
    root, paths = tmp_path_factory.mktemp("matrix"), {}

    def get(entry) -> Path:
        if entry.model_type not in paths:
            paths[entry.model_type] = build_random(entry.random_builder, root / entry.model_type)
        return paths[entry.model_type]

    return get


@pytest.fixture(scope="module")
def loaded(built):
    """model type -> `hl.load` of its directory (loaded once per module)."""
    cache: dict[str, hl.LoadedModel] = {}

    def get(entry) -> hl.LoadedModel:
        if entry.model_type not in cache:
            cache[entry.model_type] = hl.load(built(entry))
        return cache[entry.model_type]

    return get


def _inputs(lm) -> dict[str, torch.Tensor]:
    lm.tokenizer.padding_side = "left"
    inputs = dict(lm.tokenizer(PROMPTS, return_tensors="pt", padding=True))
    assert inputs["input_ids"].shape[1] <= 16
    return inputs


def _logits(lm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**inputs).logits


def _real(eager_layer: torch.Tensor, b: int, head: int, valid: torch.Tensor) -> torch.Tensor:
    """The [q, k] eager pattern of example b over its real tokens."""
    return eager_layer[b, head][valid[b]][:, valid[b]]


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_served_without_an_adapter_and_discovered_as_declared(loaded, entry):
    lm = loaded(entry)
    assert lm.model_type == entry.model_type and entry.model_type in hl.SUPPORTED
    assert lm.adapter is models.adapter_for(entry.model_type) and lm.family is entry.family
    assert (lm.n_layers, lm.n_heads) == (2, 4)
    assert lm.n_kv_heads in (1, 2, 4) and lm.head_dim == 16
    assert lm.main.sliding == entry.sliding and (lm.main.softcap is not None) == entry.softcap


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_patterns_equal_eager_and_logits_are_unchanged(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs(lm)
    plain, eager = _logits(lm, inputs), eager_attentions(lm, inputs)
    with torch.no_grad(), hl.capture(lm, stats=None, patterns=hl.Select()) as rec:
        during = lm.model(**inputs).logits
    assert_close_at_real_tokens(during, plain, inputs)
    assert torch.equal(_logits(lm, inputs), plain)
    valid = inputs["attention_mask"].bool()
    assert len(rec.patterns) == 2 * lm.n_layers * lm.n_heads  # examples x layers x heads
    for rows in rec.patterns:
        want = _real(eager[rows.layer], rows.example, rows.head, valid)
        torch.testing.assert_close(rows.probs, want[list(rows.queries)], atol=1e-5, rtol=1e-5)
    for layer, window in enumerate(lm.main.windows):  # the discovered windows are the mask's
        pattern = _real(eager[layer], 0, 0, valid)  # [q, k] of the longer (unpadded) example
        causal = torch.ones_like(pattern, dtype=torch.bool).tril()
        inside = causal if window is None else causal & ~causal.tril(-window)  # keys < window back
        assert (pattern[inside] > 0).all() and (pattern[~inside] == 0).all()
        assert window is None or window < len(pattern)  # the window binds on the test prompt


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_statistics_equal_the_reference_engine(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs(lm)
    with torch.no_grad(), hl.capture(lm) as fused, hl.capture(lm, engine="reference") as ref:
        lm.model(**inputs)
    assert_same_stats(fused.head_stats, ref.head_stats, atol=2e-4, rtol=1e-4)
    mass = fused.head_stats[fused.head_stats.stat == "mass"]
    assert set(mass.role) <= set(matrix.ROLES[entry.family])


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_store_round_trip_rebuilds_eager_patterns(loaded, entry, tmp_path):
    lm = loaded(entry)
    inputs = _inputs(lm)
    with torch.no_grad(), hl.capture(lm, compact=hl.Select()) as rec:
        lm.model(**inputs)
    store = Store.create(tmp_path / "store", lm)
    store.append(rec, examples=["a", "b"])
    back = Store.open(tmp_path / "store", lm)
    assert back.committed() == {"a", "b"}
    stats = back.head_stats()
    assert len(stats) == len(rec.head_stats)
    eager, valid = eager_attentions(lm, inputs), inputs["attention_mask"].bool()
    for example, b in (("a", 0), ("b", 1)):
        for layer in range(lm.n_layers):
            got = torch.from_numpy(back.pattern(example, layer, lm.n_heads - 1))
            torch.testing.assert_close(got, _real(eager[layer], b, lm.n_heads - 1, valid), atol=1e-5, rtol=0)


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_generation_with_a_kv_cache_is_captured(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs(lm)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = lm.model.generate(**inputs, **kwargs)
        with hl.capture(lm) as rec:
            captured = lm.model.generate(**inputs, **kwargs)
        with hl.capture(lm, engine="reference") as ref:
            lm.model.generate(**inputs, **kwargs)
    assert torch.equal(plain, captured)
    stats = rec.head_stats
    assert sorted(set(stats.step)) == [0, 1, 2] and "answer" in set(stats[stats.step > 0].role)
    merged = stats.merge(ref.head_stats, on=KEYS, suffixes=("_f", "_r"))
    assert len(merged) == len(stats) and (merged.value_f - merged.value_r).abs().max() < 2e-4


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_head_scaling_and_ablation(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs(lm)
    plain = _logits(lm, inputs)
    head = [(lm.n_layers - 1, 0)]
    with hl.intervene(lm, hl.HeadScale(heads=head, factor=1.0)):
        same = _logits(lm, inputs)
    with hl.intervene(lm, hl.HeadAblation(heads=head)):
        ablated = _logits(lm, inputs)
    with hl.intervene(lm, hl.HeadAblation(heads=head), engine="reference"):
        reference = _logits(lm, inputs)
    assert_close_at_real_tokens(same, plain, inputs)
    assert_close_at_real_tokens(ablated, reference, inputs)
    assert (ablated - plain).abs().max() > 1e-4


def _pine_ids(lm, first: list[int], second: list[int]) -> torch.Tensor:
    """BOS, two 2-token segments, one question token: 6 tokens (within every tiny model's window)."""
    return torch.tensor([[lm.tokenizer.bos_token_id, *first, *second, 60]])


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_pine_where_declared(loaded, entry):
    """Where declared, PINE's fused engine equals its reference and the last token's logits do not depend
    on the order of the segments; elsewhere binding or running it is an UnsupportedModelError."""
    lm = loaded(entry)
    spans = ((1, 3), (3, 5))
    runs = {}
    with torch.no_grad():
        if not entry.pine:
            with pytest.raises(hl.UnsupportedModelError), hl.intervene(lm, hl.PINE(spans=spans)):
                lm.model(input_ids=_pine_ids(lm, [40, 41], [50, 51]))
            return
        for name, (a, b), engine in (
            ("fused", ([40, 41], [50, 51]), "fused"),
            ("reference", ([40, 41], [50, 51]), "reference"),
            ("swapped", ([50, 51], [40, 41]), "fused"),
        ):
            with hl.intervene(lm, hl.PINE(spans=spans), engine=engine):
                runs[name] = lm.model(input_ids=_pine_ids(lm, a, b)).logits[0]
    assert (runs["fused"] - runs["reference"]).abs().max() < 1e-4
    assert (runs["fused"][-1] - runs["swapped"][-1]).abs().max() < 1e-4  # the order of segments is gone


@pytest.mark.parametrize("entry", REFUSED, ids=_ids(REFUSED))
def test_refused_with_the_reason(built, entry):
    assert entry.model_type not in hl.SUPPORTED
    with pytest.raises(hl.UnsupportedModelError, match=REASONS[entry.route]) as err:
        hl.load(built(entry))
    assert str(err.value).startswith(f"headlab cannot serve {entry.model_type!r}: ")


def test_supported_is_the_registered_adapters_plus_the_served_matrix():
    registered = {t for a in models.adapters() for t in a.model_types}
    assert set(hl.SUPPORTED) == registered | set(matrix.served_types())
    assert {e.model_type for e in SERVED} <= set(hl.SUPPORTED)
    assert len(SERVED) >= 30 and not {e.model_type for e in REFUSED} & set(hl.SUPPORTED)
    assert len(set(_ids(ENTRIES))) == len(ENTRIES)


@pytest.mark.skipif(
    TRANSFORMERS_VERSION < (5, 24), reason="the README's table is the one for the locked transformers (5.24)"
)
def test_the_readme_table_is_the_one_the_matrix_prints(capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = re.search(r"## Coverage matrix\n(.*?)(?=\n## )", readme, flags=re.S)
    assert section is not None, "README has no 'Coverage matrix' section"
    matrix.main()
    printed = capsys.readouterr().out.strip()
    assert printed == matrix.table()
    assert printed in section.group(1), "README's table is stale: paste `python -m headlab.models.matrix`"
