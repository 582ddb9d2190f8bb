"""Position analyses: a slot profile with a known U-depth, KL and gold share; slot profiles of the zoo LM
on multi-document prompts through a Store; text and ViT attended distances on the zoo models; the
lost-in-the-middle curve and the judge flip rate (PINE removes the flips)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import headlab as hl
from headlab.analyses import position
from headlab.datasets import scenes, synthetic
from headlab.interventions.pine import pine_inputs
from headlab.runs.pine_eval import _DOC


def _mass_frame(masses: dict[int, list[float]]) -> pd.DataFrame:
    """mass_last rows of head (0, 0): {example: [mass on segment 0, 1, ...]}, plus a bos row."""
    rows = [
        dict(example=e, tower="lm", step=0, layer=0, head=0, stat="mass_last", role=f"segment_{s}", value=v)
        for e, values in masses.items()
        for s, v in enumerate(values)
    ]
    rows += [dict(rows[0], role="bos", value=0.5)]
    return pd.DataFrame(rows)


def test_slot_profile_by_hand():
    # shares: example 0 (0.4, 0.1, 0.2, 0.3); example 1 doubles to (0.2, 0.1, 0.3, 0.4) after normalising
    frame = _mass_frame({0: [0.2, 0.05, 0.1, 0.15], 1: [0.2, 0.1, 0.3, 0.4]})
    out = position.slot_profiles(frame, gold={0: 0, 1: 2}).iloc[0]
    b = np.array([0.3, 0.1, 0.25, 0.35])
    assert [out[f"slot_{s}"] for s in range(4)] == pytest.approx(b.tolist())
    assert (out.k, out.n_examples) == (4, 2)
    assert out.primacy == pytest.approx(0.3) and out.recency == pytest.approx(0.35)
    assert out.u_depth == pytest.approx(0.325 - 0.1)
    assert out.kl_uniform == pytest.approx(float((b * np.log(4 * b)).sum()))
    assert out.gold == pytest.approx((0.4 + 0.3) / 2) and out.gold_lift == pytest.approx(0.35 - 0.25)
    assert out.segment_mass == pytest.approx((0.5 + 1.0) / 2)
    two = position.slot_profiles(_mass_frame({0: [0.3, 0.1]})).iloc[0]
    assert math.isnan(two.u_depth) and math.isnan(two.gold)  # k = 2 has no middle; no gold known
    with pytest.raises(hl.InputError, match="segment roles"):
        position.slot_profiles(frame[frame.role == "bos"])
    with pytest.raises(hl.InputError, match="spans"):
        position.slot_profiles(frame, per_token=True)


def test_curve_summary_by_hand():
    curve = pd.DataFrame({"method": "plain", "gold": [0, 1, 2, 3], "accuracy": [0.8, 0.5, 0.4, 0.7]})
    out = position.position_curve_summary(curve).iloc[0]
    assert out.spread == pytest.approx(0.4) and out.u_depth == pytest.approx(0.75 - 0.4)


@pytest.fixture(scope="module")
def zoo_lm():
    return hl.load("zoo:lm")


def test_zoo_lm_slot_profiles_through_a_store(zoo_lm, tmp_path):
    exs = synthetic.multi_doc_qa(6, k=4, seed=3)
    meta = []
    with torch.no_grad(), hl.capture(zoo_lm, stats=hl.Stats(which=("mass",))) as rec:
        for e in exs:
            docs = _DOC.findall(e.prompt)
            suffix = e.prompt[e.prompt.index(docs[-1]) + len(docs[-1]) :].strip()
            inputs, spans = pine_inputs(zoo_lm.tokenizer, "", docs, suffix)
            rec.use_roles([hl.text_roles(inputs["input_ids"][0].tolist(), segments=spans)])
            zoo_lm.model(**inputs)
            meta.append({"gold": e.get("gold"), "spans": [list(s) for s in spans]})
    store = hl.Store.create(tmp_path / "store", zoo_lm)
    store.append(rec, meta=meta)
    entry = position.ANALYSES["slot-profile"]
    options = entry.parse({})
    out = entry.run(store, options)
    assert len(out) == 8 and out.n_examples.eq(6).all() and out.k.eq(4).all()
    slots = out[[f"slot_{s}" for s in range(4)]].to_numpy()
    np.testing.assert_allclose(slots.sum(1), 1.0, rtol=1e-5)
    assert out.gold.between(0, 1).all() and (out.kl_uniform >= 0).all()
    per_token = position.slot_profiles(store, per_token=True)
    assert per_token.primacy.between(0, 1).all()
    store.save_result("slot-profile", out, options)
    pd.testing.assert_frame_equal(store.result("slot-profile"), out)


def test_zoo_lm_distance_profile(zoo_lm):
    exs = synthetic.induction(6, seed=2)
    zoo_lm.tokenizer.padding_side = "right"
    inputs = zoo_lm.tokenizer([e.prompt for e in exs], return_tensors="pt", padding=True)
    with torch.no_grad(), hl.capture(zoo_lm, stats=hl.Stats(which=("distance",))) as rec:
        zoo_lm.model(**inputs)
    out = position.distance_profile(rec)
    n = int(inputs["attention_mask"].sum(1).max())
    assert len(out) == 8 and out.distance.between(0, n - 1).all()
    assert (out.distance_rms >= out.distance - 1e-6).all()  # RMS >= mean
    layer0 = out[out.layer == 0].set_index("head").distance
    assert layer0.idxmin() in (0, 2)  # a previous-token head attends nearest


def test_zoo_vit_mean_attention_distance():
    vit = hl.load("zoo:vit")
    images = [scenes.render(s) for s in scenes.make_scenes(4, seed=3)]
    with torch.no_grad(), hl.capture(vit, stats=hl.Stats(which=("distance",))) as rec:
        vit.model(**vit.processor(images, return_tensors="pt"))
    entry = position.ANALYSES["vit-distance"]
    out = position.vit_attention_distance(rec, patch_size=4)
    rows, cols = vit.tower("vision").grid
    diagonal = math.hypot(rows - 1, cols - 1)
    assert len(out) == 4 * 4 and out.distance.between(0, diagonal).all()
    np.testing.assert_allclose(out.distance_px, 4 * out.distance)
    assert out.distance.min() < out.distance.max()  # heads differ
    assert set(entry.options) == {"tower", "patch_size"}
    with pytest.raises(hl.InputError, match="no 'distance' statistics for tower 'lm'"):
        position.distance_profile(rec)


def test_lost_in_the_middle_and_judge_flip_rate(zoo_lm):
    curve = position.lost_in_the_middle(zoo_lm, n=2, k=3)
    assert curve.shape == (6, 5) and curve.accuracy.between(0, 1).all()
    assert set(position.position_curve_summary(curve).method) == {"plain", "pine"}
    bias = position.judge_position_bias(zoo_lm, n=4).set_index("method")
    assert bias.flip_rate["pine"] == 0.0  # block swaps are a pure permutation of PINE's segments
    with pytest.raises(hl.SelectionError, match="unknown methods"):
        position.judge_position_bias(zoo_lm, methods=["nope"])
