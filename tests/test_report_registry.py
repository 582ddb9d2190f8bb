"""The report registry and the document model: every report is one declaration from which its command is
generated (flags, help, defaults, ranges checked once), and one document renders both Markdown and HTML."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import plotly.graph_objects as go
import pytest
import typer
from typer.testing import CliRunner

from headlab.cli import app
from headlab.commands.report import command
from headlab.errors import InputError
from headlab.reports.document import Document, markdown
from headlab.reports.html import html_page
from headlab.reports.output import write_report_files
from headlab.reports.registry import Report, ReportOption, ReportResult, out_option, registered
from headlab.runs.outcome import Outcome

runner = CliRunner()
NAMES = sorted(registered())


def test_every_report_is_registered_once():
    assert NAMES == ["amber", "chair", "mme", "pope", "position-bias", "sinks"]


@pytest.mark.parametrize("name", NAMES)
def test_declaration_matches_its_pipeline_and_command(name):
    report = registered()[name]
    keywords = inspect.signature(report.run).parameters
    flags = [option.flag for option in report.options]
    assert len(set(flags)) == len(flags) and flags[0] == "--out"
    for option in report.options:
        assert option.keyword in keywords, f"{name}: {option.flag} has no pipeline keyword"
    params = {p.name: p for p in report.parameters()}
    for option in report.options:
        if option.convert is None and not option.many:
            assert params[option.name].default == keywords[option.keyword].default  # declared once
    help_text = runner.invoke(app, ["report", name, "--help"]).output
    assert " ".join(report.help.split()[:2]) in help_text
    for flag in flags:
        assert flag in help_text


@pytest.mark.parametrize(
    ("name", "values", "says"),
    [
        ("pope", {"n": 0}, "--n must be at least 1, got 0"),
        ("pope", {"var_tau": math.nan}, "--var-tau must be a positive number, got nan"),
        ("pope", {"vhd_images": -1}, "--vhd-images must be 0 (no image maps) or more, got -1"),
        ("mme", {"max_new_tokens": 0}, "the number of tokens to generate must be at least 1, got 0"),
        ("amber", {"gen_tokens": 0}, "the number of tokens to generate must be at least 1, got 0"),
        ("sinks", {"batch_size": 0}, "batch size must be at least 1, got 0"),
        ("position-bias", {"k": 1}, "--k must be at least 2 documents, got 1"),
    ],
)
def test_options_are_checked_by_their_declaration(name, values, says):
    with pytest.raises(InputError) as err:
        registered()[name].check(**values)
    assert str(err.value) == says
    registered()[name].check(**dict.fromkeys(values))  # None: not given


def test_a_bad_option_declaration_is_refused():
    with pytest.raises(TypeError):
        ReportOption(name="x", type=str, ge=1, help="")
    with pytest.raises(TypeError):
        ReportOption(name="x", type=int, folder="out", help="")


def _toy(out: Path, *, n: int = 2, label: str = "a", progress=None) -> ReportResult:
    """A report in a few lines: its pipeline writes a document of one table."""
    TOY.check(out=out, n=n)
    report = {"model": "toy", "rows": n}
    report["outcome"] = Outcome(items=n, answered=n, failed=0, bad_input=0).as_dict()
    doc = Document("toy")
    doc.table(["i", "label"], [[i, label] for i in range(n)])
    return ReportResult(write_report_files(Path(out), report, doc), report, None)


TOY = Report(
    name="toy",
    help="A toy report.",
    options=(
        out_option("report.json/.md/.html"),
        ReportOption(name="n", type=int, ge=1, help="rows"),
        ReportOption(name="label", type=str, help="the label column"),
    ),
    run=_toy,
    summary=lambda result, out: [f"{result.report['rows']} rows in {out}"],
)


def test_a_declaration_is_a_command(tmp_path):
    toy_app = typer.Typer()
    toy_app.command("toy", help=TOY.help, epilog=TOY.epilog)(command(TOY))
    toy_app.command("other")(lambda: None)  # a group, as `headlab report` is
    help_text = runner.invoke(toy_app, ["toy", "--help"]).output
    assert "--n" in help_text and "--label" in help_text and "Exit code: 0 complete" in help_text
    result = runner.invoke(toy_app, ["toy", "--out", str(tmp_path / "r"), "--n", "3"])
    assert result.exit_code == 0, result.output
    assert f"3 rows in {tmp_path / 'r'}" in result.output and "report: " in result.output
    assert "| 2 | a |" in (tmp_path / "r" / "report.md").read_text()
    bad = runner.invoke(toy_app, ["toy", "--out", str(tmp_path / "r"), "--n", "0"])
    assert bad.exit_code != 0 and isinstance(bad.exception, InputError)


def test_one_document_renders_markdown_and_html():
    doc = Document("t <1>")
    doc.heading("section")
    doc.paragraph("a <script>alert(1)</script> & b")
    doc.bullets(["one | two"])
    doc.table(["name", "x", "n", "missing"], [["<b>q|r</b>\nnext", 0.5, 3, None], ["nan", math.nan, 0, None]])
    doc.figure(go.Figure(go.Bar(x=[1], y=[2]), layout={"title": "bars"}))
    md, page = markdown(doc), html_page(doc)
    assert md.startswith("# t &lt;1>\n") and "## section" in md
    assert "a &lt;script>alert(1)&lt;/script> &amp; b" in md
    assert "| &lt;b>q\\|r&lt;/b> next | 0.5000 | 3 | n/a |" in md and "| nan | - | 0 | n/a |" in md
    assert "_Figure: bars (in report.html)._" in md
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td>0.5000</td><td>3</td><td>n/a</td>" in page and "Plotly.newPlot" in page
    assert page.count("<h1>") == 1 and "<h2>section</h2>" in page
