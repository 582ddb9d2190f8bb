"""`headlab report pope`: greedy yes/no answers of an LVLM per split file and intervention condition, scored
with the official POPE metrics, with the paired difference each intervention makes and the answers it flipped.

Data: POPE question files (one per split, named after the file stem; JSON Lines or a JSON array of
{question_id, image, text, label}), images in `--images`, else an `images` folder beside each file. Without
data, the three synthetic files of `scenes.write_pope_benchmark` (random / popular / adversarial) are written
into `OUT/data` once and used. Questions are answered by `runs.answering` (conditions none / vhr / var,
answers appended to `OUT/answers.jsonl` and resumed, bad items listed; the rules of `reports.benchmark`).

Outputs, written atomically: report.json (every number), report.md and report.html (tables, a bar chart per
split with each condition's bootstrap 95% intervals as error bars, the image maps of `reports.maps` on the
first `vhd_images` images of the first split, flipped answers with thumbnails, problems).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from headlab.datasets.pope import PopeFile, PopeQuestion, load_pope, parse_answer, score_pope
from headlab.errors import InputError
from headlab.reports.benchmark import (
    BATCH_SIZE,
    IMAGES,
    INTERVENTIONS,
    MAX_NEW_TOKENS,
    MODEL,
    VAR_TAU,
    Answered,
    answer,
    begin,
    bootstrap_intervals,
    flipped,
    flipped_section,
    flipped_thumbnails,
    fmt_ci,
    paired_bootstrap,
    problems_section,
    ratio,
    split_lines,
    split_problems,
    start_document,
)
from headlab.reports.document import Document
from headlab.reports.output import synthetic_data, write_report_files
from headlab.reports.registry import Report, ReportOption, ReportResult, out_option
from headlab.runs.answering import CONDITIONS, Split
from headlab.runs.outcome import Progress

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def load_splits(data: Sequence[Path], images: Path | None, n: int | None) -> list[Split]:
    """The split files (named after their file stem); images are looked up in `images`, else in an
    `images` folder beside each file. Questions whose image is missing are left out and listed."""
    splits, names = [], set()
    for path in map(Path, data):
        if not path.is_file():
            raise InputError(f"POPE file {path} does not exist (or is not a file)")
        if path.stem in names:
            raise InputError(f"two POPE files are named {path.stem!r}; give the splits distinct file names")
        names.add(path.stem)
        pope: PopeFile = load_pope(path)
        split = Split(path.stem, path, images if images is not None else path.parent / "images", [])
        split.problems += pope.problems
        for q in pope.questions:
            if n is not None and len(split.questions) >= n:
                break
            split.add(q, f"{path.name}: question {q.question_id!r}")
        splits.append(split)
    return splits


def pope_intervals(questions: Sequence[PopeQuestion], answers) -> dict[str, list[float] | None]:
    """A bootstrap 95% interval of each POPE metric over the answered questions (as `score_pope` counts
    them: an answer parsed "yes" or anything else as "no")."""
    import numpy as np

    asked = [q for q in questions if q.question_id in answers]
    yes = np.array([parse_answer(answers[q.question_id]) == "yes" for q in asked], dtype=float)
    pos = np.array([q.label == "yes" for q in asked], dtype=float)
    tp, tn = yes * pos, (1 - yes) * (1 - pos)
    columns = {"n": np.ones_like(yes), "yes": yes, "pos": pos, "tp": tp, "right": tp + tn}
    statistics = {
        "accuracy": lambda s: s["right"] / s["n"],
        "precision": lambda s: ratio(s["tp"], s["yes"]),
        "recall": lambda s: ratio(s["tp"], s["pos"]),
        "f1": lambda s: ratio(2 * s["tp"], s["yes"] + s["pos"]),  # 2tp / (2tp + fp + fn)
        "yes_ratio": lambda s: s["yes"] / s["n"],
    }
    return bootstrap_intervals(columns, statistics)


def build_report(ans: Answered, splits: Sequence[Split], **extra) -> dict:
    """Every number of the report as plain JSON-able data."""
    report = ans.head() | {"splits": {}, **extra}
    for split in splits:
        entry: dict = {"file": str(split.path), "n_questions": len(split.questions), "metrics": {}}
        entry |= {"vs_none": {}, "malformed_lines": split.problems, "missing_images": split.missing_images}
        entry["failed"] = ans.run.failures(split.name)
        entry["intervals"] = {}
        for c in ans.conditions:
            answers = ans.log.get(c, split.name)
            entry["metrics"][c] = asdict(score_pope(split.questions, answers))
            entry["intervals"][c] = pope_intervals(split.questions, answers)
        base = ans.log.get("none", split.name)
        for c in ans.conditions[1:]:
            other = ans.log.get(c, split.name)
            both = [q for q in split.questions if q.question_id in base and q.question_id in other]
            entry["vs_none"][c] = paired_bootstrap(
                [q.label for q in both],
                [parse_answer(base[q.question_id]) for q in both],
                [parse_answer(other[q.question_id]) for q in both],
            ) | {"flipped": flipped(split.questions, base, other)}
        report["splits"][split.name] = entry
    report["outcome"] = ans.outcome(splits, sum(len(s.problems) + len(s.missing_images) for s in splits))
    return report


def document(report: dict, vhd=None, thumbs=None) -> Document:
    """The report's document; `vhd` is an optional (layer, head, vhd) DataFrame for a heat map, `thumbs` the
    flipped answers' thumbnails (`benchmark.flipped_thumbnails`)."""
    from headlab.reports.figures import grouped_bars
    from headlab.reports.maps import maps_section

    doc = start_document("POPE report", report)
    doc.heading("Metrics")
    rows = [
        [name, c, m["n"], *(m[k] for k in METRICS), m["unanswered"]]
        for name, s in report["splits"].items()
        for c, m in s["metrics"].items()
    ]
    doc.table(["split", "condition", "n", *METRICS, "unanswered"], rows)
    doc.heading("Difference vs none (bootstrap 95% CI, paired, 1000 resamples, seed 0)")
    rows = [
        [name, c, fmt_ci(d["accuracy"]), fmt_ci(d["f1"]), len(d["flipped"])]
        for name, s in report["splits"].items()
        for c, d in s["vs_none"].items()
    ]
    doc.table(["split", "condition", "Δ accuracy", "Δ F1", "flipped"], rows)
    for name, s in report["splits"].items():
        title = f"{name} (error bars: bootstrap 95% interval of each condition)"
        intervals = s.get("intervals", {})
        fig = grouped_bars(s["metrics"], intervals, METRICS, title=title, yaxis_range=[0, 1], height=340)
        doc.heading(f"Split {name}")
        doc.figure(fig)
    maps_section(doc, report.get("attention_maps") or {}, vhd)
    flipped_section(doc, report["splits"], thumbs)
    problems_section(doc, report, split_problems(report["splits"]))
    return doc


def pope_report(
    out: Path,
    *,
    model: str | None = None,
    data: Sequence[Path] = (),
    images: Path | None = None,
    conditions: Sequence[str] = CONDITIONS,
    n: int | None = None,
    max_new_tokens: int = 4,
    var_tau: float = 20.0,
    batch_size: int = 1,
    vhd_images: int = 4,
    progress: Progress | None = None,
) -> ReportResult:
    """Answer, score and write the report (see the module docstring). `model`: None = the model of
    `out/answers.jsonl`, else zoo:llava."""
    from headlab.datasets import scenes

    out, conditions = begin(
        REPORT,
        out,
        conditions,
        images=images,
        n=n,
        max_new_tokens=max_new_tokens,
        var_tau=var_tau,
        batch_size=batch_size,
        vhd_images=vhd_images,
    )
    if not data:
        folder = synthetic_data(out / "data", scenes.write_pope_benchmark)
        data = [folder / f"pope_{s}.json" for s in ("random", "popular", "adversarial")]
    splits = load_splits(data, images, n)
    ans = answer(
        out,
        model,
        "POPE",
        conditions,
        [(splits, max_new_tokens)],
        var_tau=var_tau,
        progress=progress,
        batch_size=batch_size,
    )
    vhd, maps, notes = None, {}, []
    if vhd_images > 0 and splits and not ans.run.interrupted:
        from headlab.reports.maps import image_maps

        try:
            plain = ans.log.get("none", splits[0].name) if "none" in ans.conditions else {}
            vhd, maps, notes = image_maps(ans.lm, splits[0], out, vhd_images, var_tau, plain)
        except KeyboardInterrupt:
            ans.run.interrupted = True
    report = build_report(ans, splits, max_new_tokens=max_new_tokens, n_per_split=n)
    report["notes"] += notes
    if vhd is not None:
        report["vhd_per_head"] = vhd[["layer", "head", "vhd"]].to_dict(orient="records")
    if maps:
        report["attention_maps"] = maps
    doc = document(report, vhd, flipped_thumbnails(splits, report["splits"]))
    return ReportResult(write_report_files(out, report, doc), report, ans.run)


def summary(result: ReportResult, out: Path) -> list[str]:
    return split_lines(result, out, "splits", "accuracy")


REPORT = Report(
    name="pope",
    help="POPE accuracy / precision / recall / F1 / yes-ratio per split and intervention, resumable.",
    options=(
        out_option("answers.jsonl, report.json/.md/.html"),
        MODEL,
        ReportOption(
            name="data",
            type=Path,
            many=True,
            help="POPE question file (repeat per split; default: synthetic files in OUT/data)",
        ),
        IMAGES,
        INTERVENTIONS,
        ReportOption(
            name="n", type=int, ge=1, aliases=("--first",), help="first N questions per split (default: all)"
        ),
        MAX_NEW_TOKENS,
        VAR_TAU,
        BATCH_SIZE,
        ReportOption(
            name="vhd_images",
            type=int,
            ge=0,
            rule="0 (no image maps) or more",
            help="images for the per-head VHD heat map (0 = none)",
        ),
    ),
    run=pope_report,
    summary=summary,
)
