"""`headlab report position-bias`: position bias of a language model, plain and with PINE.

Two parts per method: accuracy by gold position on synthetic multi-document QA (`analyses.position.
lost_in_the_middle`) and the pairwise-judge flip rate / accuracy (`judge_position_bias`). Each (part, method)
result is cached in `OUT/position_cache.json` as soon as it is computed (`runs.cache`: tied to the model's
fingerprint, so the model is loaded on every run; the same model under another path reuses the cache,
another model is refused), so a rerun recomputes nothing. A model PINE cannot run on (no RoPE, ...) gets
"PINE unavailable: <reason>" and the plain numbers.

Outputs, written atomically: report.json (every number), report.md and report.html.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from headlab.errors import HeadlabError
from headlab.reports.document import Document
from headlab.reports.output import load_llm, records, write_report_files
from headlab.reports.registry import MODEL, Report, ReportOption, ReportResult, out_option
from headlab.runs.outcome import Outcome, Progress

POSITION_CACHE = "position_cache.json"
METHODS = ("plain", "pine")
PARTS = ("curve", "judge")


def _key(part: str, method: str, *, n: int, k: int, seed: int) -> str:
    return (
        f"{part}/{method}/n={n}/k={k}/seed={seed}"
        if part == "curve"
        else f"{part}/{method}/n={n}/seed={seed}"
    )


def _compute(lm, part: str, method: str, *, n: int, k: int, seed: int):
    """The cache entry of one part: {"rows": ...}, or {"unavailable": why} when PINE cannot run."""

    def compute() -> dict:
        from headlab.analyses import position

        try:
            if part == "curve":
                frame = position.lost_in_the_middle(lm, n=n, k=k, seed=seed, methods=[method])
            else:
                frame = position.judge_position_bias(lm, n=n, seed=seed, methods=[method])
        except HeadlabError as err:
            if method == "plain":
                raise
            return {"unavailable": str(err)}
        return {"rows": records(frame)}

    return compute


def position_results(lm, cache, *, n: int, k: int, seed: int, progress: Progress | None = None):
    """({"curve": {method: rows}, "judge": {method: row}, "unavailable": {method: reason}}, the parts run),
    from the cache or computed."""
    from headlab.runs.cache import compute_parts

    jobs = {(p, m): _key(p, m, n=n, k=k, seed=seed) for p in PARTS for m in METHODS}
    run = compute_parts(
        cache,
        {key: _compute(lm, p, m, n=n, k=k, seed=seed) for (p, m), key in jobs.items()},
        progress=progress,
        description="position bias",
    )
    out: dict = {"curve": {}, "judge": {}, "unavailable": {}}
    for (part, method), key in jobs.items():
        entry = cache.get(key)
        if "unavailable" in entry:
            out["unavailable"][method] = entry["unavailable"]
        else:
            out[part][method] = entry["rows"] if part == "curve" else entry["rows"][0]
    return out, run


def build_position_report(model: str, res: dict, *, n: int, k: int, seed: int, run) -> dict:
    import pandas as pd

    from headlab.analyses.position import position_curve_summary

    rows = [r for m in res["curve"].values() for r in m]
    summary = position_curve_summary(pd.DataFrame(rows)) if rows else pd.DataFrame()
    return {
        "model": model,
        "n": n,
        "k": k,
        "seed": seed,
        "computed": run.computed,
        "cached": run.cached,
        "pine_unavailable": res["unavailable"].get("pine"),
        "lost_in_the_middle": res["curve"],
        "curve_summary": records(summary),
        "judge": res["judge"],
    }


def document(report: Mapping) -> Document:
    import plotly.graph_objects as go

    doc = Document(f"Position bias: {report['model']}")
    doc.paragraph(
        f"n = {report['n']} per gold slot and judge examples, k = {report['k']} documents, seed {report['seed']}; "
        f"{report['computed']} parts computed, {report['cached']} from the cache."
    )
    if report["pine_unavailable"]:
        doc.paragraph(f"PINE unavailable: {report['pine_unavailable']}. Only the plain model is reported.")
    doc.heading("Lost in the middle: multi-document QA accuracy by gold position")
    curves = report["lost_in_the_middle"]
    fig = go.Figure(
        [
            go.Scatter(
                x=[r["gold"] for r in rows], y=[r["accuracy"] for r in rows], mode="lines+markers", name=m
            )
            for m, rows in curves.items()
        ]
    )
    fig.update_layout(xaxis_title="gold document slot (0-based)", yaxis_title="accuracy", yaxis_range=[0, 1])
    fig.update_xaxes(type="category")  # slots are whole numbers: one tick each, none between
    doc.figure(fig)
    doc.table(
        ["gold", *curves], [[g, *(curves[m][g]["accuracy"] for m in curves)] for g in range(report["k"])]
    )
    doc.table(
        ["method", "spread", "u_depth", "std"],
        [
            [s["method"], s["spread"], math.nan if s["u_depth"] is None else s["u_depth"], s["std"]]
            for s in report["curve_summary"]
        ],
    )
    doc.heading(f"Pairwise judge: verdict flips when the options swap (n = {report['n']}, blocks swapped)")
    doc.table(
        ["method", "flip rate", "accuracy", "margin shift", "n"],
        [[m, j["flip_rate"], j["accuracy"], j["margin_shift"], j["n"]] for m, j in report["judge"].items()],
    )
    return doc


def position_report(
    out: Path,
    *,
    model: str = "zoo:lm",
    n: int = 50,
    k: int = 4,
    seed: int = 10_000,
    progress: Progress | None = None,
) -> ReportResult:
    """Lost in the middle and the judge flip rate, plain vs PINE, cached in `out` (module docstring)."""
    from headlab.runs.answers import ModelIdentity
    from headlab.runs.cache import PartsCache

    REPORT.check(out=out, n=n, k=k)
    out = Path(out)
    lm = load_llm(model, "position-bias")
    out.mkdir(parents=True, exist_ok=True)
    cache = PartsCache(out / POSITION_CACHE, ModelIdentity.of(lm, model))
    res, run = position_results(lm, cache, n=n, k=k, seed=seed, progress=progress)
    report = build_position_report(model, res, n=n, k=k, seed=seed, run=run)
    parts = run.computed + run.cached  # every part is computed or cached, or an error stopped the report
    report["outcome"] = Outcome(items=parts, answered=parts, failed=0, bad_input=0).as_dict()
    return ReportResult(write_report_files(out, report, document(report)), report, run)


def summary(result: ReportResult, out: Path) -> list[str]:
    rep = result.report
    lines = [f"{result.run.computed} parts computed, {result.run.cached} from the cache"]
    if rep["pine_unavailable"]:
        lines.append(f"  PINE unavailable: {rep['pine_unavailable']}")
    for method, j in rep["judge"].items():
        curve = ", ".join(f"{r['accuracy']:.2f}" for r in rep["lost_in_the_middle"][method])
        lines.append(
            f"  {method}: accuracy by gold position [{curve}]; judge flip rate {j['flip_rate']:.3f}, "
            f"accuracy {j['accuracy']:.3f}"
        )
    return lines


REPORT = Report(
    name="position-bias",
    help="Position bias plain vs PINE: lost-in-the-middle curve and pairwise-judge flip rate; cached.",
    options=(
        out_option("position_cache.json, report.json/.md/.html"),
        MODEL,
        ReportOption(
            name="n",
            type=int,
            ge=1,
            aliases=("--first",),
            help="examples per gold position and judge examples",
        ),
        ReportOption(
            name="k",
            type=int,
            ge=2,
            rule="at least 2 documents",
            help="documents per multi-document QA prompt",
        ),
        ReportOption(name="seed", type=int, help="seed of the synthetic tasks"),
    ),
    run=position_report,
    summary=summary,
    unit="part",
    epilog=None,
)
