"""The head atlas: one row per head of a store captured from the zoo LM, the role rules (L0H1 is a sink,
the previous-token heads from stored patterns, induction from given scores), the result round trip, and
the UMAP path on a larger synthetic feature table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import headlab as hl
from headlab.analyses import atlas
from headlab.datasets import synthetic


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory):
    lm = hl.load("zoo:lm")
    lm.tokenizer.padding_side = "right"
    inputs = lm.tokenizer(
        [e.prompt for e in synthetic.induction(8, seed=3)], return_tensors="pt", padding=True
    )
    store = hl.Store.create(tmp_path_factory.mktemp("atlas") / "store", lm)
    with torch.no_grad(), hl.capture(lm, stats=hl.Stats(), compact=hl.Select()) as rec:
        lm.model(**inputs)
    store.append(rec, examples=list(range(8)))
    return store


def test_zoo_atlas_rows_roles_and_round_trip(zoo_store):
    card = hl.zoo.card("lm")["evaluation"]["heads"]["induction"]
    induction = {("lm", layer, head): card[layer][head] for layer in range(2) for head in range(4)}
    frame = atlas.head_atlas(zoo_store, induction=induction)
    assert len(frame) == 8 and not frame.duplicated(["tower", "layer", "head"]).any()
    assert {"x", "y", "cluster", "role", "embedding", "alpha:pos:0", "entropy", "prev_token"} <= set(frame)
    assert (frame.embedding == "pca").all()  # 8 heads: too few for UMAP's neighbour graph
    role = {(r.layer, r.head): r.role for r in frame.itertuples()}
    assert "sink" in role[0, 1].split("+")
    assert "previous-token" in role[0, 0] and "previous-token" in role[0, 2]
    assert "induction" in role[1, 0].split("+")
    zoo_store.save_result("atlas", frame)
    back = zoo_store.result("atlas")
    pd.testing.assert_frame_equal(back, frame)
    assert atlas.head_atlas(zoo_store, induction=induction).equals(frame)  # deterministic


def test_stats_only_rules_and_registry_entry(zoo_store):
    features = atlas.stat_features(zoo_store)
    role = dict(
        zip(zip(features.layer, features["head"], strict=True), atlas.head_roles(features), strict=True)
    )
    assert "sink" in role[0, 1] and "previous-token" in role[0, 0] and "previous-token" in role[0, 2]
    entry = atlas.ANALYSES["atlas"]
    options = entry.parse({})
    assert len(entry.run(zoo_store, options)) == 8
    with pytest.raises(hl.StoreError, match="no head statistics"):
        atlas.stat_features(zoo_store, condition="missing")


@pytest.mark.slow  # umap-learn JIT-compiles on first use (~25 s)
def test_umap_path_on_many_heads():
    rng = np.random.default_rng(0)
    n = 64
    features = pd.DataFrame({"tower": "lm", "layer": np.arange(n) // 8, "head": np.arange(n) % 8})
    features["alpha:pos:0"] = np.r_[rng.uniform(0.5, 0.9, 16), rng.uniform(0.0, 0.1, n - 16)]
    features["distance"] = np.r_[rng.uniform(5, 9, 16), rng.uniform(0.8, 1.2, 16), rng.uniform(3, 6, n - 32)]
    features["entropy"] = rng.uniform(0.2, 0.8, n)
    features["mass:image"] = rng.uniform(0, 1, n)
    frame = atlas.atlas_from_features(features, clusters=3, seed=0)
    assert (frame.embedding == "umap").all() and len(frame) == n
    assert np.isfinite(frame[["x", "y"]].to_numpy()).all() and set(frame.cluster) == {0, 1, 2}
    assert frame.role.str.contains("sink").sum() == 16
    assert frame.role.iloc[16:32].str.contains("previous-token").all()
    assert frame.role.str.contains("vision-aware").sum() == (features["mass:image"] > 0.5).sum()
