"""Language-model reports: attention sinks (`sinks_report`) and position bias (`position_report`).

Sinks: every head's statistics (alpha of the first `FIRST_K` keys, Stats()) and the residual stream of every
layer (for massive activations) are captured into `out/store`; examples already committed there are skipped,
so a rerun resumes (and captures nothing when all are in). The analyses of `analyses.sinks` run on the store
and are saved into it (`Store.save_result`): "sinks" (per-head alpha_0), "hidden-sinks",
"massive-activations" and "sink-dimensions". Prompts: a JSON Lines file (`datasets.prompts.read_prompts`) or,
by default, `n` each of the synthetic induction, IOI and multi-document QA tasks.

A batch that fails is retried one prompt at a time, so only the prompts that fail alone are listed
("failed"); the report's `Outcome` (reports.output) is complete, partial (bad prompt lines or failed prompts)
or, when nothing was captured, a HeadlabError.

Position bias: accuracy by gold position on synthetic multi-document QA (`lost_in_the_middle`) and the
pairwise-judge flip rate / accuracy (`judge_position_bias`), plain and with PINE. Each (part, method) result is
cached in `out/position_cache.json` as soon as it is computed (atomically), so a rerun recomputes nothing.
The cache is tied to the model's fingerprint (`reports.answers.ModelIdentity`), not to the --model text: the
model is loaded (and fingerprinted) on every run, the same model under another path reuses the cache, another
model is refused. A cache from before fingerprints is used when its model text equals --model, and then
recorded under the fingerprint. A model PINE cannot run on (no RoPE, ...) gets "PINE unavailable: <reason>"
and the plain numbers.

Both write report.json (every number), report.md and report.html (through `reports.html.Page`, so every text,
prompts included, is escaped), atomically (`reports.output.write_report_files`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from headlab.errors import HeadlabError, InputError, StoreError
from headlab.reports.answers import ModelIdentity
from headlab.reports.output import Outcome, check_out, write_report_files, write_text_atomic

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> tick, as in reports.pope
FIRST_K = 4
TASKS = ("induction", "ioi", "multi_doc_qa")
POSITION_CACHE = "position_cache.json"
METHODS = ("plain", "pine")


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-able rows: NaN -> None, numpy scalars -> Python ones, lists kept."""
    out = []
    for row in frame.to_dict(orient="records"):
        clean = {}
        for key, value in row.items():
            if hasattr(value, "tolist"):
                value = value.tolist()
            elif hasattr(value, "item"):
                value = value.item()
            if isinstance(value, float) and math.isnan(value):
                value = None
            clean[key] = value
        out.append(clean)
    return out


def _check_n(n: int | None) -> None:
    if n is not None and n < 1:
        raise InputError(f"--n must be at least 1, got {n}")


def _load_llm(model: str, what: str):
    import headlab as hl
    from headlab.loading import Family

    lm = hl.load(model)
    if lm.family is not Family.LLM:
        raise InputError(f"the {what} report needs a language model; {model} is a {lm.family.value} model")
    return lm


# ================================================================================================ sinks


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


@dataclass
class CaptureRun:
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False


def capture_sinks(lm, store, items, *, batch_size: int = 8, progress: Progress | None = None) -> CaptureRun:
    """Capture Stats(first_k=FIRST_K) of every head and the residuals of every layer for each item not yet
    committed in `store` (condition "default"); a failing batch is retried one item at a time, and an item
    that fails alone is listed, never fatal."""
    run = CaptureRun()
    _check_same_prompts(store, items)
    done = store.committed("default")
    todo = [it for it in items if it.id not in done]
    run.skipped = len(items) - len(todo)
    tick = progress("capture", len(todo)) if progress and todo else None
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            if not _capture_batch(lm, store, batch, run) and len(batch) > 1:
                for it in batch:
                    _capture_batch(lm, store, [it], run)
            for _ in batch:
                if tick:
                    tick()
    except KeyboardInterrupt:
        run.interrupted = True
    return run


def _capture_batch(lm, store, batch, run: CaptureRun) -> bool:
    """Capture and commit one batch; False when it failed (a lone item's failure is listed in `run`)."""
    import torch

    from headlab.inputs import prepare
    from headlab.probe import Select, Stats, capture
    from headlab.reports.output import reason

    try:
        inputs = prepare(lm, [it.prompt for it in batch], [])
        with torch.no_grad(), capture(lm, stats=Stats(first_k=FIRST_K), residuals=Select()) as rec:
            lm.model(**inputs)
    except Exception as err:  # a prompt's failure is listed; only Ctrl-C stops the run
        if len(batch) == 1:
            run.failed.append(f"id {batch[0].id!r} (line {batch[0].line}): {reason(err)}")
        return False
    store.append(rec, examples=[it.id for it in batch], meta=[it.meta for it in batch])
    run.done += len(batch)
    return True


def _check_same_prompts(store, items) -> None:
    """A store's examples must hold the same prompts under the same ids (else the resume would be wrong)."""
    if not store.committed("default"):
        return
    ex = store.examples(condition="default")
    stored = {
        e.item() if hasattr(e, "item") else e: json.loads(m).get("prompt") if isinstance(m, str) else None
        for e, m in zip(ex.example, ex.meta, strict=True)
    }
    for it in items:
        if it.id in stored and stored[it.id] is not None and stored[it.id] != it.prompt:
            raise InputError(
                f"{store.root} holds another prompt under id {it.id}; use another --out folder for other prompts"
            )


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


def hidden_summary(hidden: pd.DataFrame) -> pd.DataFrame:
    """Per head: how many examples have a hidden sink, at which positions, the largest alpha."""
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


def build_sinks_report(
    model: str, items, source: str, problems: list[str], run: CaptureRun, res: dict
) -> dict:
    scores, hidden, massive = res["scores"], res["hidden"], res["massive"]
    sinks = scores[scores.is_sink].sort_values("alpha", ascending=False)
    return {
        "model": model,
        "prompts": source,
        "n_prompts": len(items),
        "capture": asdict(run),
        "problems": problems + run.failed,
        "sink_metric": asdict(res["metric"]),
        "heads": _records(scores),
        "sink_heads": _records(sinks[["layer", "head", "alpha", "sink_rate"]]),
        "hidden_sinks": {
            "n_hits": len(hidden),
            "n_examples": int(hidden.example.nunique()) if len(hidden) else 0,
            "per_head": _records(hidden_summary(hidden)),
        },
        "massive_activations": {
            "n": len(massive),
            "rows": _records(massive.head(200)),
            "dimensions": _records(res["dims"]),
        },
        "examples": [{"id": it.id, "task": it.meta.get("task", ""), "prompt": it.prompt} for it in items],
    }


def render_sinks_markdown(report: Mapping) -> str:
    m = report["sink_metric"]
    lines = [f"# Attention sinks: {report['model']}", ""]
    lines += [f"- prompts: {report['prompts']} ({report['n_prompts']})"]
    lines += [
        f"- Sink^eps metric (eps = {m['epsilon']}): {m['percent']:.2f}% of {m['n_heads']} heads, "
        f"{m['n_examples']} examples, T in [{m['tokens'][0]}, {m['tokens'][1]}]",
        "",
        "## alpha_0 per head",
        "",
        "| layer | head | alpha_0 | sink rate | sink |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {h['layer']} | {h['head']} | {h['alpha']:.4f} | {h['sink_rate']:.3f} | {h['is_sink']} |"
        for h in report["heads"]
    ]
    sink = ", ".join(f"L{h['layer']}H{h['head']}" for h in report["sink_heads"]) or "none"
    lines += ["", f"Sink heads: {sink}", "", "## Hidden sinks (alpha_k > 0.1, k > 0)", ""]
    hs = report["hidden_sinks"]
    lines.append(f"{hs['n_hits']} hits in {hs['n_examples']} examples.")
    if hs["per_head"]:
        lines += [
            "",
            "| layer | head | examples | hits | positions | max alpha |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {h['layer']} | {h['head']} | {h['n_examples']} | {h['n_hits']} | {h['positions']} | "
            f"{h['max_alpha']:.4f} |"
            for h in hs["per_head"]
        ]
    ma = report["massive_activations"]
    lines += ["", "## Massive activations", ""]
    if not ma["n"]:
        lines.append("none found")
    else:
        lines += [
            f"{ma['n']} found.",
            "",
            "| dim | tokens | layers | max | positions |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {d['dim']} | {d['n_tokens']} | {d['n_layers']} | {d['max_value']:.1f} | {d['positions']} |"
            for d in ma["dimensions"]
        ]
    lines += ["", f"Problems ({len(report['problems'])}):", ""] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


def render_sinks_html(report: Mapping):
    import plotly.graph_objects as go

    from headlab.reports.html import Page

    m = report["sink_metric"]
    page = Page(f"Attention sinks: {report['model']}")
    cap = report["capture"]
    page.paragraph(
        f"Prompts: {report['prompts']} ({report['n_prompts']}); captured {cap['done']}, "
        f"{cap['skipped']} already in the store."
    )
    if cap["interrupted"]:
        page.paragraph("Interrupted: the numbers cover the examples captured so far; rerun to finish.")
    page.heading("Sink metric (Gu et al.)")
    page.table(
        ["epsilon", "percent of heads", "heads", "examples", "min T", "max T"],
        [[m["epsilon"], m["percent"], m["n_heads"], m["n_examples"], *m["tokens"]]],
    )
    heads = pd.DataFrame(report["heads"])
    if len(heads):
        grid = heads.pivot(index="layer", columns="head", values="alpha")
        fig = go.Figure(
            go.Heatmap(
                z=grid.values, x=list(grid.columns), y=list(grid.index), colorscale="Viridis", zmin=0, zmax=1
            )
        )
        fig.update_layout(
            title="alpha_0 per head (mean over examples)", xaxis_title="head", yaxis_title="layer"
        )
        page.heading("alpha_0 per head")
        page.figure(fig)
    page.heading(f"Sink heads (mean alpha_0 > {m['epsilon']})")
    if report["sink_heads"]:
        page.table(
            ["layer", "head", "alpha_0", "sink rate"],
            [[h["layer"], h["head"], h["alpha"], h["sink_rate"]] for h in report["sink_heads"]],
        )
    else:
        page.paragraph("none")
    hs = report["hidden_sinks"]
    page.heading("Hidden sinks (ACT: alpha_k > 0.1 for k > 0)")
    page.paragraph(f"{hs['n_hits']} hits in {hs['n_examples']} examples.")
    if hs["per_head"]:
        page.table(
            ["layer", "head", "examples", "hits", "positions", "max alpha"],
            [
                [h["layer"], h["head"], h["n_examples"], h["n_hits"], str(h["positions"]), h["max_alpha"]]
                for h in hs["per_head"]
            ],
        )
    ma = report["massive_activations"]
    page.heading("Massive activations (Sun et al.: |x| > 100 and >= 1000x median)")
    if not ma["n"]:
        page.paragraph("none found")
    else:
        page.table(
            ["dim", "tokens", "layers", "max |x|", "positions"],
            [
                [d["dim"], d["n_tokens"], d["n_layers"], d["max_value"], str(d["positions"])]
                for d in ma["dimensions"]
            ],
        )
    page.heading(f"Prompts ({len(report['examples'])})")
    page.table(["id", "task", "prompt"], [[e["id"], e["task"], e["prompt"]] for e in report["examples"]])
    page.heading(f"Problems ({len(report['problems'])})")
    page.bullets(report["problems"])
    return page


@dataclass
class SinksReportResult:
    html: Path
    report: dict
    run: CaptureRun


def sinks_report(
    out: Path,
    *,
    model: str = "zoo:lm",
    data: Path | None = None,
    n: int | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> SinksReportResult:
    """Capture (resumable) into `out/store`, run the sink analyses, write the report (module docstring).
    n: prompts per synthetic task (default 8), or the first n prompts of `data`."""
    from headlab.datasets.prompts import read_prompts
    from headlab.store import Store

    out = check_out(out)
    _check_n(n)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    problems: list[str] = []
    if data is None:
        items, source = default_prompts(n or 8), f"synthetic {', '.join(TASKS)} ({n or 8} each)"
    else:
        pf = read_prompts(data)
        problems += pf.problems
        items, source = pf.items[:n] if n else pf.items, str(data)
        if not items:
            raise InputError(f"{data} holds no usable prompt ({len(pf.problems)} bad lines)")
    lm = _load_llm(model, "sinks")
    out.mkdir(parents=True, exist_ok=True)
    store = Store.create(out / "store", lm, exist_ok=True)
    run = capture_sinks(lm, store, items, batch_size=batch_size, progress=progress)
    committed = store.committed("default")
    if not committed:
        raise HeadlabError(f"nothing was captured: {'; '.join(run.failed[:3]) or 'interrupted'}")
    res = sink_analyses(store)
    report = build_sinks_report(model, items, source, problems, run, res)
    report["outcome"] = Outcome(
        items=len(items),
        answered=sum(it.id in committed for it in items),
        failed=len(run.failed),
        bad_input=len(problems),
        interrupted=run.interrupted,
    ).as_dict()
    html = write_report_files(out, report, render_sinks_markdown(report), render_sinks_html(report).render())
    return SinksReportResult(html, report, run)


# ======================================================================================= position bias


class PositionCache:
    """`position_cache.json`: {"model", "model_path", "fingerprint", "entries": {key: rows}}, rewritten
    atomically after every entry; tied to the model's fingerprint (module docstring)."""

    def __init__(self, path: Path, model: ModelIdentity) -> None:
        self.path, self.model, self.entries = path, model, {}
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise TypeError("entries is not an object")
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise StoreError(f"{path} is malformed ({err}); delete it to recompute") from None
        if "fingerprint" in data:
            model.refuse_other(data["fingerprint"], path, "results")
        elif data.get("model") != model.given:
            raise StoreError(
                f"{path} holds results of model {data.get('model')!r}, not {model.given!r}; "
                "use another --out folder for another model"
            )
        self.entries = entries
        if "fingerprint" not in data:
            self._save()  # a cache from before fingerprints: recorded under this model's

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self._save()

    def _save(self) -> None:
        head = {
            "model": self.model.given,
            "model_path": self.model.path,
            "fingerprint": self.model.fingerprint,
        }
        write_text_atomic(self.path, json.dumps(head | {"entries": self.entries}, indent=1))


@dataclass
class PositionRun:
    computed: int = 0
    cached: int = 0


def position_results(
    lm, cache: PositionCache, *, n: int, k: int, seed: int, progress: Progress | None = None
) -> tuple[dict, PositionRun]:
    """{"curve": {method: rows}, "judge": {method: row}, "unavailable": {method: reason}}, from the cache or
    computed."""
    from headlab.analyses.position import judge_position_bias, lost_in_the_middle

    jobs = [(part, m) for part in ("curve", "judge") for m in METHODS]
    key = {
        (p, m): f"{p}/{m}/n={n}/k={k}/seed={seed}" if p == "curve" else f"{p}/{m}/n={n}/seed={seed}"
        for p, m in jobs
    }
    todo = [j for j in jobs if cache.get(key[j]) is None]
    run = PositionRun(cached=len(jobs) - len(todo))
    tick = progress("position bias", len(todo)) if progress and todo else None
    for part, method in todo:
        try:
            if part == "curve":
                frame = lost_in_the_middle(lm, n=n, k=k, seed=seed, methods=[method])
            else:
                frame = judge_position_bias(lm, n=n, seed=seed, methods=[method])
            entry = {"rows": _records(frame)}
        except HeadlabError as err:
            if method == "plain":
                raise
            entry = {"unavailable": str(err)}
        cache.put(key[(part, method)], entry)
        run.computed += 1
        if tick:
            tick()
    out: dict = {"curve": {}, "judge": {}, "unavailable": {}}
    for part, method in jobs:
        entry = cache.get(key[(part, method)])
        if "unavailable" in entry:
            out["unavailable"][method] = entry["unavailable"]
        else:
            out[part][method] = entry["rows"] if part == "curve" else entry["rows"][0]
    return out, run


def build_position_report(model: str, res: dict, *, n: int, k: int, seed: int, run: PositionRun) -> dict:
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
        "curve_summary": _records(summary),
        "judge": res["judge"],
    }


def render_position_markdown(report: Mapping) -> str:
    lines = [f"# Position bias: {report['model']}", ""]
    if report["pine_unavailable"]:
        lines += [f"PINE unavailable: {report['pine_unavailable']}", ""]
    lines += [
        f"## Multi-document QA accuracy by gold position (k = {report['k']}, n = {report['n']} per slot)",
        "",
    ]
    methods = list(report["lost_in_the_middle"])
    lines += ["| gold | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for g in range(report["k"]):
        cells = " | ".join(f"{report['lost_in_the_middle'][m][g]['accuracy']:.3f}" for m in methods)
        lines.append(f"| {g} | {cells} |")
    lines += ["", "| method | spread | u_depth | std |", "|---|---|---|---|"]
    for s in report["curve_summary"]:
        u = "-" if s["u_depth"] is None else f"{s['u_depth']:.3f}"
        lines.append(f"| {s['method']} | {s['spread']:.3f} | {u} | {s['std']:.3f} |")
    lines += ["", f"## Pairwise judge (n = {report['n']}, blocks swapped)", ""]
    lines += ["| method | flip rate | accuracy | margin shift |", "|---|---|---|---|"]
    for m, j in report["judge"].items():
        lines.append(f"| {m} | {j['flip_rate']:.3f} | {j['accuracy']:.3f} | {j['margin_shift']:.4f} |")
    return "\n".join(lines) + "\n"


def render_position_html(report: Mapping):
    import plotly.graph_objects as go

    from headlab.reports.html import Page

    page = Page(f"Position bias: {report['model']}")
    page.paragraph(
        f"n = {report['n']} per gold slot and judge examples, k = {report['k']} documents, seed {report['seed']}; "
        f"{report['computed']} parts computed, {report['cached']} from the cache."
    )
    if report["pine_unavailable"]:
        page.paragraph(f"PINE unavailable: {report['pine_unavailable']}. Only the plain model is reported.")
    page.heading("Lost in the middle: multi-document QA accuracy by gold position")
    fig = go.Figure(
        [
            go.Scatter(
                x=[r["gold"] for r in rows], y=[r["accuracy"] for r in rows], mode="lines+markers", name=m
            )
            for m, rows in report["lost_in_the_middle"].items()
        ]
    )
    fig.update_layout(xaxis_title="gold document slot (0-based)", yaxis_title="accuracy", yaxis_range=[0, 1])
    page.figure(fig)
    page.table(
        ["method", "spread", "u_depth", "std"],
        [
            [s["method"], s["spread"], math.nan if s["u_depth"] is None else s["u_depth"], s["std"]]
            for s in report["curve_summary"]
        ],
    )
    page.heading("Pairwise judge: verdict flips when the options swap")
    page.table(
        ["method", "flip rate", "accuracy", "margin shift", "n"],
        [[m, j["flip_rate"], j["accuracy"], j["margin_shift"], j["n"]] for m, j in report["judge"].items()],
    )
    return page


@dataclass
class PositionReportResult:
    html: Path
    report: dict
    run: PositionRun


def position_report(
    out: Path,
    *,
    model: str = "zoo:lm",
    n: int = 50,
    k: int = 4,
    seed: int = 10_000,
    progress: Progress | None = None,
) -> PositionReportResult:
    """Lost in the middle and the judge flip rate, plain vs PINE, cached in `out` (module docstring)."""
    out = check_out(out)
    _check_n(n)
    if k < 2:
        raise InputError(f"--k must be at least 2 documents, got {k}")
    lm = _load_llm(model, "position-bias")
    out.mkdir(parents=True, exist_ok=True)
    cache = PositionCache(out / POSITION_CACHE, ModelIdentity.of(lm, model))
    res, run = position_results(lm, cache, n=n, k=k, seed=seed, progress=progress)
    report = build_position_report(model, res, n=n, k=k, seed=seed, run=run)
    parts = run.computed + run.cached  # every part is computed or cached, or an error stopped the report
    report["outcome"] = Outcome(items=parts, answered=parts, failed=0, bad_input=0).as_dict()
    html = write_report_files(
        out, report, render_position_markdown(report), render_position_html(report).render()
    )
    return PositionReportResult(html, report, run)
