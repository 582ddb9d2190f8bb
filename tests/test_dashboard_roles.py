"""The long-context roles in the Dash head browser: a store from an untrained lm-long-shaped model with the
`razor-heads` and `streaming-heads` results and an atlas built on them; the roles appear as atlas traces
(where the other roles appear), and the score columns are heat-map sources equal to the stored results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headlab as hl
from headlab.analyses.registry import run_analysis
from headlab.dashboards.app import atlas_figure, heatmap_figure
from headlab.dashboards.data import BrowserData, Source, layout_from_model
from headlab.zoo import lm_long


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("dash_roles")
    tok = lm_long.tokenizer_for()
    lm_long.build_model(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    lm = hl.load(str(root / "model"))
    store = hl.Store.create(root / "store", lm)
    inputs = lm.tokenizer(["Mary has a red ball . The passkey is v1 v2 ."], return_tensors="pt")
    with torch.no_grad(), hl.capture(lm, compact=hl.Select()) as rec:
        lm.model(**inputs)
    store.append(rec, examples=[0], meta=[{"prompt": "needle"}])
    run_analysis("razor-heads", store, length=8, repeats=3)
    run_analysis("streaming-heads", store, lengths="16", depths="0.5", per_cell=1, sparsity=0.5)
    run_analysis("atlas", store, razor="razor-heads", streaming="streaming-heads")
    return store, BrowserData(store, layout_from_model(lm))


def test_long_context_roles_appear_in_the_atlas(browser):
    store, data = browser
    fig = atlas_figure(data)
    names = {trace.name for trace in fig.data}
    streaming = [n for n in names if "streaming" in n.split("+")]
    assert streaming, names
    shown = sum(len(t.x) for t in fig.data if t.name in streaming)
    atlas = store.result("atlas")
    assert shown == int(atlas.role.str.split("+").apply(lambda r: "streaming" in r).sum()) == len(atlas) // 2


def test_long_context_scores_are_heatmap_sources(browser):
    store, data = browser
    for name, column in (
        ("razor-heads", "induction"),
        ("razor-heads", "echo"),
        ("streaming-heads", "distant_mass"),
    ):
        source = Source(kind="result", name=name, column=column)
        assert source in data.sources()
        z = np.asarray(
            heatmap_figure(data, source.encode(), "lm", "single", "default", None).data[0].z, dtype=float
        )
        frame = store.result(name)
        want = frame[(frame.layer == 2) & (frame["head"] == 3)][column].iloc[0]
        np.testing.assert_allclose(z[2, 3], want, rtol=1e-6)
