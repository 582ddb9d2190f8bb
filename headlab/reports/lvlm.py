"""MME (hallucination subset) report: greedy yes/no answers of an LVLM per subtask and intervention condition,
scored with `datasets.mme`, with the paired difference each intervention makes and the answers it flipped.

Built on the POPE report's pieces (`reports.pope`): conditions none/vhr/var, answers appended to
`answers.jsonl` with resume (`reports.answers`), `answer_all` (a failing question is listed, never stops
the others), the paired bootstrap, the outcome and its exit code, and the escaping `Page` HTML writer.

Input: one question file per subtask, named `<subtask>.txt`, in the MME eval-tool layout: lines
`image_name <TAB> question <TAB> gt_answer` (a fourth prediction field, if present, is ignored), the two
questions of an image on consecutive lines; a question's id is its line number. A line that is not UTF-8,
has the wrong number of fields or no Yes/No truth is listed and left out, as is a question whose image is
missing. Images are looked up in `--images`, else in an `images` folder beside each file. Without data, a
synthetic existence subtask is written from `datasets.scenes` into `OUT/data` (two questions per image: a
present object, Yes, and an absent one, No; the absent partner of a present object when there is one).
Results are written per condition as the eval tool's input, `OUT/results/<condition>/<subtask>.txt`, and
scored with `load_mme_results` + `score_mme`; a subtask without answers has score None (n/a), and so has the
total then.
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
from headlab.reports.answers import ANSWERS, AnswerLog
from headlab.reports.output import (
    check_folder,
    check_out,
    fmt,
    minus,
    synthetic_data,
    write_report_files,
    write_text_atomic,
)
from headlab.reports.pope import (
    BOOTSTRAP,
    AnswerRun,
    Progress,
    ReportResult,
    Split,
    answer_all,
    check_options,
    flipped,
    fmt_ci,
    load_lvlm,
    outcome,
    paired_bootstrap,
    problems_html,
    problems_markdown,
    report_head,
    split_problems,
)

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


def _as_correct(label: str, prediction: str) -> str:
    """A parsed MME prediction as yes/no for the bootstrap: right -> the label, wrong or "other" -> the
    opposite (so "other" counts wrong, as in MME)."""
    return label if parse_answer(prediction) == label else ("no" if label == "yes" else "yes")


def _mme_entry(split: Split, conditions, log: AnswerLog, run: AnswerRun, out: Path) -> dict:
    entry: dict = {"file": str(split.path), "n_questions": len(split.questions), "metrics": {}}
    entry |= {"results": {}, "vs_none": {}, "malformed_lines": split.problems}
    entry |= {"missing_images": split.missing_images, "failed": run.failures(split.name)}
    for c in conditions:
        path = write_mme_results(
            mme_results(split, log.get(c, split.name)), out / "results" / c / f"{split.name}.txt"
        )
        entry["results"][c] = str(path)
        entry["metrics"][c] = asdict(score_mme(load_mme_results(path)))
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


def build_mme_report(
    identity, splits, conditions, log: AnswerLog, run: AnswerRun, n_layers: int, out: Path, **extra
):
    report = report_head(identity, conditions, n_layers, extra.get("var_tau", 20.0), log)
    report |= {"benchmark": "mme", "subtasks": {}, "total": {}, **extra}
    for split in splits:
        report["subtasks"][split.name] = _mme_entry(split, conditions, log, run, out)
    for c in conditions:
        report["total"][c] = mme_total(s["metrics"][c]["score"] for s in report["subtasks"].values())
    bad = sum(len(s.problems) + len(s.missing_images) for s in splits)
    report["outcome"] = outcome(splits, conditions, log, run, bad).as_dict()
    return report


def render_mme_markdown(report: Mapping) -> str:
    lines = [f"# MME report: {report['model']}", ""]
    lines += [f"- **{c}**: {note}" for c, note in report["conditions"].items()]
    lines += ["", "| subtask | condition | questions | images | acc | acc+ | score | other |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, s in report["subtasks"].items():
        for c, m in s["metrics"].items():
            lines.append(
                f"| {name} | {c} | {m['questions']} | {m['images']} | {fmt(m['acc'], '.2f')} | "
                f"{fmt(m['acc_plus'], '.2f')} | {fmt(m['score'], '.2f')} | {m['other']} |"
            )
    lines += ["", "Total score: " + ", ".join(f"{c} {fmt(t, '.2f')}" for c, t in report["total"].items()), ""]
    lines += [
        "Difference vs none (Δ accuracy as a fraction, bootstrap 95% CI, paired, 1000 resamples, seed 0):"
    ]
    lines += [
        "",
        "| subtask | condition | Δ accuracy | Δ acc+ | Δ score | flipped |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["subtasks"].items():
        for c, d in s["vs_none"].items():
            lines.append(
                f"| {name} | {c} | {fmt_ci(d['accuracy'])} | {fmt(d['acc_plus'], '+.2f')} | "
                f"{fmt(d['score'], '+.2f')} | {len(d['flipped'])} |"
            )
    return "\n".join(lines + problems_markdown(report, split_problems(report["subtasks"]))) + "\n"


def render_mme_html(report: Mapping) -> str:
    import plotly.graph_objects as go

    from headlab.reports.html import Page

    page = Page(f"MME report: {report['model']}")
    page.bullets([f"{c}: {note}" for c, note in report["conditions"].items()])
    if report.get("interrupted"):
        page.paragraph("Interrupted: the numbers cover the questions answered so far; rerun to finish.")
    page.heading("Scores (acc and acc+ in percent; score = acc + acc+, at most 200 per subtask)")
    rows = [
        [name, c, *(m[k] for k in MME_KEYS)]
        for name, s in report["subtasks"].items()
        for c, m in s["metrics"].items()
    ]
    page.table(["subtask", "condition", *MME_KEYS], rows)
    page.paragraph("Total: " + ", ".join(f"{c} {fmt(t, '.2f')}" for c, t in report["total"].items()))
    page.heading("Difference vs none (Δ accuracy: bootstrap 95% CI, paired, 1000 resamples)")
    rows = [
        [name, c, fmt_ci(d["accuracy"]), d["acc_plus"], d["score"], len(d["flipped"])]
        for name, s in report["subtasks"].items()
        for c, d in s["vs_none"].items()
    ]
    page.table(["subtask", "condition", "Δ accuracy", "Δ acc+", "Δ score", "flipped"], rows)
    bars = [
        go.Bar(
            name=c,
            x=list(report["subtasks"]),
            y=[s["metrics"][c]["score"] for s in report["subtasks"].values()],
        )
        for c in report["conditions"]
    ]
    fig = go.Figure(bars)
    fig.update_layout(barmode="group", title="MME score per subtask", yaxis_range=[0, 200], height=340)
    page.figure(fig)
    page.heading("Example answers (first questions of each subtask)")
    for name, s in report["subtasks"].items():
        keys = ("question_id", "image", "question", "label", *report["conditions"])
        page.heading(name, level=3)
        page.table(keys, [[e[k] for k in keys] for e in s["examples"]])
    keys = ("question_id", "image", "question", "label", "before", "after", "now_correct")
    page.heading("Flipped answers")
    for name, s in report["subtasks"].items():
        for c, d in s["vs_none"].items():
            page.heading(f"{name}: none -> {c} ({len(d['flipped'])})", level=3)
            page.table(
                keys, [[str(f[k]) if k == "now_correct" else f[k] for k in keys] for f in d["flipped"]]
            )
    problems_html(page, report, split_problems(report["subtasks"]))
    return page.render()


def mme_report(
    out: Path,
    *,
    model: str | None = None,
    data: Sequence[Path] = (),
    images: Path | None = None,
    conditions: Sequence[str] = ("none", "vhr", "var"),
    n: int | None = None,
    max_new_tokens: int = 4,
    var_tau: float = 20.0,
    progress: Progress | None = None,
) -> ReportResult:
    """Answer, score and write the MME report (see the module docstring); `model` as in `pope_report`."""
    out = check_out(out)
    check_folder(images, "--images")
    conditions = check_options(n, max_new_tokens, conditions, var_tau)
    out.mkdir(parents=True, exist_ok=True)
    if not data:
        data = [synthetic_data(out / "data", write_mme_benchmark) / "existence.txt"]
    paths = [Path(p) for p in data]
    if len({p.stem for p in paths}) != len(paths):
        raise InputError("two MME files share a subtask name; give each subtask its own <subtask>.txt")
    splits = [load_mme_questions(p, images, n) for p in paths]
    lm, identity = load_lvlm(out, model, "MME")
    log = AnswerLog(out / ANSWERS, identity)
    run = answer_all(
        lm, splits, conditions, log, max_new_tokens=max_new_tokens, var_tau=var_tau, progress=progress
    )
    report = build_mme_report(
        identity,
        splits,
        conditions,
        log,
        run,
        lm.tower("lm").n_layers,
        out,
        var_tau=var_tau,
        max_new_tokens=max_new_tokens,
        n_images_per_subtask=n,
        interrupted=run.interrupted,
        bootstrap=BOOTSTRAP,
    )
    html = write_report_files(out, report, render_mme_markdown(report), render_mme_html(report))
    return ReportResult(html, report, run)
