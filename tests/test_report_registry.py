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


HOSTILE = "a|b *em* _u_ __x__ <script>x</script> `c` ~~s~~ [l](javascript:x) &amp; \\* end\n# h\n> q\n| x |"


def test_markdown_shows_hostile_text_as_text():
    """Cells and text holding Markdown or HTML syntax and line breaks render as that text (checked with a
    CommonMark + tables parser): no emphasis, code, link, heading, quote, list or raw HTML, no broken table."""
    markdown_it = pytest.importorskip("markdown_it")
    doc = Document(HOSTILE)
    doc.heading(HOSTILE)
    for start in (HOSTILE, "# not a heading", "> not a quote", "- not a list", "1. not a list", "---"):
        doc.paragraph(start)
    doc.bullets([HOSTILE, "- not nested"])
    doc.table([HOSTILE, "n"], [[HOSTILE, -0.5], ["[ref]: http://example.com", 1]])
    rendered = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown(doc))
    for tag in ("<em>", "<strong>", "<code>", "<a ", "<s>", "<blockquote>", "<hr", "<script", "<ol", "<h3"):
        assert tag not in rendered, tag
    assert rendered.count("<h1>") == 1 and rendered.count("<h2>") == 1 and rendered.count("<li>") == 2
    assert rendered.count("<tr>") == 3 and rendered.count("<td>") == 4  # 2 rows x 2 cells: no cell split
    shown = " ".join(HOSTILE.split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert rendered.count(shown) == 6  # title, heading, paragraph, bullet, header cell, body cell: verbatim
    assert f"<td>{shown}</td>" in rendered and "<td>-0.5000</td>" in rendered
    assert "<p>- not a list</p>" in rendered and "<p>---</p>" in rendered


def _long_table(n: int = 120):
    from headlab.reports.document import Thumbnail

    pixel = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    doc = Document("long")
    rows = [[i, Thumbnail(f"img{i % 3}.png", pixel if i % 3 else None), f"q{i}"] for i in range(n)]
    doc.table(["id", "image", "question"], rows)
    return doc


def test_long_tables_are_paged():
    md, page = markdown(_long_table()), html_page(_long_table())
    assert "| 49 | img1.png | q49 |" in md and "q50" not in md
    assert "_70 more rows: all 120 are in report.html and report.json._" in md
    assert page.count("<tr") == 121 and page.count("<tr hidden>") == 70  # every row is in the page
    assert "page 1 of 3 (120 rows)" in page and 'data-step="1"' in page
    assert page.count('data-thumb="0"') == 80 and 'data-thumb="1"' not in page  # one image stored once
    assert page.count("data:image/png;base64,") == 1 and "http" not in page  # offline: nothing fetched
    short = Document("short")
    short.table(["a"], [[1], [2]])
    assert 'class="paged"' not in html_page(short) and "more rows" not in markdown(short)


def _figure_doc() -> Document:
    doc = Document("figures")
    doc.figure(go.Figure(go.Bar(x=["a"], y=[1]), layout={"title": "bars"}))
    return doc


def test_plotly_js_is_written_once_per_folder_and_loaded_relatively(tmp_path):
    from plotly.offline import get_plotlyjs

    from headlab.reports.html import PLOTLY_JS

    out = tmp_path / "r"
    write_report_files(out, {"a": 1}, _figure_doc())
    js, page = out / PLOTLY_JS, (out / "report.html").read_text()
    assert js.read_text() == get_plotlyjs()
    assert page.count('<script src="plotly.min.js"></script>') == 1 and "Plotly.newPlot" in page
    assert len(page) < 50_000 and "plotly.js v" not in page  # the bundle is not inlined
    stat = js.stat()
    write_report_files(out, {"a": 2}, _figure_doc())
    assert (js.stat().st_ino, js.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten
    js.write_text("/* plotly.js v0.0.1 */")  # stale: another version
    write_report_files(out, {"a": 3}, _figure_doc())
    assert js.read_text() == get_plotlyjs()
    js.unlink()  # missing
    write_report_files(out, {"a": 4}, _figure_doc())
    assert js.read_text() == get_plotlyjs()
    plain = tmp_path / "plain"
    write_report_files(plain, {"a": 1}, Document("no figures"))
    assert not (plain / PLOTLY_JS).exists() and "<script" not in (plain / "report.html").read_text()


def test_layer_and_head_axes_are_categorical():
    import pandas as pd

    from headlab.reports.figures import grouped_bars, layer_head_heatmap

    frame = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "v": [0.1, 0.2, 0.3, 0.4]})
    fig = layer_head_heatmap(frame.pivot(index="layer", columns="head", values="v"), title="t")
    spec = fig.to_plotly_json()
    assert spec["layout"]["xaxis"]["type"] == "category" and spec["layout"]["yaxis"]["type"] == "category"
    assert list(spec["data"][0]["x"]) == ["H0", "H1"] and list(spec["data"][0]["y"]) == ["L0", "L1"]
    bars = grouped_bars(
        {"none": {"acc": 0.5, "f1": None}, "vhr": {"acc": 0.7, "f1": 0.6}},
        {"none": {"acc": [0.4, 0.65]}, "vhr": {"acc": [0.6, 0.8], "f1": None}},
        ["acc", "f1"],
        title="bars",
    )
    none, vhr = (trace.error_y for trace in bars.data)
    assert none.array == pytest.approx((0.15, None)) and none.arrayminus == pytest.approx((0.1, None))
    assert vhr.array[0] == pytest.approx(0.1) and vhr.array[1] is None and not none.symmetric
