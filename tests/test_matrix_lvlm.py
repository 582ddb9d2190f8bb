"""The LVLM rows of the coverage matrix (headlab.models.matrix.LVLM): every served vision-language type's
tiny random model (a 2-layer vision tower and a 2-layer language model, built from its real config classes
with a processor, saved with save_pretrained and loaded back with `hl.load`) is served as declared.

Per served type, on a batch of two prompts with two images of different sizes (left padding): the towers
(found by the sub-config their attention modules hold, not by path words), the image token; language-model
patterns equal HF eager attention at every real token (Gemma 3's and PaliGemma's bidirectional image
blocks included: headlab follows the mask), logits unchanged by capture; the image tokens carry role
"image" and every vision-tower row (image, tile, or per-image call) is its example's; statistics of both
towers equal the reference engine; generation with a KV cache is captured and unchanged; the store round
trip rebuilds eager's patterns; VHR equals its reference and VAR's fused engine its reference engine; PINE
where declared, else refused. Refused types say why.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import assert_same_stats, eager_attentions
from PIL import Image

import headlab as hl
from headlab import models
from headlab.inputs import image_placeholder, prepare, question_prompt
from headlab.interventions import VAR, VHR
from headlab.interventions.vhr import vhr_reference
from headlab.models import matrix
from headlab.store import Store
from headlab.zoo.random_models import build_random

ENTRIES = matrix.entries(hl.Family.LVLM)
SERVED = [e for e in ENTRIES if e.served]
REFUSED = [e for e in ENTRIES if not e.served]
QUESTION = "Is there a cat in the image?"


def _ids(entries):
    return [e.model_type for e in entries]


def _processor_without_video(path: Path):
    """The real processor of a type whose video processor needs torchvision, which is not installed here
    (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL: `hl.load` then warns and loads the model without a processor):
    built from its tokenizer and image processor with no video processor. transformers' class check refuses
    None for a processor part, so it is relaxed while the processor is built, in this test only."""
    settings = json.loads((path / "processor_config.json").read_text())
    cls = getattr(tf, settings.pop("processor_class"))
    settings.pop("image_processor"), settings.pop("video_processor", None)
    check = tf.ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            tf.ProcessorMixin,
            "check_argument_for_proper_class",
            lambda self, name, arg: None if arg is None else check(self, name, arg),
        )
        return cls(
            image_processor=tf.AutoImageProcessor.from_pretrained(path),
            tokenizer=tf.AutoTokenizer.from_pretrained(path),
            video_processor=None,
            **settings,
        )


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """model type -> `hl.load` of its tiny random model (built and loaded once per module)."""
    root, cache = tmp_path_factory.mktemp("matrix_lvlm"), {}

    def get(entry) -> hl.LoadedModel:
        if entry.model_type not in cache:
            path = build_random(entry.random_builder, root / entry.model_type)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                lm = hl.load(path)
            if lm.processor is None:  # its processor needs torchvision
                assert any("needs a package that is not installed" in str(w.message) for w in caught)
                processor = _processor_without_video(path)
                lm = dataclasses.replace(lm, processor=processor, tokenizer=processor.tokenizer)
            lm.processor.tokenizer.padding_side = "left"
            cache[entry.model_type] = lm
        return cache[entry.model_type]

    return get


def _images() -> list[Image.Image]:
    """Two images of different sizes (any-resolution families split the wider one into more tiles)."""
    gen = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
        for h, w in ((32, 32), (32, 64))
    ]


def _prompt(lm) -> str:
    try:
        return question_prompt(lm, QUESTION)
    except hl.InputError:  # a family without a template, whose tiny processor has no chat template
        return f"{image_placeholder(lm)}{QUESTION}"


def _inputs(lm) -> dict[str, torch.Tensor]:
    return prepare(lm, [_prompt(lm), _prompt(lm)], _images())


def _logits(lm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**inputs).logits


def _valid(inputs) -> torch.Tensor:
    return inputs["attention_mask"].bool()


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_served_with_its_towers_and_image_token(loaded, entry):
    lm = loaded(entry)
    assert lm.model_type == entry.model_type and entry.model_type in hl.SUPPORTED
    assert lm.adapter is models.adapter_for(lm.model.config) and lm.family is hl.Family.LVLM
    assert {t.name for t in lm.towers} == {"vision", "lm"} and lm.n_layers == 2
    assert lm.uncaptured == entry.uncaptured
    vision = lm.tower("vision")
    assert vision.path != lm.tower("lm").path and not vision.causal
    config = lm.model.config
    declared = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    assert lm.image_token_id == declared is not None


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_patterns_equal_eager_and_logits_are_unchanged(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs(lm)
    plain, eager = _logits(lm, inputs), eager_attentions(lm, inputs)
    with torch.no_grad(), hl.capture(lm, stats=None, patterns=hl.Select()) as rec:
        during = lm.model(**inputs).logits
    valid = _valid(inputs)
    torch.testing.assert_close(during[valid], plain[valid], atol=1e-4, rtol=1e-4)
    assert len(rec.patterns) == 2 * lm.n_layers * lm.n_heads
    for rows in rec.patterns:
        want = eager[rows.layer][rows.example, rows.head][valid[rows.example]][:, valid[rows.example]]
        torch.testing.assert_close(rows.probs, want[list(rows.queries)], atol=1e-5, rtol=1e-5)
    logged = rec.examples
    lm_rows = logged[logged.tower == "lm"]
    assert list(lm_rows.example) == [0, 1] and all("image" in r.split(",") for r in lm_rows.roles)
    image_tokens = (inputs["input_ids"] == lm.image_token_id).sum(-1).tolist()
    assert all(n > 0 for n in image_tokens)


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_statistics_of_both_towers_equal_the_reference_engine(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs(lm)
    with torch.no_grad(), hl.capture(lm) as fused, hl.capture(lm, engine="reference") as ref:
        lm.model(**inputs)
    assert_same_stats(fused.head_stats, ref.head_stats, atol=2e-4, rtol=1e-4)
    mass = fused.head_stats[fused.head_stats.stat == "mass"]
    assert set(mass.tower) == {"vision", "lm"}
    assert set(mass[mass.tower == "vision"].example) == {0, 1}  # every image (tile) is its example's
    lm_roles = set(mass[mass.tower == "lm"].role)  # PaliGemma's image tokens come first: no "bos" role
    assert {"text", "image"} <= lm_roles <= set(entry.token_roles) - {"answer"}
    assert ("image_newline" in lm_roles) == ("image_newline" in entry.token_roles)


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_generation_with_a_kv_cache_is_captured(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs(lm)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        plain = lm.model.generate(**inputs, **kwargs)
        with hl.capture(lm) as rec:
            captured = lm.model.generate(**inputs, **kwargs)
    assert torch.equal(plain, captured)
    stats = rec.head_stats
    lm_stats = stats[stats.tower == "lm"]
    assert sorted(set(lm_stats.step)) == [0, 1, 2] and "answer" in set(lm_stats[lm_stats.step > 0].role)


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_store_round_trip_rebuilds_eager_patterns(loaded, entry, tmp_path):
    lm = loaded(entry)
    inputs = _inputs(lm)
    if not entry.compact:  # a mask compact attention cannot rebuild: refused, and the rows are stored
        refused = pytest.raises(hl.SelectionError, match="neither causal, windowed nor full")
        with torch.no_grad(), refused, hl.capture(lm, compact=hl.Select()):
            lm.model(**inputs)
    with torch.no_grad(), hl.capture(lm, **{"compact" if entry.compact else "patterns": hl.Select()}) as rec:
        lm.model(**inputs)
    store = Store.create(tmp_path / "store", lm)
    store.append(rec, examples=["a", "b"])
    back = Store.open(tmp_path / "store", lm)
    assert back.committed() == {"a", "b"} and len(back.head_stats()) == len(rec.head_stats)
    eager, valid, head = eager_attentions(lm, inputs), _valid(inputs), lm.n_heads - 1
    for example, b in (("a", 0), ("b", 1)):
        for layer in range(lm.n_layers):
            got = torch.from_numpy(back.pattern(example, layer, head))
            want = eager[layer][b, head][valid[b]][:, valid[b]]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_vhr_equals_its_reference_and_var_its_reference_engine(loaded, entry):
    lm = loaded(entry)
    inputs = prepare(lm, [_prompt(lm)], _images()[1:])  # one example: the reference runs it unpadded
    with torch.no_grad():
        base = _logits(lm, inputs)[:, -1]
        with hl.intervene(lm, VHR()) as runner:
            fused = _logits(lm, inputs)[:, -1]
            selected = runner.patches[0].selected
        reference, ref_selected = vhr_reference(lm, inputs, VHR())
        torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
        assert all(torch.equal(selected[layer], ref_selected[layer]) for layer in selected)
        assert (fused - base).abs().max() > 1e-4
        out = {}
        for engine in ("fused", "reference"):
            with hl.intervene(lm, VAR(tau=1.0, layers=(0, 1)), engine=engine):
                out[engine] = _logits(lm, inputs)[:, -1]
    torch.testing.assert_close(out["fused"], out["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_pine_where_declared_else_refused(loaded, entry):
    lm = loaded(entry)
    ids = torch.tensor([[lm.processor.tokenizer.bos_token_id or 1, 40, 41, 50, 51, 60]])
    spans = ((1, 3), (3, 5))
    with torch.no_grad():
        if not entry.pine:
            with pytest.raises(hl.UnsupportedModelError), hl.intervene(lm, hl.PINE(spans=spans)):
                lm.model(input_ids=ids)
            return
        with hl.intervene(lm, hl.PINE(spans=spans)):
            fused = lm.model(input_ids=ids).logits[0]
        with hl.intervene(lm, hl.PINE(spans=spans), engine="reference"):
            reference = lm.model(input_ids=ids).logits[0]
    assert (fused - reference).abs().max() < 1e-4


@pytest.mark.parametrize("entry", REFUSED, ids=_ids(REFUSED))
def test_refused_with_the_reason(entry, tmp_path):
    assert entry.model_type not in hl.SUPPORTED
    path = build_random(entry.model_type, tmp_path / entry.model_type)
    with pytest.raises(hl.UnsupportedModelError, match="cross-attention layers") as err:
        hl.load(path)
    assert str(err.value).startswith(f"headlab cannot serve {entry.model_type!r}: ")


def test_enough_lvlm_types_are_served():
    assert len(SERVED) >= 8 and len(set(_ids(ENTRIES))) == len(ENTRIES)
    assert {e.model_type for e in SERVED} <= set(hl.SUPPORTED)
