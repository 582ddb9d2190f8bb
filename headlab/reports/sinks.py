"""`headlab report sinks`: attention sinks of a language model, per head.

Every head's statistics and the residual stream of every layer are captured into `OUT/store` by
`runs.sinks.capture_sinks` (resumable: a rerun captures only what is missing; a prompt that fails alone is
listed). The analyses of `analyses.sinks` then run on the store and are saved into it (`Store.save_result`):
"sinks" (per-head alpha_0), "hidden-sinks", "massive-activations" and "sink-dimensions". Prompts: a JSON
Lines file (`datasets.prompts.read_prompts`; bad lines listed) or, by default, `n` each of the synthetic
induction, IOI and multi-document QA tasks. The report's `Outcome` is complete, partial (bad prompt lines or
failed prompts) or, when nothing was captured, a HeadlabError.

Outputs, written atomically: report.json (every number), report.md and report.html (every text, prompts
included, escaped).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from headlab.errors import HeadlabError, InputError
from headlab.reports.document import Document
from headlab.reports.output import load_llm, records, write_report_files
from headlab.reports.registry import MODEL, Report, ReportOption, ReportResult, out_option
from headlab.runs.outcome import Outcome, Progress

TASKS = ("induction", "ioi", "multi_doc_qa")


def default_prompts(n: int):
    """`n` prompts each of the synthetic induction, IOI and multi-document QA tasks (ids 0 .. 3n-1)."""
    from headlab.datasets import synthetic
    from headlab.datasets.prompts import PromptItem

    examples = [
        ("induction", synthetic.induction(n, seed=0)),
        ("ioi", synthetic.ioi(n, seed=0)),
        ("multi_doc_qa", synthetic.multi_doc_qa(n, k=4, seed=0)),
    ]
    items = []
    for task, exs in examples:
        for e in exs:
            meta = {"prompt": e.prompt, "task": task, "answer": e.answer}
            items.append(PromptItem(len(items), e.prompt, None, meta, len(items) + 1))
    return items


def sink_analyses(store) -> dict:
    """The sink analyses of `analyses.sinks` on the store's "lm" tower, saved into the store."""
    from headlab.analyses.sinks import (
        EPSILON,
        HIDDEN_TAU,
        MASSIVE_ABS,
        MASSIVE_RATIO,
        hidden_sinks,
        massive_activations,
        sink_dimensions,
        sink_metric,
        sink_scores,
    )

    scores = sink_scores(store, tower="lm")
    metric = sink_metric(store, tower="lm")
    hidden = hidden_sinks(store, tower="lm")
    massive = massive_activations(store)
    dims = sink_dimensions(massive)
    store.save_result("sinks", scores, {"epsilon": EPSILON, "tower": "lm"})
    store.save_result("hidden-sinks", hidden, {"tau": HIDDEN_TAU, "tower": "lm"})
    store.save_result("massive-activations", massive, {"threshold": MASSIVE_ABS, "ratio": MASSIVE_RATIO})
    store.save_result("sink-dimensions", dims, {"threshold": MASSIVE_ABS, "ratio": MASSIVE_RATIO})
    return {"scores": scores, "metric": metric, "hidden": hidden, "massive": massive, "dims": dims}


def hidden_summary(hidden):
    """Per head: how many examples have a hidden sink, at which positions, the largest alpha."""
    import pandas as pd

    cols = ["layer", "head", "n_examples", "n_hits", "positions", "max_alpha"]
    if not len(hidden):
        return pd.DataFrame(columns=cols)
    out = (
        hidden.groupby(["layer", "head"])
        .agg(
            n_examples=("example", "nunique"),
            n_hits=("alpha", "size"),
            positions=("position", lambda p: sorted({int(x) for x in p})),
            max_alpha=("alpha", "max"),
        )
        .reset_index()
    )
    return out.sort_values(["n_examples", "max_alpha"], ascending=False).reset_index(drop=True)[cols]


def build_sinks_report(model: str, items, source: str, problems: list[str], run, res: dict) -> dict:
    scores, hidden, massive = res["scores"], res["hidden"], res["massive"]
    sinks = scores[scores.is_sink].sort_values("alpha", ascending=False)
    return {
        "model": model,
        "prompts": source,
        "n_prompts": len(items),
        "capture": asdict(run),
        "problems": problems + run.failed,
        "sink_metric": asdict(res["metric"]),
        "heads": records(scores),
        "sink_heads": records(sinks[["layer", "head", "alpha", "sink_rate"]]),
        "hidden_sinks": {
            "n_hits": len(hidden),
            "n_examples": int(hidden.example.nunique()) if len(hidden) else 0,
            "per_head": records(hidden_summary(hidden)),
        },
        "massive_activations": {
            "n": len(massive),
            "rows": records(massive.head(200)),
            "dimensions": records(res["dims"]),
        },
        "examples": [{"id": it.id, "task": it.meta.get("task", ""), "prompt": it.prompt} for it in items],
    }


def document(report: Mapping) -> Document:
    m, cap = report["sink_metric"], report["capture"]
    doc = Document(f"Attention sinks: {report['model']}")
    doc.paragraph(
        f"Prompts: {report['prompts']} ({report['n_prompts']}); captured {cap['done']}, "
        f"{cap['skipped']} already in the store."
    )
    if cap["interrupted"]:
        doc.paragraph("Interrupted: the numbers cover the examples captured so far; rerun to finish.")
    doc.heading("Sink metric (Gu et al.)")
    doc.table(
        ["epsilon", "percent of heads", "heads", "examples", "min T", "max T"],
        [[m["epsilon"], m["percent"], m["n_heads"], m["n_examples"], *m["tokens"]]],
    )
    _heads_section(doc, report["heads"])
    doc.heading(f"Sink heads (mean alpha_0 > {m['epsilon']})")
    if report["sink_heads"]:
        doc.table(
            ["layer", "head", "alpha_0", "sink rate"],
            [[h["layer"], h["head"], h["alpha"], h["sink_rate"]] for h in report["sink_heads"]],
        )
    else:
        doc.paragraph("none")
    hs = report["hidden_sinks"]
    doc.heading("Hidden sinks (ACT: alpha_k > 0.1 for k > 0)")
    doc.paragraph(f"{hs['n_hits']} hits in {hs['n_examples']} examples.")
    if hs["per_head"]:
        doc.table(
            ["layer", "head", "examples", "hits", "positions", "max alpha"],
            [
                [h["layer"], h["head"], h["n_examples"], h["n_hits"], str(h["positions"]), h["max_alpha"]]
                for h in hs["per_head"]
            ],
        )
    ma = report["massive_activations"]
    doc.heading("Massive activations (Sun et al.: |x| > 100 and >= 1000x median)")
    doc.paragraph(f"{ma['n']} found." if ma["n"] else "none found")
    if ma["n"]:
        doc.table(
            ["dim", "tokens", "layers", "max |x|", "positions"],
            [
                [d["dim"], d["n_tokens"], d["n_layers"], d["max_value"], str(d["positions"])]
                for d in ma["dimensions"]
            ],
        )
    doc.heading(f"Prompts ({len(report['examples'])})")
    doc.table(["id", "task", "prompt"], [[e["id"], e["task"], e["prompt"]] for e in report["examples"]])
    doc.heading(f"Problems ({len(report['problems'])})")
    doc.bullets(report["problems"])
    return doc


def _heads_section(doc: Document, heads: list[dict]) -> None:
    """alpha_0 of every head: a heat map and the table."""
    import pandas as pd

    from headlab.reports.figures import layer_head_heatmap

    if not heads:
        return
    grid = pd.DataFrame(heads).pivot(index="layer", columns="head", values="alpha")
    title = "alpha_0 per head (mean over examples)"
    doc.heading("alpha_0 per head")
    doc.figure(layer_head_heatmap(grid, title=title, colorscale="Viridis", zmin=0, zmax=1))
    doc.table(
        ["layer", "head", "alpha_0", "sink rate", "sink"],
        [[h["layer"], h["head"], h["alpha"], h["sink_rate"], str(h["is_sink"])] for h in heads],
    )


def sinks_report(
    out: Path,
    *,
    model: str = "zoo:lm",
    data: Path | None = None,
    n: int | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> ReportResult:
    """Capture (resumable) into `out/store`, run the sink analyses, write the report (module docstring).
    n: prompts per synthetic task (default 8), or the first n prompts of `data`."""
    from headlab.datasets.prompts import read_prompts
    from headlab.runs.sinks import capture_sinks
    from headlab.store import Store

    REPORT.check(out=out, n=n, batch_size=batch_size)
    out = Path(out)
    problems: list[str] = []
    if data is None:
        items, source = default_prompts(n or 8), f"synthetic {', '.join(TASKS)} ({n or 8} each)"
    else:
        pf = read_prompts(data)
        problems += pf.problems
        items, source = pf.items[:n] if n else pf.items, str(data)
        if not items:
            raise InputError(f"{data} holds no usable prompt ({len(pf.problems)} bad lines)")
    lm = load_llm(model, "sinks")
    out.mkdir(parents=True, exist_ok=True)
    store = Store.create(out / "store", lm, exist_ok=True)
    run = capture_sinks(lm, store, items, batch_size=batch_size, progress=progress)
    committed = store.committed("default")
    if not committed:
        raise HeadlabError(f"nothing was captured: {'; '.join(run.failed[:3]) or 'interrupted'}")
    report = build_sinks_report(model, items, source, problems, run, sink_analyses(store))
    report["outcome"] = Outcome(
        items=len(items),
        answered=sum(it.id in committed for it in items),
        failed=len(run.failed),
        bad_input=len(problems),
        interrupted=run.interrupted,
    ).as_dict()
    return ReportResult(write_report_files(out, report, document(report)), report, run)


def summary(result: ReportResult, out: Path) -> list[str]:
    run, rep = result.run, result.report
    m = rep["sink_metric"]
    return [
        f"{run.done} captured, {run.skipped} already in {out / 'store'}, {len(run.failed)} failed",
        f"  Sink metric {m['percent']:.2f}% (eps {m['epsilon']}), {len(rep['sink_heads'])} sink heads, "
        f"{rep['hidden_sinks']['n_hits']} hidden-sink hits, "
        f"{rep['massive_activations']['n']} massive activations",
    ]


REPORT = Report(
    name="sinks",
    help="Attention sinks: per-head alpha_0, Sink metric, hidden sinks, massive activations; resumable.",
    options=(
        out_option("store/, report.json/.md/.html"),
        MODEL,
        ReportOption(
            name="data",
            type=Path,
            help="prompts (JSON Lines; default: synthetic induction, IOI and multi-doc QA)",
        ),
        ReportOption(
            name="n",
            type=int,
            ge=1,
            aliases=("--first",),
            help="prompts per synthetic task (default 8), or the first N of --data",
        ),
        ReportOption(name="batch_size", type=int, ge=1, label="batch size", help="prompts per forward pass"),
    ),
    run=sinks_report,
    summary=summary,
    unit="ex",
)
