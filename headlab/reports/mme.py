"""`headlab report mme`: MME (hallucination subset), greedy yes/no answers of an LVLM per subtask and
intervention condition, scored with `datasets.mme`, with the paired difference each intervention makes and
the answers it flipped. Answering, resume and bad items follow `reports.benchmark` and `runs.answering`.

Input: one question file per subtask, named `<subtask>.txt`, in the MME eval-tool layout: lines
`image_name <TAB> question <TAB> gt_answer` (a fourth prediction field, if present, is ignored), the two
questions of an image on consecutive lines; a question's id is its line number. A line that is not UTF-8,
has the wrong number of fields or no Yes/No truth is listed and left out, as is a question whose image is
missing. Images are looked up in `--images`, else in an `images` folder beside each file. Without data, a
synthetic existence subtask is written from `datasets.scenes` into `OUT/data` (two questions per image: a
present object, Yes, and an absent one, No; the absent partner of a present object when there is one).
Results are written per condition as the eval tool's input, `OUT/results/<condition>/<subtask>.txt`, and
scored with `load_mme_results` + `score_mme`; a subtask without answers has score None (n/a), and so has the
total then. Each condition's acc, acc+ and score get a bootstrap 95% interval over the subtask's images (an
image's questions are resampled together, as acc+ scores them): the error bars of the score chart.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from headlab.datasets.mme import (
    MmeFile,
    MmeLine,
    load_mme_results,
    mme_total,
    parse_answer,
    score_mme,
    tsv_lines,
)
from headlab.datasets.pope import PopeQuestion
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
    split_lines,
    split_problems,
    start_document,
)
from headlab.reports.document import Document
from headlab.reports.output import fmt, minus, synthetic_data, write_report_files
from headlab.reports.registry import Report, ReportOption, ReportResult, out_option
from headlab.runs.answering import CONDITIONS, Split
from headlab.runs.atomic import write_text_atomic
from headlab.runs.outcome import Progress

MME_SUFFIX = " Please answer yes or no."
MME_KEYS = ("questions", "images", "acc", "acc_plus", "score", "other")


def write_mme_benchmark(folder: str | Path, n_images: int = 30, *, seed: int = 1234, size: int = 32) -> Path:
    """A synthetic MME existence subtask: `images/` and `existence.txt` (image, question, gt per line)."""
    from headlab.datasets import scenes

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for s in scenes.make_scenes(n_images, prior=0.5, seed=seed, start_id=200_000):
        scenes.render(s, size=size).save(folder / "images" / s.filename)
        present = rng.choice(s.objects)
        partners = [scenes.PARTNERS[o] for o in s.objects if scenes.PARTNERS[o] not in s.objects]
        absent = partners or [c for c in sorted(scenes.CATEGORIES) if c not in s.objects]
        for obj, gt in ((present, "Yes"), (rng.choice(absent), "No")):
            lines.append(f"{s.filename}\t{scenes.question(obj)}{MME_SUFFIX}\t{gt}")
    (folder / "existence.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def load_mme_questions(path: Path, images: Path | None, n: int | None) -> Split:
    """A subtask question file as a `Split` (name = subtask = file stem); `n` = first N images. Malformed
    lines and questions whose image is missing are listed and left out."""
    if not path.is_file():
        raise InputError(f"MME question file {path} does not exist (or is not a file)")
    split = Split(path.stem, path, images if images is not None else path.parent / "images", [])
    seen: list[str] = []
    for number, parts, problem in tsv_lines(path):
        if parts is None:
            split.problems.append(problem)
            continue
        if len(parts) not in (3, 4):
            split.problems.append(f"{path.name}:{number}: expected 3 tab-separated fields, got {len(parts)}")
            continue
        image, question, gt = parts[0].strip(), parts[1], parts[2].strip().lower()
        if gt not in ("yes", "no") or not image or not question.strip():
            split.problems.append(f"{path.name}:{number}: needs an image, a question and Yes/No, got {gt!r}")
            continue
        if image not in seen:
            if n is not None and len(seen) >= n:
                continue
            seen.append(image)
        split.add(PopeQuestion(number, image, question, gt), f"{path.name}:{number}")
    return split


def mme_results(split: Split, answers: Mapping[int, str]) -> MmeFile:
    """The subtask's answered questions as the eval tool's results (what `score_mme` takes)."""
    out = MmeFile(subtask=split.name)
    for q in split.questions:
        if q.question_id in answers:
            out.lines.append(MmeLine(q.image, q.text, q.label, answers[q.question_id]))
    return out


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def write_mme_results(results: MmeFile, path: Path) -> Path:
    """`image <TAB> question <TAB> Yes/No <TAB> prediction` lines (tabs and newlines in text become spaces),
    written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{_clean(x.image)}\t{_clean(x.question)}\t{x.answer.capitalize()}\t{_clean(x.prediction)}"
        for x in results.lines
    ]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return path


def mme_intervals(results: MmeFile) -> dict[str, list[float] | None]:
    """Bootstrap 95% intervals of acc, acc+ and score (percent) over the images of `results`."""
    right: dict[str, list[bool]] = {}
    for line in results.lines:
        right.setdefault(line.image, []).append(parse_answer(line.prediction) == line.answer)
    columns = {
        "right": [sum(oks) for oks in right.values()],
        "asked": [len(oks) for oks in right.values()],
        "all_right": [float(all(oks)) for oks in right.values()],
        "images": [1.0] * len(right),
    }
    statistics = {
        "acc": lambda s: 100 * s["right"] / s["asked"],
        "acc_plus": lambda s: 100 * s["all_right"] / s["images"],
        "score": lambda s: 100 * s["right"] / s["asked"] + 100 * s["all_right"] / s["images"],
    }
    return bootstrap_intervals(columns, statistics)


def _as_correct(label: str, prediction: str) -> str:
    """A parsed MME prediction as yes/no for the bootstrap: right -> the label, wrong or "other" -> the
    opposite (so "other" counts wrong, as in MME)."""
    return label if parse_answer(prediction) == label else ("no" if label == "yes" else "yes")


def _mme_entry(split: Split, ans: Answered, out: Path) -> dict:
    conditions, log = ans.conditions, ans.log
    entry: dict = {"file": str(split.path), "n_questions": len(split.questions), "metrics": {}}
    entry |= {"results": {}, "vs_none": {}, "malformed_lines": split.problems, "intervals": {}}
    entry |= {"missing_images": split.missing_images, "failed": ans.run.failures(split.name)}
    for c in conditions:
        path = write_mme_results(
            mme_results(split, log.get(c, split.name)), out / "results" / c / f"{split.name}.txt"
        )
        entry["results"][c] = str(path)
        results = load_mme_results(path)
        entry["metrics"][c] = asdict(score_mme(results))
        entry["intervals"][c] = mme_intervals(results)
    base = log.get("none", split.name)
    for c in conditions[1:]:
        other = log.get(c, split.name)
        both = [q for q in split.questions if q.question_id in base and q.question_id in other]
        boot = paired_bootstrap(
            [q.label for q in both],
            [_as_correct(q.label, base[q.question_id]) for q in both],
            [_as_correct(q.label, other[q.question_id]) for q in both],
        )
        m0, m1 = entry["metrics"]["none"], entry["metrics"][c]
        entry["vs_none"][c] = {
            "accuracy": boot["accuracy"],
            "score": minus(m1["score"], m0["score"]),
            "acc_plus": minus(m1["acc_plus"], m0["acc_plus"]),
            "flipped": flipped(split.questions, base, other),
        }
    entry["examples"] = [
        {"question_id": q.question_id, "image": q.image, "question": q.text, "label": q.label}
        | {c: log.get(c, split.name).get(q.question_id, "") for c in conditions}
        for q in split.questions[:6]
    ]
    return entry


def build_mme_report(ans: Answered, splits: Sequence[Split], out: Path, **extra) -> dict:
    report = ans.head() | {"benchmark": "mme", "subtasks": {}, "total": {}, **extra}
    for split in splits:
        report["subtasks"][split.name] = _mme_entry(split, ans, out)
    for c in ans.conditions:
        report["total"][c] = mme_total(s["metrics"][c]["score"] for s in report["subtasks"].values())
    report["outcome"] = ans.outcome(splits, sum(len(s.problems) + len(s.missing_images) for s in splits))
    return report


def document(report: Mapping, thumbs=None) -> Document:
    """The report's document; `thumbs`: the flipped answers' thumbnails (`benchmark.flipped_thumbnails`)."""
    from headlab.reports.figures import grouped_bars

    doc = start_document("MME report", report)
    doc.heading("Scores (acc and acc+ in percent; score = acc + acc+, at most 200 per subtask)")
    rows = [
        [name, c, *(m[k] for k in MME_KEYS)]
        for name, s in report["subtasks"].items()
        for c, m in s["metrics"].items()
    ]
    doc.table(["subtask", "condition", *MME_KEYS], rows)
    doc.paragraph("Total score: " + ", ".join(f"{c} {fmt(t, '.2f')}" for c, t in report["total"].items()))
    doc.heading(
        "Difference vs none (Δ accuracy as a fraction: bootstrap 95% CI, paired, 1000 resamples, seed 0)"
    )
    rows = [
        [name, c, fmt_ci(d["accuracy"]), d["acc_plus"], d["score"], len(d["flipped"])]
        for name, s in report["subtasks"].items()
        for c, d in s["vs_none"].items()
    ]
    doc.table(["subtask", "condition", "Δ accuracy", "Δ acc+", "Δ score", "flipped"], rows)
    subtasks = report["subtasks"]
    scores = {c: {n: s["metrics"][c]["score"] for n, s in subtasks.items()} for c in report["conditions"]}
    intervals = {
        c: {n: (s.get("intervals", {}).get(c) or {}).get("score") for n, s in subtasks.items()}
        for c in report["conditions"]
    }
    title = "MME score per subtask (error bars: bootstrap 95% interval over images)"
    fig = grouped_bars(scores, intervals, list(subtasks), title=title, yaxis_range=[0, 200], height=340)
    doc.figure(fig)
    doc.heading("Example answers (first questions of each subtask)")
    for name, s in report["subtasks"].items():
        keys = ("question_id", "image", "question", "label", *report["conditions"])
        doc.heading(name, level=3)
        doc.table(keys, [[e[k] for k in keys] for e in s["examples"]])
    flipped_section(doc, report["subtasks"], thumbs)
    problems_section(doc, report, split_problems(report["subtasks"]))
    return doc


def mme_report(
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
    progress: Progress | None = None,
) -> ReportResult:
    """Answer, score and write the MME report (see the module docstring); `model` as in `pope_report`."""
    out, conditions = begin(
        REPORT,
        out,
        conditions,
        images=images,
        n=n,
        max_new_tokens=max_new_tokens,
        var_tau=var_tau,
        batch_size=batch_size,
    )
    if not data:
        data = [synthetic_data(out / "data", write_mme_benchmark) / "existence.txt"]
    paths = [Path(p) for p in data]
    if len({p.stem for p in paths}) != len(paths):
        raise InputError("two MME files share a subtask name; give each subtask its own <subtask>.txt")
    splits = [load_mme_questions(p, images, n) for p in paths]
    ans = answer(
        out,
        model,
        "MME",
        conditions,
        [(splits, max_new_tokens)],
        var_tau=var_tau,
        progress=progress,
        batch_size=batch_size,
    )
    report = build_mme_report(ans, splits, out, max_new_tokens=max_new_tokens, n_images_per_subtask=n)
    doc = document(report, flipped_thumbnails(splits, report["subtasks"]))
    return ReportResult(write_report_files(out, report, doc), report, ans.run)


def summary(result: ReportResult, out: Path) -> list[str]:
    return split_lines(result, out, "subtasks", "score", ".1f")


REPORT = Report(
    name="mme",
    help="MME hallucination subset: acc / acc+ / score per subtask and intervention, resumable.",
    options=(
        out_option("answers.jsonl, results/, report.json/.md/.html"),
        MODEL,
        ReportOption(
            name="data",
            type=Path,
            many=True,
            help="MME question file <subtask>.txt (repeat per subtask; default: synthetic in OUT/data)",
        ),
        IMAGES,
        INTERVENTIONS,
        ReportOption(
            name="n", type=int, ge=1, aliases=("--first",), help="first N images per subtask (default: all)"
        ),
        MAX_NEW_TOKENS,
        VAR_TAU,
        BATCH_SIZE,
    ),
    run=mme_report,
    summary=summary,
)
