"""`headlab report chair`: synthetic CHAIR data in the real format, metrics equal to the scorer on the stored
answers, resume, malformed entries counted, dataset text escaped."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from headlab.cli import app
from headlab.datasets import chair
from headlab.reports.chair import write_chair_benchmark

runner = CliRunner()


def test_chair_report_end_to_end_and_resume(tmp_path):
    out = tmp_path / "out"
    args = ["report", "chair", "--out", str(out), "--n", "6"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "report: " in first.output and (out / "report.html").is_file()
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"none", "vhr", "var"}
    vocab = chair.Vocabulary.from_file(out / "data" / "synonyms.txt")
    truth = chair.load_truth(out / "data" / "truth.json", vocab)
    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()][1:]  # 0: header
    for condition, metrics in report["metrics"].items():
        captions = {r["question_id"]: r["answer"] for r in lines if r["condition"] == condition}
        score = chair.score_chair(captions, truth, vocab)
        assert metrics["chair_i"] == score.chair_i and metrics["recall"] == score.recall
        for key in ("chair_s", "chair_i", "recall"):
            low, high = metrics["intervals"][key]
            assert low <= metrics[key] <= high
    assert report["var"]["statement"].startswith("VAR found no visual sink tokens above tau=20")
    before = (out / "answers.jsonl").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 answered, 18 already" in again.output
    assert (out / "answers.jsonl").read_text() == before


def test_chair_problems_and_escaping(tmp_path):
    data = write_chair_benchmark(tmp_path / "data", n_images=3)
    entries = json.loads((data / "images.json").read_text())
    entries.append({"image_id": "x", "image": "<script>alert(1)</script>.png"})  # malformed
    entries.append({"image_id": entries[0]["image_id"] + 99, "image": "nowhere.png"})  # no ground truth
    (data / "images.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["report", "chair", "--out", str(out), "--data", str(data), "--interventions", "none"]
    )
    assert result.exit_code == 1, result.output  # partial: two bad entries
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 3 and len(report["problems"]["images"]) == 2
    html = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
