"""headlab.plots: the figures show exactly the record's and the store's values, on token and head axes.

Each figure is compared with the value read the plain way (`rec.pattern`, `rec.head_stats`, `store.pattern`,
`store.head_stats`, `store.tokens`), computed by hand for one head; errors name what is available.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import headlab as hl
from headlab.plots import _longest_square_run

PROMPT = "w3 w41 w7 w12 w60 w3 w41 w7 w12"


@pytest.fixture(scope="module")
def lm():
    return hl.load("zoo:lm")


@pytest.fixture(scope="module")
def captured(lm):
    """A record of zoo:lm on one prompt: rows of layer 1, compact attention of every layer; and its tokens."""
    inputs = lm.tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad(), hl.capture(lm, patterns=hl.Select(layers=[1]), compact=hl.Select()) as rec:
        lm.model(**inputs)
    return rec, lm.tokenizer.convert_ids_to_tokens(inputs.input_ids[0])


@pytest.fixture(scope="module")
def llava_store(tmp_path_factory):
    """zoo:llava, two scenes captured with and without the image (`with_image`, `no_image`)."""
    from headlab.analyses.vhd import capture_vhd_conditions
    from headlab.datasets import scenes
    from headlab.zoo.llava import conversation

    llava = hl.load("zoo:llava")
    store = hl.Store.create(tmp_path_factory.mktemp("plots") / "store", llava)
    images = [scenes.render(s) for s in scenes.make_scenes(2, seed=3)]
    capture_vhd_conditions(llava, store, [conversation("Is there a car in the image?")] * 2, images)
    return store


def _z(fig, trace: int = 0) -> np.ndarray:
    return np.asarray(fig.data[trace].z, dtype=float)


# ----- records ------------------------------------------------------------------------------------------
def test_record_pattern_is_the_recorded_rows_with_token_axes(captured):
    rec, tokens = captured
    fig = rec.plot.pattern(0, layer=1, head=2, tokens=tokens)
    probs = rec.pattern(0, layer=1, head=2).probs.numpy()  # [q, k]
    np.testing.assert_allclose(_z(fig), probs, atol=1e-7)
    shown = [html.escape(t, quote=False) for t in tokens]  # "<s>" shown as text, not read as a tag
    assert tokens[0] == "<s>" and shown[0] == "&lt;s&gt;"
    assert list(fig.layout.xaxis.ticktext) == shown  # keys on x
    assert list(fig.layout.yaxis.ticktext) == shown  # queries on y, top to bottom
    assert fig.layout.yaxis.range == (9.5, -0.5)
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0.0, 1.0)
    # hover: query token, key token; the induction prompt repeats "w3" at 1 and 6
    assert list(fig.data[0].customdata[6][1]) == ["w3", "w3"]


def test_record_pattern_all_heads_has_a_dropdown(captured):
    rec, tokens = captured
    fig = rec.plot.pattern(0, layer=1, tokens=tokens)
    assert len(fig.data) == 4 and [t.visible for t in fig.data] == [True, False, False, False]
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["L1 H0", "L1 H1", "L1 H2", "L1 H3"]
    np.testing.assert_allclose(_z(fig, 3), rec.pattern(0, layer=1, head=3).probs.numpy(), atol=1e-7)


def test_record_pattern_falls_back_to_compact_attention(captured):
    rec, _ = captured
    fig = rec.plot.pattern(0, layer=0, head=1)  # layer 0 has compact attention only
    compact = next(c for c in rec.compact if c.layer == 0)
    np.testing.assert_allclose(_z(fig), compact.rows(1).numpy(), atol=1e-7)
    assert list(fig.layout.xaxis.ticktext) == [str(i) for i in range(10)]  # no tokens given: positions


def test_record_heads_is_the_entropy_per_head_on_categorical_axes(captured):
    rec, _ = captured
    fig = rec.plot.heads("entropy")
    stats = rec.head_stats
    one = stats[(stats.stat == "entropy") & (stats.layer == 1) & (stats["head"] == 3)].value
    assert _z(fig)[1, 3] == pytest.approx(float(one.iloc[0]))
    assert fig.data[0].x == ("H0", "H1", "H2", "H3") and fig.data[0].y == ("L0", "L1")
    assert fig.layout.xaxis.type == "category" and fig.layout.yaxis.type == "category"
    bos = stats[(stats.stat == "mass") & (stats.role == "bos") & (stats.layer == 0) & (stats["head"] == 0)]
    assert _z(rec.plot.heads("mass", role="bos"))[0, 0] == pytest.approx(float(bos.value.iloc[0]))


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda p: p.heads("mass"), "per role: pass role=one of ['bos', 'text']"),
        (lambda p: p.heads("nope"), "recorded stats: ['alpha', 'distance'"),
        (lambda p: p.heads("mass", role="image"), "roles held: ['bos', 'text']"),
        (lambda p: p.heads("entropy", tower="vision"), "towers held: ['lm']"),
        (lambda p: p.pattern(0, layer=7), "recorded: example 0 lm layer 0, example 0 lm layer 1"),
        (lambda p: p.pattern(0, layer=1, head=9), "recorded heads: [0, 1, 2, 3]"),
        (lambda p: p.pattern(0, layer=1, tokens=["a"]), "got 1 tokens for a pattern over 10 keys"),
    ],
)
def test_record_errors_name_what_is_there(captured, call, says):
    rec, _ = captured
    with pytest.raises(hl.HeadlabError, match=None) as err:
        call(rec.plot)
    assert says in str(err.value)


# ----- stores -------------------------------------------------------------------------------------------
def test_store_heads_is_the_mean_over_examples(llava_store):
    fig = llava_store.plot.heads("entropy", "with_image")
    stats = llava_store.head_stats(stat="entropy", condition="with_image", tower="lm", layers=[1], heads=[2])
    assert _z(fig)[1, 2] == pytest.approx(stats[stats.step == 0].value.mean())
    assert fig.data[0].x == ("H0", "H1", "H2", "H3") and fig.data[0].y == ("L0", "L1")


def test_store_difference_counts_an_absent_role_as_zero(llava_store):
    fig = llava_store.plot.heads("mass", ("with_image", "no_image"), role="image")
    stats = llava_store.head_stats(stat="mass", condition="with_image", tower="lm", layers=[0], heads=[1])
    with_image = stats[(stats.role == "image") & (stats.step == 0)].value.mean()
    assert _z(fig)[0, 1] == pytest.approx(with_image - 0.0)  # no_image has no image tokens: mass 0
    assert fig.data[0].zmid == 0.0 and "with_image − no_image" in fig.layout.title.text
    text = llava_store.plot.heads("mass", ("with_image", "no_image"), role="text")
    both = [
        llava_store.head_stats(stat="mass", condition=c, tower="lm", layers=[0], heads=[1])
        for c in ("with_image", "no_image")
    ]
    a, b = (s[(s.role == "text") & (s.step == 0)].value.mean() for s in both)
    assert _z(text)[0, 1] == pytest.approx(a - b)


def test_store_pattern_has_the_stored_tokens(llava_store):
    fig = llava_store.plot.pattern(1, layer=1, head=0, condition="no_image")
    probs = llava_store.pattern(1, layer=1, head=0, condition="no_image")  # [q, k]
    np.testing.assert_allclose(_z(fig), probs, atol=1e-7)
    tokens = [html.escape(t, quote=False) for t in llava_store.tokens(1, condition="no_image")]
    assert list(fig.layout.xaxis.ticktext) == tokens and list(fig.layout.yaxis.ticktext) == tokens


def test_store_image_attention_is_the_query_row_on_the_patch_grid(llava_store):
    fig = llava_store.plot.image_attention(0, layer=2, head=1, condition="with_image")  # the vision tower
    probs = llava_store.pattern(0, layer=2, head=1, tower="vision", condition="with_image")  # [17, 17]
    np.testing.assert_allclose(_z(fig, 1), probs[0, 1:].reshape(4, 4), atol=1e-7)  # CLS -> 4 x 4 patches
    assert fig.data[0].type == "image"
    lm_fig = llava_store.plot.image_attention(0, layer=1, head=0, condition="with_image", tower="lm")
    ids = llava_store.example_info(0, condition="with_image").token_ids
    start, length = _longest_square_run(list(ids))
    lm_probs = llava_store.pattern(0, layer=1, head=0, condition="with_image")
    np.testing.assert_allclose(_z(lm_fig, 1), lm_probs[-1, start : start + length].reshape(4, 4), atol=1e-7)


def test_vit_store_defaults_to_its_vision_tower(tmp_path):
    """A ViT store: one tower, "vision"; the figures take it without being told, the grid is 8 x 8 after CLS."""
    from headlab.datasets import scenes
    from headlab.datasets.prompts import PromptItem
    from headlab.runs.batch import capture_to_store

    vit = hl.load("zoo:vit")
    scenes.render(scenes.make_scenes(1, seed=1)[0]).save(tmp_path / "a.png")
    store = hl.Store.create(tmp_path / "store", vit)
    item = PromptItem(0, None, tmp_path / "a.png", {}, 1, image_name="a.png")
    capture_to_store(vit, store, [item], attention_layers=None, progress=False)
    probs = store.pattern(0, layer=3, head=2, tower="vision")  # [65, 65]
    fig = store.plot.image_attention(0, layer=3, head=2, query=5)
    np.testing.assert_allclose(_z(fig, 1), probs[5, 1:].reshape(8, 8), atol=1e-7)
    np.testing.assert_allclose(_z(store.plot.pattern(0, layer=3, head=2)), probs, atol=1e-7)
    stats = store.head_stats(stat="entropy", tower="vision", layers=[3], heads=[2])
    assert _z(store.plot.heads("entropy"))[3, 2] == pytest.approx(stats.value.mean())


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda p: p.heads("nope", "with_image"), "recorded stats: ['alpha'"),
        (lambda p: p.heads("mass", ("with_image", "no_image"), role="segment_0"), "roles held: ['bos'"),
        (lambda p: p.heads("entropy", "other"), "stored conditions: ['no_image', 'with_image']"),
        (lambda p: p.pattern(0, 1, 9, condition="no_image"), "head"),
        (lambda p: p.image_attention(0, 1, 0, condition="no_image"), "has no stored image"),
        (lambda p: p.image_attention(0, 1, 0, condition="with_image", query=99), "outside example 0's 17"),
    ],
)
def test_store_errors_name_what_is_there(llava_store, call, says):
    with pytest.raises(hl.HeadlabError) as err:
        call(llava_store.plot)
    assert says in str(err.value)


# ----- results ------------------------------------------------------------------------------------------
def test_result_frame_per_head():
    frame = pd.DataFrame(
        {"layer": [0, 0, 1, 1], "head": [0, 0, 2, 0], "score": [1.0, 3.0, 5.0, -1.0], "tag": list("abcd")}
    )
    fig = hl.plots.heads(frame, value="score")
    z = _z(fig)
    assert z.shape == (2, 3) and z[0, 0] == 2.0 and z[1, 2] == 5.0 and np.isnan(z[0, 2])  # mean; NaN: none
    assert fig.data[0].x == ("H0", "H1", "H2")
    with pytest.raises(hl.HeadlabError, match="no column \\['missing'\\]"):
        hl.plots.heads(frame, value="missing")
    with pytest.raises(hl.HeadlabError, match="not numeric; numeric columns"):
        hl.plots.heads(frame, value="tag")
    towers = frame.assign(tower=["lm", "lm", "vision", "vision"])
    with pytest.raises(hl.HeadlabError, match="several towers \\['lm', 'vision'\\]"):
        hl.plots.heads(towers, value="score")
    assert _z(hl.plots.heads(towers, value="score", tower="vision"))[1, 2] == 5.0
    with pytest.raises(hl.HeadlabError, match="tower 'x' is not in the frame; it holds towers"):
        hl.plots.heads(towers, value="score", tower="x")
    conditions = frame.assign(condition=["a", "b", "a", "b"])
    with pytest.raises(hl.HeadlabError, match="several conditions \\['a', 'b'\\]; pass condition="):
        hl.plots.heads(conditions, value="score")
    assert _z(hl.plots.heads(conditions, value="score", condition="b"))[0, 0] == 3.0


def test_longest_square_run():
    assert _longest_square_run([1, 7, 7, 7, 7, 2, 9, 9]) == (1, 4)
    assert _longest_square_run([1, 2, 3]) == (0, 0)


def test_import_headlab_does_not_import_plotly():
    code = "import sys, headlab\nassert 'plotly' not in sys.modules\nheadlab.plots\nassert 'plotly' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_jupyter_example_runs(llava_store):
    """The README's Jupyter block runs as written, its `store` being the LLaVA store of the fixture."""
    from headlab.analyses import run_analysis

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "rec.plot" in b)
    if "vhd" not in llava_store.results():
        run_analysis("vhd", llava_store)
    exec(compile(block, "README Jupyter example", "exec"), {"store": llava_store})
