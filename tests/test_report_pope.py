"""`headlab report pope`: end-to-end on the zoo LLaVA and the synthetic POPE files, resume, interruption,
problem counting, HTML escaping, and the paired bootstrap on hand cases."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from headlab.cli import app
from headlab.datasets.pope import PopeQuestion, load_pope, score_pope
from headlab.reports import benchmark
from headlab.reports.html import Page
from headlab.runs import answering

runner = CliRunner()


def _answers(path) -> list[dict]:
    """The answer lines of an answer log (its first line is the header naming the model)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "headlab_answers" in lines[0]
    return lines[1:]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pope") / "report"
    result = runner.invoke(app, ["report", "pope", "--out", str(out), "--n", "6", "--vhd-images", "2"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_defaults_end_to_end(default_run):
    out, output = default_run
    for name in ("report.json", "report.md", "report.html", "answers.jsonl"):
        assert (out / name).is_file()
    assert f"report: {out / 'report.html'}" in output.replace("\n", "")
    report = json.loads((out / "report.json").read_text())
    lines = _answers(out / "answers.jsonl")
    assert len(lines) == 3 * 3 * 6  # conditions x splits x questions
    assert set(report["splits"]) == {"pope_random", "pope_popular", "pope_adversarial"}
    for split, entry in report["splits"].items():
        questions = load_pope(out / "data" / f"{split}.json").questions[:6]
        for condition in ("none", "vhr", "var"):
            answers = {
                r["question_id"]: r["answer"]
                for r in lines
                if (r["condition"], r["split"]) == (condition, split)
            }
            direct = score_pope(questions, answers)
            got = entry["metrics"][condition]
            for key in ("n", "accuracy", "precision", "recall", "f1", "yes_ratio", "unanswered"):
                assert got[key] == getattr(direct, key)
            assert got["n"] == 6
        for condition in ("vhr", "var"):
            d = entry["vs_none"][condition]
            assert d["accuracy"]["ci_low"] <= d["accuracy"]["delta"] <= d["accuracy"]["ci_high"]
    assert "layers=(0, 1)" in report["conditions"]["var"]  # the 2-layer zoo model: said in the report
    assert len(report["vhd_per_head"]) == 2 * 4  # layers x heads of the zoo LLaVA
    html = (out / "report.html").read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"?https?:", html)  # self-contained
    assert html.count("Plotly.newPlot") == 6  # a bar chart per split, image attention, visual sinks, VHD
    maps = report["attention_maps"]
    assert len(maps["image_mass"]) == 8 and len(maps["visual_sinks"]["phi"]) == 2  # 2 layers x 4 heads
    assert all(len(row) == 16 for row in maps["visual_sinks"]["phi"])  # the 4 x 4 image tokens


def test_rerun_resumes_and_reproduces(default_run):
    out, _ = default_run
    before = (out / "answers.jsonl").read_text()
    report = json.loads((out / "report.json").read_text())
    result = runner.invoke(app, ["report", "pope", "--out", str(out), "--n", "6", "--vhd-images", "2"])
    assert result.exit_code == 0, result.output
    assert "0 answered, 54 already" in result.output
    assert (out / "answers.jsonl").read_text() == before
    assert json.loads((out / "report.json").read_text()) == report


def test_problems_escaping_and_interrupt(default_run, tmp_path, monkeypatch):
    src, _ = default_run
    images = tmp_path / "images"
    shutil.copytree(src / "data" / "images", images)
    rows = [json.loads(line) for line in (src / "data" / "pope_random.json").read_text().splitlines()[:3]]
    rows[0]["text"] = "<script>alert(1)</script> Is there a car?"
    rows.append({"question_id": 999, "image": "nowhere.png", "text": "Is there a cat?", "label": "no"})
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    data = tmp_path / "mine.json"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["report", "pope", "--out", str(out), "--data", str(data), "--images", str(images)]
    args += ["--interventions", "vhr", "--vhd-images", "0"]

    real, calls = answering.generate_answers, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(answering, "generate_answers", flaky)
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert len(_answers(out / "answers.jsonl")) == 2  # what was done is kept
    assert json.loads((out / "report.json").read_text())["interrupted"] is True

    monkeypatch.setattr(answering, "generate_answers", real)
    with open(out / "answers.jsonl", "a") as f:
        f.write("garbage\n")
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # partial: a malformed line and a missing image
    assert "4 answered, 2 already" in result.output  # 3 questions x (none, vhr), 2 done before
    report = json.loads((out / "report.json").read_text())
    entry = report["splits"]["mine"]
    assert len(entry["malformed_lines"]) == 1 and len(entry["missing_images"]) == 1
    assert "nowhere.png" in entry["missing_images"][0]
    assert len(report["problems"]["answers_file"]) == 1
    assert entry["metrics"]["none"]["n"] == 3 and not report["interrupted"]
    html = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "nowhere.png" in (out / "report.md").read_text()


def test_bootstrap_identical_answers_gives_zero_ci():
    labels = ["yes", "no", "yes", "no", "no"]
    answers = ["yes", "yes", "no", "no", "no"]
    d = benchmark.paired_bootstrap(labels, answers, answers)
    for m in ("accuracy", "f1"):
        assert (d[m]["delta"], d[m]["ci_low"], d[m]["ci_high"]) == (0.0, 0.0, 0.0)


def test_bootstrap_all_fixed_and_deterministic():
    labels = ["yes", "no"] * 10
    wrong = ["no" if v == "yes" else "yes" for v in labels]
    d = benchmark.paired_bootstrap(labels, wrong, labels)
    assert d["accuracy"]["delta"] == 1.0 and d["accuracy"]["ci_low"] == 1.0 == d["accuracy"]["ci_high"]
    mixed = labels[:10] + wrong[10:]
    assert benchmark.paired_bootstrap(labels, mixed, labels) == benchmark.paired_bootstrap(
        labels, mixed, labels
    )
    a = benchmark.paired_bootstrap(labels, mixed, labels)["accuracy"]
    assert a["delta"] == 0.5 and 0.0 < a["ci_low"] < 0.5 < a["ci_high"] <= 1.0


def test_flipped_and_conditions():
    qs = [
        PopeQuestion(1, "a.png", "Is there a cat?", "no"),
        PopeQuestion(2, "b.png", "Is there a dog?", "yes"),
    ]
    flips = benchmark.flipped(qs, {1: "Yes", 2: "Yes"}, {1: "No", 2: "Yes"})
    assert flips == [
        {"question_id": 1, "image": "a.png", "question": "Is there a cat?", "label": "no"}
        | {"before": "Yes", "after": "No", "now_correct": True}
    ]
    assert benchmark.parse_conditions("var,vhr") == ["none", "var", "vhr"]
    with pytest.raises(benchmark.InputError, match="subset of none,vhr,var"):
        benchmark.parse_conditions("none,act")
    assert answering.condition_interventions("var", 32)[0][0].layers is None


def test_page_escapes_text():
    page = Page("<b>t</b>")
    page.table(["<q>"], [["<script>x</script>", 0.5, 3]])
    text = page.render()
    assert "<script>x</script>" not in text and "&lt;q&gt;" in text and "0.5000" in text


def _figures(doc):
    from headlab.reports.document import Figure

    return [block.figure for block in doc.blocks if isinstance(block, Figure)]


def test_figures_axes_error_bars_and_plotly_once(default_run):
    """Layer / head axes are categorical (L0.., H0..), the metric bars carry bootstrap intervals, and the
    page loads plotly.js from the folder's one plotly.min.js."""
    import pandas as pd

    from headlab.reports import pope

    out, _ = default_run
    report = json.loads((out / "report.json").read_text())
    figures = _figures(pope.document(report, pd.DataFrame(report["vhd_per_head"])))
    heatmaps = [f for f in figures if f.data[0].type == "heatmap"]
    assert len(heatmaps) == 3  # image attention, visual sinks, VHD
    for fig in heatmaps:
        layout = fig.to_plotly_json()["layout"]
        assert layout["xaxis"]["type"] == layout["yaxis"]["type"] == "category"
        assert list(fig.data[0].y) == ["L0", "L1"]  # the zoo LLaVA's 2 layers, no half steps
    assert [list(f.data[0].x) for f in heatmaps if f.layout.xaxis.title.text == "head"] == [
        ["H0", "H1", "H2", "H3"]
    ] * 2
    bars = [f for f in figures if f.data[0].type == "bar"]
    assert len(bars) == 3
    for fig, entry in zip(bars, report["splits"].values(), strict=True):
        for trace in fig.data:
            low, high = entry["intervals"][trace.name]["accuracy"]
            acc = entry["metrics"][trace.name]["accuracy"]
            assert low <= acc <= high
            assert trace.error_y.array[0] == pytest.approx(high - acc)
            assert trace.error_y.arrayminus[0] == pytest.approx(acc - low)
    html = (out / "report.html").read_text()
    assert html.count('<script src="plotly.min.js"></script>') == 1 and len(html) < 200_000
    assert (out / "plotly.min.js").stat().st_size > 1_000_000 and "plotly.js v" not in html


def test_var_statement_when_nothing_was_redistributed(default_run):
    out, _ = default_run
    var = json.loads((out / "report.json").read_text())["var"]
    assert var["observed"] == var["answers"] == 18 and var["rows_redistributed"] == 0
    assert sum(var["visual_sink_tokens"]) == 0 and max(var["max_phi"]) < var["phi_bound"] == 8.0
    said = "VAR found no visual sink tokens above tau=20 in any layer on this model: the condition equals"
    assert var["statement"].startswith(said + " `none`")
    assert said in (out / "report.html").read_text() and said in (out / "report.md").read_text()
    assert "no token can pass tau=20" in var["statement"]  # phi <= sqrt(64) = 8 < 20


def test_var_statement_when_var_acts(default_run, tmp_path):
    out, _ = default_run
    args = ["report", "pope", "--out", str(tmp_path / "r"), "--data", str(out / "data" / "pope_random.json")]
    result = runner.invoke(
        app, [*args, "--n", "2", "--interventions", "var", "--var-tau", "1", "--vhd-images", "0"]
    )
    assert result.exit_code == 0, result.output
    var = json.loads((tmp_path / "r" / "report.json").read_text())["var"]
    assert var["rows_redistributed"] > 0 and var["answers_edited"] == var["observed"] == 2
    assert var["statement"].startswith("VAR redistributed") and "`none`" not in var["statement"]


def test_var_statement_cases():
    from headlab.reports.var_sinks import statement

    base = {"tau": 20.0, "answers": 10, "observed": 10, "layers": [2, 3], "rows_redistributed": 0}
    base |= {"answers_edited": 0, "sink_tokens": [3, 0], "visual_sink_tokens": [0, 0], "max_phi": [30.0, 5.0]}
    base |= {"hidden_size": 4096, "phi_bound": 64.0}
    assert statement(base).startswith(
        "VAR found no visual sink tokens above tau=20 in any layer on this model (3 text sink tokens"
    )
    assert "cannot exceed" not in statement(base) and "L2 30.00, L3 5.00" in statement(base)
    seen = statement(base | {"visual_sink_tokens": [2, 0], "observed": 4})
    assert seen.startswith("VAR found 2 visual sink tokens") and "4 answers given under var of 10" in seen
    assert statement(base | {"observed": 0}).startswith("VAR's effect was not observed")
    assert statement(base | {"answers": 0}) is None


def test_flipped_tables_are_paged_with_thumbnails(default_run):
    from headlab.reports import pope
    from headlab.reports.document import Document, markdown
    from headlab.reports.html import html_page

    out, _ = default_run
    (split,) = pope.load_splits([out / "data" / "pope_random.json"], None, 6)
    qs = split.questions
    rows = benchmark.flipped(qs, {q.question_id: "Yes" for q in qs}, {q.question_id: "No" for q in qs}) * 20
    entries = {split.name: {"vs_none": {"vhr": {"flipped": rows}}}}
    thumbs = benchmark.flipped_thumbnails([split], entries)
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in thumbs[split.name].values())
    doc = Document("flips")
    benchmark.flipped_section(doc, entries, thumbs)
    md, page = markdown(doc), html_page(doc)
    assert "none -> vhr (120)" in md and "_70 more rows: all 120 are in report.html and report.json._" in md
    assert page.count("<tr hidden>") == 70 and "page 1 of 3 (120 rows)" in page
    images = {q.image for q in qs}
    assert page.count("data:image/jpeg;base64,") == len(images)  # each image stored once
    assert page.count("<img data-thumb=") == 120


def test_var_counts_agree_between_engines():
    """VAR's read-only counts are the same whether its edits run fused or on explicit rows (the oracle)."""
    import torch

    import headlab as hl
    from headlab.datasets import scenes
    from headlab.inputs import prepare

    lm = hl.load("zoo:llava")
    prompt = answering.prompt_for(lm, PopeQuestion(1, "x.png", "Is there a cup in the image?", "yes"))
    inputs = prepare(lm, [prompt], [scenes.render(scenes.make_scenes(1)[0])])
    counts = {}
    for engine in ("fused", "reference"):
        with torch.no_grad(), hl.intervene(lm, hl.VAR(tau=1.0, layers=(0, 1)), engine=engine) as runner:
            lm.model(**inputs)
            counts[engine] = runner.patches[0].take()
    assert counts["fused"] == counts["reference"]
    assert counts["fused"].rows > 0 and counts["fused"].prefills == 1 and counts["fused"].width == 64


def test_batched_answers_equal_batch_one(tmp_path):
    """`--batch-size 8`: the questions of a split are answered 8 at a time (left-padded, VHR's selection and
    VAR's rules per row), with the same answers as batch 1 under every condition, and VAR's counts still
    one record per answer, equal to batch 1's."""
    runs = {}
    for batch in (1, 8):
        out = tmp_path / f"batch{batch}"
        args = ["report", "pope", "--out", str(out), "--n", "10", "--vhd-images", "0", "--var-tau", "1"]
        result = runner.invoke(app, [*args, "--batch-size", str(batch)])
        assert result.exit_code == 0, result.output
        answers = {
            (a["condition"], a["split"], a["question_id"]): a["answer"]
            for a in _answers(out / "answers.jsonl")
        }
        var = json.loads((out / "report.json").read_text())["var"]
        runs[batch] = answers, var
    assert len(runs[1][0]) == 3 * 3 * 10  # conditions x splits x questions
    assert runs[8][0] == runs[1][0]
    assert runs[8][1] == runs[1][1] and runs[1][1]["observed"] == 30  # one VAR record per answer


def test_the_run_time_is_the_answering_time(tmp_path, monkeypatch):
    """`AnswerRun.seconds` is the wall time of answering (a batch loop once overwrote its start time)."""
    import headlab as hl
    from headlab.datasets.scenes import write_pope_benchmark
    from headlab.reports.pope import load_splits
    from headlab.runs.answers import AnswerLog, ModelIdentity

    lm = hl.load("zoo:llava")
    data = write_pope_benchmark(tmp_path / "data", n_images=3)
    split = load_splits([data / "pope_random.json"], None, 5)[0]
    log = AnswerLog(tmp_path / "answers.jsonl", ModelIdentity.of(lm, "zoo:llava"))
    monkeypatch.setattr(
        answering, "generate_answers", lambda lm, prompts, images, tokens: ["Yes"] * len(prompts)
    )
    ticks = iter([100.0, 107.5])
    monkeypatch.setattr(answering.time, "perf_counter", lambda: next(ticks))
    run = answering.answer_all(lm, [split], ["none"], log, batch_size=2)
    assert run.done == len(split.questions) == 5 and run.seconds == 7.5
