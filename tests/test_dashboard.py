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


def _click(layer: int, head: int) -> dict:
    return {"points": [{"x": head, "y": layer, "z": 0.0}]}


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
    matrix, tokens, grid, status = pattern_outputs(data, _click(1, 2), 0, "lm", "with", None)
    want = store.pattern(0, 1, 2, condition="with")
    np.testing.assert_allclose(np.asarray(matrix.data[0].z, dtype=float), want, atol=1e-6)
    ids = lm.tokenizer(PROMPTS["with"][0])["input_ids"]
    spans = tokens[1:]
    assert len(spans) == len(ids) == want.shape[1]
    assert [s.children for s in spans] == lm.tokenizer.convert_ids_to_tokens(ids)
    assert "layer 1 head 2" in status and "tokenizer" in status
    assert grid.layout.annotations[0].text == "no image part in this example"
    _, _, _, status = pattern_outputs(data, _click(0, 0), 0, "lm", "with", 2)
    assert "query 2" in status
    _, _, _, missing = pattern_outputs(data, _click(0, 0), 99, "lm", "with", None)
    assert "example 99 is not stored" in missing


def test_without_a_model_tokens_are_positions(store):
    _, tokens, _, status = pattern_outputs(BrowserData(store), _click(0, 0), 1, "lm", "without", None)
    assert [s.children for s in tokens[1:]] == [str(i) for i in range(len(tokens) - 1)]
    assert "positions" in status


def test_dataset_text_is_escaped(data):
    _, tokens, _, _ = pattern_outputs(data, _click(0, 0), 1, "lm", "with", None)
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
