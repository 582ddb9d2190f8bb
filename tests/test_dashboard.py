"""The Dash head browser: callbacks as plain functions on a small two-condition store from zoo:lm, the
empty-store page, the CLI's clean error for a wrong path, escaping of dataset text, and a real headless
Chromium session that clicks a head and saves a screenshot (skipped when chromium/chromedriver are absent).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import chromium_driver
from dash import no_update
from typer.testing import CliRunner

import headlab as hl
from headlab.cli import app as cli_app
from headlab.dashboards.app import (
    build_layout,
    circuit_figure,
    heatmap_figure,
    make_app,
    pattern_outputs,
    position_figure,
    result_options,
)
from headlab.dashboards.data import BrowserData, Source, layout_from_model

PROMPTS = {
    "with": ["When Mary and John went to the store, John gave", "<script>alert(1)</script> w3 w41"],
    "without": ["w3 w41 w7 w12 w60 w3 w41 w7", "The cat sat on the mat and"],
}
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def lm():
    return hl.load("zoo:lm")


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    """Examples 0 and 1 under conditions "with" and "without", a sinks result and an atlas result."""
    store = hl.Store.create(tmp_path_factory.mktemp("dash") / "store", lm)
    for condition, prompts in PROMPTS.items():
        for i, prompt in enumerate(prompts):
            inputs = lm.tokenizer([prompt], return_tensors="pt")
            with torch.no_grad(), hl.capture(lm, compact=hl.Select()) as rec:
                lm.model(**inputs)
            store.append(rec, examples=[i], condition=condition, meta=[{"prompt": prompt}])
    heads = [(layer, head) for layer in range(lm.n_layers) for head in range(lm.n_heads)]
    store.save_result(
        "sinks",
        pd.DataFrame([{"tower": "lm", "layer": la, "head": h, "score": la + h / 10} for la, h in heads]),
    )
    store.save_result(
        "atlas",
        pd.DataFrame(
            [
                {"tower": "lm", "layer": la, "head": h, "x": float(h), "y": float(la), "role": "sink"}
                for la, h in heads
            ]
        ),
    )
    return store


@pytest.fixture(scope="module")
def data(store, lm):
    return BrowserData(store, layout_from_model(lm))


def test_heatmap_of_a_stat_matches_the_store(data, store, lm):
    source = Source(kind="stat", name="entropy", column="")
    assert source in data.sources()
    fig = heatmap_figure(data, source.encode(), "lm", "single", "with", None)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (lm.n_layers, lm.n_heads)
    frame = store.head_stats(stat="entropy", condition="with", layers=[1], heads=[2])
    np.testing.assert_allclose(z[1, 2], frame.value.mean(), rtol=1e-6)


def test_result_columns_are_sources(data, lm):
    score = Source(kind="result", name="sinks", column="score")
    assert score in data.sources() and Source(kind="result", name="atlas", column="x") in data.sources()
    z = np.asarray(heatmap_figure(data, score.encode(), "lm", "single", "with", None).data[0].z, dtype=float)
    np.testing.assert_allclose(z[1, 3], 1.3)
    diff = heatmap_figure(data, score.encode(), "lm", "diff", "with", "without")
    assert "no condition column" in diff.layout.annotations[0].text


def test_difference_view_is_a_minus_b(data, store):
    source = Source(kind="stat", name="mass", column="bos")
    fig = heatmap_figure(data, source.encode(), "lm", "diff", "with", "without")
    z = np.asarray(fig.data[0].z, dtype=float)
    stats = store.head_stats(stat="mass", layers=[0], heads=[1])
    stats = stats[stats.role == "bos"]
    means = stats.groupby("condition").value.mean()
    np.testing.assert_allclose(z[0, 1], means["with"] - means["without"], rtol=1e-5, atol=1e-7)
    assert fig.data[0].zmid == 0.0


def test_clicked_head_shows_its_pattern_over_tokens(data, store, lm):
    matrix, tokens, grid, status = pattern_outputs(data, (1, 2), 0, "lm", "with", None)
    want = store.pattern(0, 1, 2, condition="with")
    np.testing.assert_allclose(np.asarray(matrix.data[0].z, dtype=float), want, atol=1e-6)
    ids = lm.tokenizer(PROMPTS["with"][0])["input_ids"]
    spans = tokens[1:]
    assert len(spans) == len(ids) == want.shape[1]
    assert [s.children for s in spans] == lm.tokenizer.convert_ids_to_tokens(ids)
    assert "layer 1 head 2" in status and "tokenizer" in status
    assert grid.layout.annotations[0].text == "no image part in this example"
    _, _, _, status = pattern_outputs(data, (0, 0), 0, "lm", "with", 2)
    assert "query 2" in status
    _, _, _, missing = pattern_outputs(data, (0, 0), 99, "lm", "with", None)
    assert "example 99 is not stored" in missing


def test_without_a_model_tokens_are_positions(store):
    _, tokens, _, status = pattern_outputs(BrowserData(store), (0, 0), 1, "lm", "without", None)
    assert [s.children for s in tokens[1:]] == [str(i) for i in range(len(tokens) - 1)]
    assert "positions" in status


def test_dataset_text_is_escaped(data):
    _, tokens, _, _ = pattern_outputs(data, (0, 0), 1, "lm", "with", None)
    prompt = tokens[0]
    assert prompt.children == f"prompt: {PROMPTS['with'][1]}"  # a plain string child: React escapes it
    html = make_app(data.store).index()
    assert "<script>alert(1)</script>" not in html


def test_empty_store_page_and_bad_path(lm, tmp_path):
    empty = hl.Store.create(tmp_path / "empty", lm)
    page = build_layout(BrowserData(empty))
    assert "holds no examples" in page.children[1].children
    make_app(empty.root)  # builds without callbacks
    result = CliRunner().invoke(cli_app, ["dash", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "is not a headlab store" in result.output
    assert "Traceback" not in result.output


def test_browser_click_a_head(data, store, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    browser = chromium_driver()
    server = make_server("127.0.0.1", 0, make_app(store, data.layout).server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#heatmap .heatmaplayer"))
        assert "click a head" in browser.find_element(By.ID, "status").text
        drag = browser.find_element(By.CSS_SELECTOR, "#heatmap .nsewdrag")
        ActionChains(browser).move_to_element(drag).click().perform()
        wait.until(
            lambda b: (
                "head" in b.find_element(By.ID, "status").text
                and "layer" in b.find_element(By.ID, "status").text
            )
        )
        status = browser.find_element(By.ID, "status").text
        assert "example 0 (with)" in status
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#pattern .heatmaplayer"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#tokens span")) > 3
        assert not browser.find_elements(By.XPATH, "//script[contains(text(), 'alert(1)')]")
        time.sleep(0.5)  # let plotly finish drawing before the screenshot
        shots = [tmp_path / "dashboard.png"] + ([ARTIFACTS / "dashboard.png"] if ARTIFACTS.is_dir() else [])
        for shot in shots:
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.quit()
        server.shutdown()
        thread.join(timeout=5)


def test_circuit_and_position_views(lm, tmp_path):
    store = hl.Store.create(tmp_path / "s", lm)
    with torch.no_grad(), hl.capture(lm) as rec:
        lm.model(**lm.tokenizer(["w1 w2 w1 w2"], return_tensors="pt"))
    store.append(rec, examples=[0])
    assert circuit_figure(BrowserData(store)) is None and position_figure(BrowserData(store)) is None
    heads = [(la, h) for la in range(lm.n_layers) for h in range(lm.n_heads)]
    store.save_result(
        "activation-patching",
        pd.DataFrame(
            [
                {"layer": la, "head": h, "direction": d, "positions": "all", "score": la + h / 10}
                for la, h in heads
                for d in ("denoising", "noising")
            ]
        ),
    )
    store.save_result(
        "circuit-overlap",
        pd.DataFrame(
            [
                {
                    "layer": la,
                    "head": h,
                    "score_a": 0.1 * h,
                    "score_b": 0.2 * la,
                    "in_a": h > 1,
                    "in_b": la > 0,
                }
                for la, h in heads
            ]
        ).assign(task_a="ioi", task_b="induction", overlap_coefficient=0.5, iou=1 / 3),
    )
    store.save_result(
        "slot-profile",
        pd.DataFrame(
            [{"layer": la, "head": h, "k": 3, "slot_0": 0.5, "slot_1": 0.2, "slot_2": 0.3} for la, h in heads]
        ),
    )
    data = BrowserData(store)
    circuits = circuit_figure(data)
    assert len(circuits.data) == 4  # two patching directions + both overlap tasks
    assert "coefficient 0.50, IoU 0.33" in circuits.layout.title.text
    assert list(circuits.data[0].x)[:2] == ["L0H0", "L0H1"]
    position = position_figure(data)
    assert len(position.data) == len(heads) and list(position.data[0].y) == [0.5, 0.2, 0.3]
    ids = {c.id for c in build_layout(data).children if getattr(c, "id", None)}
    assert {"circuits", "position"} <= ids


def test_result_options_are_listed_from_the_declaration(data):
    from headlab.analyses.registry import analysis, as_text

    listed = str(result_options(data, Source(kind="result", name="sinks", column="score").encode()))
    for key, option in analysis("sinks").options.items():
        assert (
            key in listed and option.describe() in listed and f"default {as_text(option.default)}" in listed
        )
    assert "not recorded" in listed  # the fixture saved the result without its options
    assert result_options(data, Source(kind="stat", name="entropy", column="").encode()) == []
    assert result_options(data, None) == []


# --- an LVLM store: zoo:llava, three scene questions and a text-only one, with and without the image ---

QUESTION = "USER: <image>\nIs there a cup in the image? ASSISTANT:"


def lvlm_store(path: Path):
    """zoo:llava captured by `headlab capture`'s code path: q0..q2 with a scene image (labels, answers,
    thumbnails) and q3 without one, under with_image and no_image; every tower, all attention layers."""
    from headlab.datasets import scenes
    from headlab.datasets.prompts import PromptItem
    from headlab.runs.batch import capture_to_store

    lm = hl.load("zoo:llava")
    path.mkdir(parents=True, exist_ok=True)
    items = []
    for i, scene in enumerate(scenes.make_scenes(3)):
        image = path / f"scene_{i}.png"
        scenes.render(scene).save(image)
        meta = {"label": ["no", "yes"][i % 2], "answer": ["yes", "no", "yes"][i]}
        items.append(
            PromptItem(id=f"q{i}", prompt=QUESTION, image=image, meta=meta, line=i + 1, image_name=image.name)
        )
    items.append(PromptItem(id="q3", prompt="USER: Is there a cup? ASSISTANT:", image=None, meta={}, line=4))
    store = hl.Store.create(path / "store", lm)
    report = capture_to_store(
        lm, store, items, conditions=["with_image", "no_image"], attention_layers=None, progress=False
    )
    assert not report.failed, report.failed
    return store


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory):
    return BrowserData(lvlm_store(tmp_path_factory.mktemp("lvlm")))


IMAGE_MASS = Source(kind="stat", name="mass", column="image")


def test_absent_role_counts_as_zero_in_means_and_differences(lvlm):
    """mass [image] by hand: under with_image q3 (text-only) holds no image role, so it adds 0 to the mean
    over 4 examples; under no_image no example holds it, so the matrix is 0 and A - B is A itself."""
    stats = lvlm.store.head_stats(stat="mass", tower="lm", layers=[1], heads=[2])
    stats = stats[stats.step == stats.step.min()]
    with_image = stats[stats.condition == "with_image"]
    assert set(with_image[with_image.role == "image"].example) == {"q0", "q1", "q2"}
    by_hand = with_image[with_image.role == "image"].value.sum() / 4
    z = lvlm.matrix(IMAGE_MASS, "lm", "with_image")
    np.testing.assert_allclose(z[1, 2], by_hand, rtol=1e-6)
    np.testing.assert_array_equal(lvlm.matrix(IMAGE_MASS, "lm", "no_image"), 0.0)
    fig = heatmap_figure(lvlm, IMAGE_MASS.encode(), "lm", "diff", "with_image", "no_image")
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float)[1, 2], by_hand, rtol=1e-6)
    side = heatmap_figure(lvlm, IMAGE_MASS.encode(), "lm", "side", "with_image", "no_image", (1, 2))
    assert [t.name or "" for t in side.data] == ["", "", ""] and len(side.layout.shapes) == 3
    panels = [np.asarray(t.z, dtype=float)[1, 2] for t in side.data]
    np.testing.assert_allclose(panels, [by_hand, 0.0, by_hand], rtol=1e-6)
    shape = side.layout.shapes[0]
    assert (shape.x0, shape.x1, shape.y0, shape.y1) == (1.5, 2.5, 0.5, 1.5)  # head 2 of layer 1 outlined
    per = lvlm.per_example(IMAGE_MASS, "lm", "with_image", 1, 2)
    assert per["q3"] == 0.0 and per.mean() == pytest.approx(by_hand, rel=1e-6)


def test_example_table_and_header_come_from_example_info(lvlm):
    from headlab.dashboards.views import example_header, example_table

    table, note = example_table(lvlm, 1, "")
    assert note == "page 1 of 1 (4 examples)"
    head = [th.children for th in table.children[0].children.children]
    assert head == ["id", "prompt", "label", "answer [no_image]", "answer [with_image]", "image"]
    rows = table.children[1].children
    q1 = rows[1].children
    info = lvlm.store.example_info("q1", condition="with_image")
    assert q1[0].children.id == {"type": "open-example", "index": "q1", "where": "table"}
    assert [q1[i].children for i in (2, 3, 4)] == ["yes", "no", "no"]  # label; answer per condition
    assert q1[5].children.src.startswith("data:image/png;base64,")
    assert rows[3].children[5].children == ""  # q3: no image
    assert info.thumbnail is not None
    _, filtered = example_table(lvlm, 1, "q2")
    assert filtered == "page 1 of 1 (1 examples matching)"
    header = str(example_header(lvlm, "q1"))
    assert "Is there a cup in the image?" in header and "data:image/png;base64," in header


def test_top_and_bottom_examples_and_deciles(lvlm):
    from headlab.dashboards.views import decile_examples, top_examples

    per = lvlm.per_example(IMAGE_MASS, "lm", "with_image", 1, 2).sort_values(ascending=False)
    panel = top_examples(lvlm, IMAGE_MASS.encode(), "lm", "with_image", [1, 2])
    top, bottom, deciles = (column.children[1].children for column in panel[1].children)
    assert [li.children[0].id["index"] for li in top] == per.index.tolist()
    assert [li.children[0].id["index"] for li in bottom] == per.index.tolist()[::-1]
    assert len(deciles) == 4  # fewer than 10 examples: one per example
    values = pd.Series(np.arange(100.0), index=[f"e{i}" for i in range(100)])
    picked = decile_examples(values)
    assert len(picked) == 10 and picked.iloc[0] in (94.0, 95.0) and picked.iloc[-1] in (4.0, 5.0)
    result = Source(kind="result", name="sinks", column="score").encode()
    assert "no per-example values" in str(top_examples(lvlm, result, "lm", "with_image", [1, 2]))


def test_lvlm_pattern_has_stored_tokens_and_the_image_over_the_picture(lvlm):
    matrix, tokens, grid, status = pattern_outputs(lvlm, (1, 2), "q0", "lm", "with_image", None)
    stored = lvlm.store.tokens("q0", condition="with_image")
    assert list(matrix.data[0].x) == [f"{i}:{t}" for i, t in enumerate(stored)]
    assert next(iter(matrix.data[0].y)) == "0:<s>" and "tokens stored with the example" in status
    assert [s.children for s in tokens[1:]] == stored
    row = lvlm.store.pattern("q0", 1, 2, condition="with_image")[-1]
    image = [i for i, t in enumerate(stored) if t == "<image>"]
    np.testing.assert_allclose(np.asarray(grid.data[0].z, dtype=float).ravel(), row[image], rtol=1e-6)
    assert grid.layout.images[0].source.startswith("data:image/png;base64,") and grid.data[0].opacity < 1
    _, _, vgrid, vstatus = pattern_outputs(lvlm, (0, 1), "q0", "vision", "with_image", 0)
    assert "vision layer 0 head 1" in vstatus and "patches by row and column" in vstatus
    vrow = lvlm.store.pattern("q0", 0, 1, tower="vision", condition="with_image")[0]
    np.testing.assert_allclose(np.asarray(vgrid.data[0].z, dtype=float).ravel(), vrow[1:], rtol=1e-6)
    _, _, none, _ = pattern_outputs(lvlm, (0, 1), "q0", "lm", "no_image", None)
    assert none.layout.annotations[0].text == "no image part in this example"


def test_scatter_places_every_head_by_two_sources(lvlm):
    from headlab.dashboards.views import scatter_figure

    entropy = Source(kind="stat", name="entropy", column="")
    alpha = Source(kind="stat", name="alpha", column="pos:0")
    fig = scatter_figure(lvlm, entropy.encode(), IMAGE_MASS.encode(), alpha.encode(), "lm", "with_image")
    points = fig.data[0]
    assert len(points.x) == 2 * 4  # zoo:llava's language model: 2 layers x 4 heads
    layer, head = points.customdata[5]
    np.testing.assert_allclose(points.x[5], lvlm.matrix(entropy, "lm", "with_image")[layer, head])
    np.testing.assert_allclose(points.y[5], lvlm.matrix(IMAGE_MASS, "lm", "with_image")[layer, head])
    np.testing.assert_allclose(points.marker.color[5], lvlm.matrix(alpha, "lm", "with_image")[layer, head])
    assert fig.layout.xaxis.title.text == "entropy"


def test_long_sequences_are_block_averaged_on_the_server():
    from headlab.dashboards.patterns import ExampleTokens, block_mean, pattern_view

    rng = np.random.default_rng(0)
    n = 600
    full = rng.random((n, n))
    tokens = ExampleTokens([str(i) for i in range(n)], [], "positions")
    view = pattern_view(lambda queries: full if queries is None else full[queries], n, 10, tokens, None, "")
    assert view.block == 3 and view.rows.shape == (200, 200) and view.axis[1] == "3-5"
    np.testing.assert_allclose(view.rows[1, 2], full[3:6, 6:9].mean())
    np.testing.assert_allclose(view.row, full[10])  # the query's own row stays exact
    np.testing.assert_allclose(block_mean(np.arange(10.0)[None, :].repeat(2, 0), 4)[0], [1.5, 5.5, 8.5])


def test_url_state_round_trips_and_drives_the_controls(lvlm):
    from headlab.dashboards import state
    from headlab.dashboards.app import sync_state

    view = state.ViewState(
        source=IMAGE_MASS.encode(),
        tower="lm",
        mode="side",
        a="with_image",
        b="no_image",
        example="q1",
        query=3,
        head=(1, 2),
    )
    assert state.decode(state.encode(view)) == view
    assert state.decode("?head=x,1&query=two&zzz=1") == state.ViewState()
    values = [IMAGE_MASS.encode(), "lm", "single", "with_image", "no_image", "q0", None]
    out = sync_state("url", state.encode(view), None, None, values, None)
    assert (
        out[0] is no_update
        and out[1] == [1, 2]
        and out[2:] == (no_update, no_update, "side", no_update, no_update, "q1", 3)
    )
    clicked = sync_state("heatmap", "", {"points": [{"x": 3, "y": 0}]}, None, values, [1, 2])
    assert clicked[1] == [0, 3] and state.decode(clicked[0]).head == (0, 3)
    opened = sync_state(
        {"type": "open-example", "index": "q2", "where": "top"}, "", None, "q2", values, [1, 2]
    )
    assert opened[7] == "q2" and state.decode(opened[0]).example == "q2"
