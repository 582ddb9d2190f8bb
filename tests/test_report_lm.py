"""`headlab report sinks` and `headlab report position-bias`: end-to-end on the zoo LM, numbers equal to direct
calls of the analyses, resume without recomputation, escaping, PINE unavailable on a model without RoPE."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import headlab as hl
from headlab.analyses import position, sinks
from headlab.cli import app
from headlab.reports import position_bias as position_report
from headlab.reports import sinks as sinks_report
from headlab.reports.document import Figure
from headlab.store import Store

runner = CliRunner()
N = 3


def _invoke(*args, code: int = 0):
    result = runner.invoke(app, ["report", *map(str, args)])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def sinks_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sinks") / "report"
    return out, _invoke("sinks", "--out", out, "--n", N)


@pytest.fixture(scope="module")
def position_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("position") / "report"
    return out, _invoke("position-bias", "--out", out, "--n", N)


def _close(a, b):
    return a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_sinks_end_to_end(sinks_run):
    out, output = sinks_run
    for name in ("report.json", "report.md", "report.html"):
        assert (out / name).is_file()
    assert f"report: {out / 'report.html'}" in output.replace("\n", "")
    rep = json.loads((out / "report.json").read_text())
    store = Store.open(out / "store")
    assert rep["n_prompts"] == 3 * N and len(store.committed()) == 3 * N
    assert {e["task"] for e in rep["examples"]} == set(sinks_report.TASKS)
    metric = sinks.sink_metric(store, tower="lm")
    assert _close(rep["sink_metric"]["percent"], metric.percent)
    assert rep["sink_metric"]["n_examples"] == metric.n_examples == 3 * N
    scores = sinks.sink_scores(store, tower="lm")
    assert len(rep["heads"]) == len(scores) == 8  # zoo:lm: 2 layers x 4 heads
    for row, (_, want) in zip(rep["heads"], scores.iterrows(), strict=True):
        assert (row["layer"], row["head"], row["is_sink"]) == (
            want["layer"],
            want["head"],
            bool(want["is_sink"]),
        )
        assert _close(row["alpha"], want.alpha)
    assert sorted((h["layer"], h["head"]) for h in rep["sink_heads"]) == sorted(
        zip(scores[scores.is_sink]["layer"], scores[scores.is_sink]["head"], strict=True)
    )
    hidden = sinks.hidden_sinks(store, tower="lm")
    assert rep["hidden_sinks"]["n_hits"] == len(hidden)
    massive = sinks.massive_activations(store)
    assert rep["massive_activations"]["n"] == len(massive)
    # the analyses are saved into the store
    assert {"sinks", "hidden-sinks", "massive-activations", "sink-dimensions"} <= set(store.results())
    assert len(store.result("sinks")) == len(scores)
    html = (out / "report.html").read_text()
    assert "alpha_0 per head" in html and "Plotly" in html
    (fig,) = [b.figure for b in sinks_report.document(rep).blocks if isinstance(b, Figure)]
    axes = fig.to_plotly_json()["layout"]
    assert axes["xaxis"]["type"] == axes["yaxis"]["type"] == "category"
    assert list(fig.data[0].x) == ["H0", "H1", "H2", "H3"] and list(fig.data[0].y) == ["L0", "L1"]
    if not len(massive):
        assert "none found" in html and "none found" in (out / "report.md").read_text()


def test_sinks_rerun_captures_nothing(sinks_run):
    out, _ = sinks_run
    store = Store.open(out / "store")
    shards, examples = store.shard_ids(), len(store.examples())
    before = json.loads((out / "report.json").read_text())
    output = _invoke("sinks", "--out", out, "--n", N)
    assert f"0 captured, {3 * N} already in" in output.replace("\n", "")
    store = Store.open(out / "store")
    assert store.shard_ids() == shards and len(store.examples()) == examples
    after = json.loads((out / "report.json").read_text())
    assert after["capture"]["done"] == 0 and after["capture"]["skipped"] == 3 * N
    assert after["sink_metric"] == before["sink_metric"] and after["heads"] == before["heads"]


def test_sinks_escapes_prompts_and_lists_bad_lines(tmp_path):
    data = tmp_path / "prompts.jsonl"
    lines = [
        {"id": 0, "prompt": "<script>alert(1)</script> w1 w2 w3"},
        {"id": 1, "prompt": 'a "quoted" & <b>bold</b> prompt'},
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "report"
    _invoke("sinks", "--out", out, "--data", data, code=1)  # partial: a bad line
    html = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_prompts"] == 2 and any("not valid JSON" in p for p in rep["problems"])
    assert rep["examples"][0]["prompt"] == lines[0]["prompt"]  # kept verbatim in the JSON


def test_sinks_bad_input(tmp_path):
    result = runner.invoke(app, ["report", "sinks", "--out", str(tmp_path / "r"), "--data", "/nope.jsonl"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["report", "sinks", "--out", str(tmp_path / "r"), "--n", "0"])
    assert result.exit_code == 2 and "at least 1" in result.output
    result = runner.invoke(app, ["report", "sinks", "--out", str(tmp_path / "r"), "--model", "zoo:vit"])
    assert result.exit_code == 2 and "language model" in result.output


def test_position_end_to_end(position_run):
    out, output = position_run
    for name in ("report.json", "report.md", "report.html", position_report.POSITION_CACHE):
        assert (out / name).is_file()
    assert f"report: {out / 'report.html'}" in output.replace("\n", "")
    rep = json.loads((out / "report.json").read_text())
    assert rep["pine_unavailable"] is None and rep["computed"] == 4 and rep["cached"] == 0
    lm = hl.load("zoo:lm")
    curve = position.lost_in_the_middle(lm, n=N, k=4)
    for method, group in curve.groupby("method"):
        got = rep["lost_in_the_middle"][method]
        assert [r["gold"] for r in got] == group.gold.tolist()
        assert all(_close(r["accuracy"], a) for r, a in zip(got, group.accuracy, strict=True))
    summary = position.position_curve_summary(pd_frame(rep))
    assert all(_close(s["spread"], w) for s, w in zip(rep["curve_summary"], summary.spread, strict=True))
    judge = position.judge_position_bias(lm, n=N)
    for _, want in judge.iterrows():
        got = rep["judge"][want.method]
        assert _close(got["flip_rate"], want.flip_rate) and _close(got["accuracy"], want.accuracy)
    assert rep["judge"]["pine"]["flip_rate"] == 0.0
    html = (out / "report.html").read_text()
    assert "Lost in the middle" in html and "flip rate" in html


def pd_frame(rep):
    import pandas as pd

    return pd.DataFrame([r for rows in rep["lost_in_the_middle"].values() for r in rows])


def test_position_rerun_uses_cache(position_run, monkeypatch):
    out, _ = position_run
    cache = (out / position_report.POSITION_CACHE).read_bytes()

    def boom(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(position, "lost_in_the_middle", boom)
    monkeypatch.setattr(position, "judge_position_bias", boom)
    # the model is still loaded: the cache is matched on its fingerprint, not on the --model text
    output = _invoke("position-bias", "--out", out, "--n", N)
    assert "0 parts computed, 4 from the cache" in output
    assert (out / position_report.POSITION_CACHE).read_bytes() == cache
    rep = json.loads((out / "report.json").read_text())
    assert rep["computed"] == 0 and rep["judge"]["pine"]["flip_rate"] == 0.0


def test_position_pine_unavailable_without_rope(tmp_path):
    from headlab.zoo.random_models import build_random

    model = build_random("gpt2", tmp_path / "gpt2")
    out = tmp_path / "report"
    output = _invoke("position-bias", "--out", out, "--model", model, "--n", 2)
    rep = json.loads((out / "report.json").read_text())
    assert rep["pine_unavailable"] and "PINE unavailable" in output
    assert list(rep["judge"]) == ["plain"] and list(rep["lost_in_the_middle"]) == ["plain"]
    assert "PINE unavailable" in (out / "report.html").read_text()


def test_position_bad_input(tmp_path):
    result = runner.invoke(app, ["report", "position-bias", "--out", str(tmp_path / "r"), "--n", "0"])
    assert result.exit_code == 2 and "at least 1" in result.output
    result = runner.invoke(app, ["report", "position-bias", "--out", str(tmp_path / "r"), "--k", "1"])
    assert result.exit_code == 2 and "at least 2" in result.output
    out = tmp_path / "other"
    out.mkdir()
    (out / position_report.POSITION_CACHE).write_text(json.dumps({"model": "zoo:other", "entries": {}}))
    result = runner.invoke(app, ["report", "position-bias", "--out", str(out), "--n", "2"])
    assert result.exit_code == 2 and "another model" in result.output


def test_sinks_store_with_other_prompts_is_refused(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"id": 0, "prompt": "w1 w2 w3 w4 w5"}) + "\n")
    out = tmp_path / "report"
    _invoke("sinks", "--out", out, "--data", data)
    data.write_text(json.dumps({"id": 0, "prompt": "w9 w8 w7"}) + "\n")
    result = runner.invoke(app, ["report", "sinks", "--out", str(out), "--data", str(data)])
    assert result.exit_code == 2 and "another prompt under id 0" in result.output
