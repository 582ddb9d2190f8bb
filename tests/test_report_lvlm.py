"""`headlab report mme`: end-to-end on the zoo LLaVA and the synthetic MME subtask, resume, malformed lines
counted, HTML escaping."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from headlab.cli import app
from headlab.datasets.mme import MmeFile, MmeLine, load_mme_results, score_mme
from headlab.reports import mme as mme_report

runner = CliRunner()


def _answers(path) -> list[dict]:
    """The answer lines of an answer log (its first line is the header naming the model)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "headlab_answers" in lines[0]
    return lines[1:]


@pytest.fixture(scope="module")
def mme_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mme") / "report"
    result = runner.invoke(app, ["report", "mme", "--out", str(out), "--n", "3"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_mme_defaults_end_to_end(mme_run):
    out, output = mme_run
    for name in ("report.json", "report.md", "report.html", "answers.jsonl", "data/existence.txt"):
        assert (out / name).is_file()
    assert f"report: {out / 'report.html'}" in output.replace("\n", "")
    report = json.loads((out / "report.json").read_text())
    lines = _answers(out / "answers.jsonl")
    assert len(lines) == 3 * 3 * 2  # conditions x images x 2 questions
    raw = (out / "data" / "existence.txt").read_text().splitlines()[:6]
    for condition in ("none", "vhr", "var"):
        answers = {r["question_id"]: r["answer"] for r in lines if r["condition"] == condition}
        expected = MmeFile("existence")
        for number, line in enumerate(raw, start=1):
            image, question, gt = line.split("\t")
            expected.lines.append(MmeLine(image, question, gt.lower(), answers[number]))
        direct = score_mme(expected)
        got = report["subtasks"]["existence"]["metrics"][condition]
        assert got == {k: getattr(direct, k) for k in got}
        assert got["questions"] == 6 and got["images"] == 3
        written = score_mme(load_mme_results(out / "results" / condition / "existence.txt"))
        assert written == direct
        assert report["total"][condition] == direct.score
    for condition in ("vhr", "var"):
        d = report["subtasks"]["existence"]["vs_none"][condition]
        assert d["accuracy"]["ci_low"] <= d["accuracy"]["delta"] <= d["accuracy"]["ci_high"]
    assert "layers=(0, 1)" in report["conditions"]["var"]
    assert "<table>" in (out / "report.html").read_text()
    _check_score_error_bars(report)


def _check_score_error_bars(report: dict) -> None:
    """The score chart's error bars are each condition's bootstrap interval over images."""
    from headlab.reports.document import Figure

    sub = report["subtasks"]["existence"]
    (fig,) = [b.figure for b in mme_report.document(report).blocks if isinstance(b, Figure)]
    for trace in fig.data:
        low, high = sub["intervals"][trace.name]["score"]
        score = sub["metrics"][trace.name]["score"]
        assert low <= score <= high and trace.error_y.array[0] == pytest.approx(high - score)


def test_mme_resume_answers_nothing(mme_run, tmp_path):
    out, _ = mme_run
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    before = (copy / "answers.jsonl").read_text()
    result = runner.invoke(app, ["report", "mme", "--out", str(copy), "--n", "3"])
    assert result.exit_code == 0, result.output
    assert "0 answered, 18 already" in result.output
    assert (copy / "answers.jsonl").read_text() == before


def test_mme_escaping_and_malformed_lines(tmp_path):
    data = mme_report.write_mme_benchmark(tmp_path / "data", n_images=2)
    lines = (data / "existence.txt").read_text().splitlines()
    image = lines[0].split("\t")[0]
    lines[0] = f"{image}\tIs there a <script>alert(1)</script> here?\tYes"
    lines.append("only two\tfields")
    lines.append(f"{image}\tIs there a cup?\tMaybe")
    (data / "existence.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "report",
            "mme",
            "--out",
            str(out),
            "--data",
            str(data / "existence.txt"),
            "--interventions",
            "none,vhr",
        ],
    )
    assert result.exit_code == 1, result.output  # partial: two malformed lines
    assert "2 skipped" in result.output
    report = json.loads((out / "report.json").read_text())
    sub = report["subtasks"]["existence"]
    assert len(sub["malformed_lines"]) == 2 and sub["n_questions"] == 4
    assert set(report["conditions"]) == {"none", "vhr"}
    html = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.fixture(scope="module")
def amber_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("amber") / "report"
    result = runner.invoke(app, ["report", "amber", "--out", str(out), "--n", "4"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_amber_defaults_end_to_end(amber_run):
    from headlab.datasets import amber

    out, output = amber_run
    data = out / "data"
    for name in ("report.json", "report.md", "report.html", "answers.jsonl", "data/relation.json"):
        assert (out / name).is_file()
    assert (data / "safe_words.txt").is_file() and (data / "query" / "query_discriminative.json").is_file()
    assert f"report: {out / 'report.html'}" in output.replace("\n", "")
    report = json.loads((out / "report.json").read_text())
    lines = _answers(out / "answers.jsonl")
    assert len(lines) == 3 * 2 * 4  # conditions x kinds x queries
    questions, _ = amber.load_amber_annotations(data / "annotations.json")
    objects, _ = amber.load_amber_generative(data / "annotations.json")
    relations = amber.load_amber_relations(data / "relation.json")
    safe = amber.load_safe_words(data / "safe_words.txt")
    for condition in ("none", "vhr", "var"):
        gen = {
            r["question_id"]: r["answer"]
            for r in lines
            if (r["condition"], r["split"]) == (condition, "generative")
        }
        dis = {
            r["question_id"]: amber.normalize_yes_no(r["answer"])
            for r in lines
            if (r["condition"], r["split"]) == (condition, "discriminative")
        }
        assert len(gen) == len(dis) == 4
        g = amber.score_amber_generative(gen, objects, relations, safe)
        d = amber.score_amber_discriminative(questions, dis)["overall"]
        got = report["metrics"][condition]
        assert [got[k] for k in ("chair", "cover", "hal", "cog")] == [g.chair, g.cover, g.hal, g.cog]
        assert got["discriminative"]["overall"]["f1"] == d.f1
        assert got["discriminative"]["overall"]["accuracy"] == d.accuracy
        assert got["amber_score"] == amber.amber_score(g.chair, d.f1)
    for condition in ("vhr", "var"):
        d = report["vs_none"][condition]
        for key in ("accuracy", "f1"):
            assert d[key]["ci_low"] <= d[key]["delta"] <= d[key]["ci_high"]
        acc = report["metrics"][condition]["discriminative"]["overall"]["accuracy"]
        assert d["accuracy"]["delta"] == pytest.approx(
            acc - report["metrics"]["none"]["discriminative"]["overall"]["accuracy"]
        )
        f1 = report["metrics"][condition]["discriminative"]["overall"]["f1"]
        assert d["f1"]["delta"] == pytest.approx(
            f1 - report["metrics"]["none"]["discriminative"]["overall"]["f1"]
        )
        assert all("image" in f for f in d["flipped"])
    for metrics in report["metrics"].values():
        for key in ("chair", "cover", "hal", "cog"):
            low, high = metrics["intervals"][key]
            assert low <= metrics[key] <= high
    assert report["var"]["observed"] == report["var"]["answers"] == 8  # 4 queries of each kind


def test_amber_resume_escaping_and_problems(amber_run, tmp_path):
    out, _ = amber_run
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    before = (copy / "answers.jsonl").read_text()
    result = runner.invoke(app, ["report", "amber", "--out", str(copy), "--n", "4"])
    assert result.exit_code == 0, result.output
    assert "0 answered, 24 already" in result.output
    assert (copy / "answers.jsonl").read_text() == before
    # a <script> query and a malformed query entry, on a fresh output folder over the same data
    query = copy / "data" / "query" / "query_discriminative.json"
    entries = json.loads(query.read_text())
    entries[0]["query"] = "Is there a <script>alert(1)</script> here?"
    entries.insert(1, {"id": "x", "image": 3})
    query.write_text(json.dumps(entries))
    fresh = tmp_path / "fresh"
    args = ["report", "amber", "--out", str(fresh), "--data", str(copy / "data"), "--n", "2"]
    result = runner.invoke(app, [*args, "--interventions", "none"])
    assert result.exit_code == 1, result.output  # partial: a malformed query entry
    report = json.loads((fresh / "report.json").read_text())
    assert len(report["problems"]["discriminative_queries"]) == 1
    html = (fresh / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
