"""One model over several devices: `hl.load(..., device_map=...)` (accelerate's dispatch, with its CPU and
disk offload hooks here) captures and intervenes exactly as the model loaded whole: the same statistics in
one record, the same logits, generation captured step by step, VHR and head ablation unchanged. A machine
with several GPUs runs the same code path with "cuda:N" in the map (not tested here)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_stats, images

import headlab as hl
from headlab.inputs import prepare
from headlab.interventions import VHR
from headlab.zoo.random_models import build_random


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(whole, spread) loads of one tiny Llama: layer 1 offloaded to disk, the rest on the CPU."""
    root = tmp_path_factory.mktemp("offload")
    path = build_random("llama", root / "llama")
    spread = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    return hl.load(path), hl.load(path, device_map=spread, offload_folder=root / "offload")


@torch.no_grad()
def test_capture_and_interventions_equal_the_whole_model(pair):
    whole, spread = pair
    assert hasattr(spread.model.model.layers[1], "_hf_hook")  # accelerate's offload hook is in place
    whole.tokenizer.padding_side = spread.tokenizer.padding_side = "left"
    inputs = dict(
        whole.tokenizer(["The quick brown fox", "Is there a cat?"], return_tensors="pt", padding=True)
    )
    with hl.capture(whole) as a:
        plain = whole.model(**inputs).logits
    with hl.capture(spread) as b:
        offloaded = spread.model(**inputs).logits
    torch.testing.assert_close(offloaded, plain)
    assert_same_stats(b.head_stats, a.head_stats, atol=1e-6)
    ablate = hl.HeadAblation(heads=[(1, 0)])
    with hl.intervene(whole, ablate):
        want = whole.model(**inputs).logits
    with hl.intervene(spread, ablate):
        got = spread.model(**inputs).logits
    torch.testing.assert_close(got, want)
    with hl.capture(whole) as a:
        first = whole.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with hl.capture(spread) as b:
        second = spread.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(first, second) and sorted(set(b.head_stats.step)) == [0, 1, 2]
    assert_same_stats(b.head_stats, a.head_stats, atol=1e-6)


@torch.no_grad()
def test_an_lvlm_with_its_vision_tower_on_disk(tmp_path):
    path = build_random("llava", tmp_path / "llava")
    whole = hl.load(path)
    spread = hl.load(
        path,
        device_map={
            "model.vision_tower": "disk",
            "model.multi_modal_projector": "cpu",
            "model.language_model": "cpu",
            "lm_head": "cpu",
        },
        offload_folder=tmp_path / "offload",
    )
    prompt = whole.adapter.prompt("Is there a cat?")
    inputs = prepare(whole, [prompt], images(1))
    with hl.capture(whole) as a, hl.intervene(whole, VHR()):
        want = whole.model(**inputs).logits
    with hl.capture(spread) as b, hl.intervene(spread, VHR()):
        got = spread.model(**inputs).logits
    torch.testing.assert_close(got, want)
    assert_same_stats(b.head_stats, a.head_stats, atol=1e-6)
    assert set(b.head_stats.tower) == {"vision", "lm"}
