"""MME (hallucination subset) report: greedy yes/no answers of an LVLM per subtask and intervention condition,
scored with `datasets.mme`, with the paired difference each intervention makes and the answers it flipped.

Built on the POPE report's pieces (`reports.pope`): conditions none/vhr/var (`condition_interventions`),
answers appended to `answers.jsonl` with resume (`AnswerLog`, `answer_all`), the paired bootstrap and the
escaping `Page` HTML writer.

Input: one question file per subtask, named `<subtask>.txt`, in the MME eval-tool layout: lines
`image_name <TAB> question <TAB> gt_answer` (a fourth prediction field, if present, is ignored), the two
questions of an image on consecutive lines. Images are looked up in `--images`, else in an `images` folder
beside each file. Without data, a synthetic existence subtask is written from `datasets.scenes` into
`OUT/data` (two questions per image: a present object, Yes, and an absent one, No; the absent partner of a
present object when there is one). Results are written per condition as the eval tool's input,
`OUT/results/<condition>/<subtask>.txt`, and scored with `load_mme_results` + `score_mme`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from headlab.datasets.mme import MmeFile, MmeLine, load_mme_results, parse_answer, score_mme
from headlab.datasets.pope import PopeQuestion
from headlab.errors import InputError
from headlab.reports.pope import (
    ANSWERS,
    AnswerLog,
    AnswerRun,
    Progress,
    Split,
    answer_all,
    check_options,
    condition_interventions,
    flipped,
    load_lvlm,
    paired_bootstrap,
)

MME_SUFFIX = " Please answer yes or no."
BOOTSTRAP = {"resamples": 1000, "seed": 0, "level": 0.95, "paired": True}


@dataclass
class LvlmReportResult:
    html: Path
    report: dict
    run: AnswerRun


def _fmt_ci(d: Mapping) -> str:
    return f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def _write(out: Path, report: Mapping, markdown: str, html: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "report.md").write_text(markdown, encoding="utf-8")
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ MME


@dataclass
class MmeSubtask:
    """One subtask's questions (as POPE questions: id = line number, label yes/no) and what was wrong."""

    split: Split
    answers_by_id: dict[int, str]  # question_id -> gt ("yes"/"no")


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
        raise InputError(f"MME question file {path} does not exist")
    folder = images if images is not None else path.parent / "images"
    split = Split(path.stem, path, folder, [])
    seen: list[str] = []
    raw_lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        parts = raw.split("\t")
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
        if not (folder / image).is_file():
            split.missing_images.append(f"{path.name}:{number}: {folder / image}")
            continue
        split.questions.append(PopeQuestion(number, image, question, gt))
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
    """`image <TAB> question <TAB> Yes/No <TAB> prediction` lines (tabs and newlines in text become spaces)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{_clean(x.image)}\t{_clean(x.question)}\t{x.answer.capitalize()}\t{_clean(x.prediction)}"
        for x in results.lines
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _as_correct(label: str, prediction: str) -> str:
    """A parsed MME prediction as yes/no for the bootstrap: right -> the label, wrong or "other" -> the
    opposite (so "other" counts wrong, as in MME)."""
    return label if parse_answer(prediction) == label else ("no" if label == "yes" else "yes")


def build_mme_report(
    model: str,
    splits: Sequence[Split],
    conditions: Sequence[str],
    log: AnswerLog,
    n_layers: int,
    out: Path,
    **extra,
) -> dict:
    var_tau = extra.get("var_tau", 20.0)
    report: dict = {
        "benchmark": "mme",
        "model": model,
        "conditions": {c: condition_interventions(c, n_layers, var_tau=var_tau)[1] for c in conditions},
        "subtasks": {},
        "total": {},
        "problems": {"answers_file": list(log.problems)},
        **extra,
    }
    for split in splits:
        entry: dict = {"file": str(split.path), "n_questions": len(split.questions), "metrics": {}}
        entry |= {"results": {}, "vs_none": {}}
        entry["malformed_lines"], entry["missing_images"] = split.problems, split.missing_images
        for c in conditions:
            results = mme_results(split, log.get(c, split.name))
            path = write_mme_results(results, out / "results" / c / f"{split.name}.txt")
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
                "score": m1["score"] - m0["score"],
                "acc_plus": m1["acc_plus"] - m0["acc_plus"],
                "flipped": flipped(split.questions, base, other),
            }
        entry["examples"] = [
            {"question_id": q.question_id, "image": q.image, "question": q.text, "label": q.label}
            | {c: log.get(c, split.name).get(q.question_id, "") for c in conditions}
            for q in split.questions[:6]
        ]
        report["subtasks"][split.name] = entry
    for c in conditions:
        report["total"][c] = sum(s["metrics"][c]["score"] for s in report["subtasks"].values())
    return report


def _mme_problems(report: Mapping) -> list[str]:
    out = list(report["problems"]["answers_file"])
    for s in report["subtasks"].values():
        out += [f"malformed line: {p}" for p in s["malformed_lines"]]
        out += [f"missing image: {p}" for p in s["missing_images"]]
    return out


MME_KEYS = ("questions", "images", "acc", "acc_plus", "score", "other")


def render_mme_markdown(report: Mapping) -> str:
    lines = [f"# MME report: {report['model']}", ""]
    lines += [f"- **{c}**: {note}" for c, note in report["conditions"].items()]
    lines += ["", "| subtask | condition | questions | images | acc | acc+ | score | other |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, s in report["subtasks"].items():
        for c, m in s["metrics"].items():
            lines.append(
                f"| {name} | {c} | {m['questions']} | {m['images']} | {m['acc']:.2f} | {m['acc_plus']:.2f} | "
                f"{m['score']:.2f} | {m['other']} |"
            )
    lines += ["", "Total score: " + ", ".join(f"{c} {t:.2f}" for c, t in report["total"].items()), ""]
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
                f"| {name} | {c} | {_fmt_ci(d['accuracy'])} | {d['acc_plus']:+.2f} | {d['score']:+.2f} | "
                f"{len(d['flipped'])} |"
            )
    problems = _mme_problems(report)
    lines += ["", f"Problems ({len(problems)}):", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


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
    page.paragraph("Total: " + ", ".join(f"{c} {t:.2f}" for c, t in report["total"].items()))
    page.heading("Difference vs none (Δ accuracy: bootstrap 95% CI, paired, 1000 resamples)")
    rows = [
        [name, c, _fmt_ci(d["accuracy"]), d["acc_plus"], d["score"], len(d["flipped"])]
        for name, s in report["subtasks"].items()
        for c, d in s["vs_none"].items()
    ]
    page.table(["subtask", "condition", "Δ accuracy", "Δ acc+", "Δ score", "flipped"], rows)
    fig = go.Figure(
        [
            go.Bar(
                name=c,
                x=list(report["subtasks"]),
                y=[s["metrics"][c]["score"] for s in report["subtasks"].values()],
            )
            for c in report["conditions"]
        ]
    )
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
    problems = _mme_problems(report)
    page.heading(f"Problems ({len(problems)})")
    page.bullets(problems)
    return page.render()


def mme_report(
    out: Path,
    *,
    model: str = "zoo:llava",
    data: Sequence[Path] = (),
    images: Path | None = None,
    conditions: Sequence[str] = ("none", "vhr", "var"),
    n: int | None = None,
    max_new_tokens: int = 4,
    var_tau: float = 20.0,
    progress: Progress | None = None,
) -> LvlmReportResult:
    """Answer, score and write the MME report (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    conditions = check_options(n, max_new_tokens, conditions)
    if not data:
        folder = out / "data"
        if not (folder / "existence.txt").is_file():
            write_mme_benchmark(folder)
        data = [folder / "existence.txt"]
    paths = [Path(p) for p in data]
    if len({p.stem for p in paths}) != len(paths):
        raise InputError("two MME files share a subtask name; give each subtask its own <subtask>.txt")
    splits = [load_mme_questions(p, images, n) for p in paths]
    lm = load_lvlm(model, "MME")
    log = AnswerLog(out / ANSWERS, model)
    run = answer_all(
        lm, splits, conditions, log, max_new_tokens=max_new_tokens, var_tau=var_tau, progress=progress
    )
    report = build_mme_report(
        model,
        splits,
        conditions,
        log,
        lm.tower("lm").n_layers,
        out,
        var_tau=var_tau,
        max_new_tokens=max_new_tokens,
        n_images_per_subtask=n,
        interrupted=run.interrupted,
        bootstrap=BOOTSTRAP,
    )
    html = _write(out, report, render_mme_markdown(report), render_mme_html(report))
    return LvlmReportResult(html, report, run)


# ---------------------------------------------------------------------------------------------- AMBER
#
# Input (`--data DIR`, the AMBER release layout): DIR/annotations.json, DIR/relation.json,
# DIR/safe_words.txt and DIR/query/query_generative.json + DIR/query/query_discriminative.json (lists of
# {id, image, query}); images in `--images`, else DIR/image. Generative answers get `gen_tokens` greedy tokens,
# discriminative ones `max_new_tokens`. Scores: `score_amber_generative` (rule nouns, exact matching) on the
# generative answers, `score_amber_discriminative` on `normalize_yes_no` of the discriminative ones, and
# `amber_score(CHAIR, overall F1)`. Differences vs none: the paired bootstrap over the discriminative
# questions (accuracy with invalid answers wrong; F1 with "No" positive, as AMBER), aggregate differences for
# the generative metrics.

AMBER_GEN, AMBER_DIS = "generative", "discriminative"
AMBER_FILES = ("annotations.json", "relation.json", "safe_words.txt")


def write_amber_benchmark(
    folder: str | Path, n_images: int = 20, *, seed: int = 1234, size: int = 32
) -> Path:
    """A synthetic AMBER release: per scene one generative entry (truth = its objects, hallu = the absent
    partners of its objects) and two existence questions (a present object, yes; an absent one, no)."""
    from headlab.datasets import scenes
    from headlab.zoo.llava import CAPTION_PROMPT

    folder = Path(folder)
    (folder / "image").mkdir(parents=True, exist_ok=True)
    (folder / "query").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    annotations, gen, dis = [], [], []
    scene_list = scenes.make_scenes(n_images, prior=0.5, seed=seed, start_id=300_000)
    for s in scene_list:
        scenes.render(s, size=size).save(folder / "image" / s.filename)
        absent_partners = sorted({scenes.PARTNERS[o] for o in s.objects} - set(s.objects))
        oid = len(annotations) + 1
        annotations.append(
            {"id": oid, "type": "generative", "truth": list(s.objects), "hallu": absent_partners}
        )
        gen.append({"id": oid, "image": s.filename, "query": CAPTION_PROMPT})
    for s in scene_list:
        absent = sorted({scenes.PARTNERS[o] for o in s.objects} - set(s.objects)) or [
            c for c in sorted(scenes.CATEGORIES) if c not in s.objects
        ]
        for obj, truth in ((rng.choice(s.objects), "yes"), (rng.choice(absent), "no")):
            oid = len(annotations) + 1
            annotations.append({"id": oid, "type": "discriminative-hallucination", "truth": truth})
            dis.append({"id": oid, "image": s.filename, "query": scenes.question(obj)})
    (folder / "annotations.json").write_text(json.dumps(annotations, indent=1), encoding="utf-8")
    (folder / "query" / "query_generative.json").write_text(json.dumps(gen, indent=1), encoding="utf-8")
    (folder / "query" / "query_discriminative.json").write_text(json.dumps(dis, indent=1), encoding="utf-8")
    relations = {c: [scenes.PARTNERS[c]] for c in sorted(scenes.CATEGORIES)}
    (folder / "relation.json").write_text(json.dumps(relations, indent=1), encoding="utf-8")
    (folder / "safe_words.txt").write_text("picture\nimage\n", encoding="utf-8")
    return folder


def load_amber_queries(
    path: Path, images: Path, known: Mapping[int, object], n: int | None, name: str
) -> Split:
    """A query file as a `Split` of questions (label "" : the truth lives in annotations.json); queries whose id
    has no annotation of the right kind, malformed entries and missing images are listed and left out."""
    from headlab.datasets.records import read_records

    split = Split(name, path, images, [])
    if not path.is_file():
        split.problems.append(f"{path} does not exist: no {name} queries")
        return split
    records = read_records(path)
    split.problems += records.problems
    for index, obj in records.items:
        qid, image, query = obj.get("id"), obj.get("image"), obj.get("query")
        if not isinstance(qid, int) or not isinstance(image, str) or not isinstance(query, str):
            split.problems.append(f"{path.name}[{index}]: needs an integer id, an image and a query")
        elif qid not in known:
            split.problems.append(f"{path.name}[{index}]: id {qid} has no {name} entry in annotations.json")
        elif n is not None and len(split.questions) >= n:
            break
        elif not (images / image).is_file():
            split.missing_images.append(f"{path.name}[{index}]: {images / image}")
        else:
            split.questions.append(PopeQuestion(qid, image, query, ""))
    return split


def _positive_no(truth: str, response: str) -> str:
    """AMBER's "No"-positive view for the bootstrap's F1: "yes" = predicted No (invalid = not No)."""
    return "yes" if response == "No" else "no"


def _amber_correct(truth: str, response: str) -> str:
    return (
        truth
        if response.lower() == truth and response in ("Yes", "No")
        else ("no" if truth == "yes" else "yes")
    )


def build_amber_report(
    model: str,
    data: Path,
    splits: Mapping[str, Split],
    conditions: Sequence[str],
    log: AnswerLog,
    n_layers: int,
    **extra,
) -> dict:
    from headlab.datasets.amber import (
        amber_score,
        load_amber_annotations,
        load_amber_generative,
        load_amber_relations,
        load_safe_words,
        normalize_yes_no,
        score_amber_discriminative,
        score_amber_generative,
    )

    questions, _ = load_amber_annotations(data / "annotations.json")
    objects, _ = load_amber_generative(data / "annotations.json")
    relations = load_amber_relations(data / "relation.json")
    safe = load_safe_words(data / "safe_words.txt")
    var_tau = extra.pop("var_tau", 20.0)
    report: dict = {
        "benchmark": "amber",
        "model": model,
        "data": str(data),
        "var_tau": var_tau,
        "conditions": {c: condition_interventions(c, n_layers, var_tau=var_tau)[1] for c in conditions},
        "n_generative": len(splits[AMBER_GEN].questions),
        "n_discriminative": len(splits[AMBER_DIS].questions),
        "metrics": {},
        "vs_none": {},
        "problems": {"answers_file": list(log.problems)}
        | {f"{k}_queries": s.problems + s.missing_images for k, s in splits.items()}
        | {"annotations": extra.pop("annotation_problems", [])},
        **extra,
    }
    gen_ids = [q.question_id for q in splits[AMBER_GEN].questions]
    dis_ids = [q.question_id for q in splits[AMBER_DIS].questions]
    responses = {}
    for c in conditions:
        g = log.get(c, AMBER_GEN)
        gen = score_amber_generative({i: g[i] for i in gen_ids if i in g}, objects, relations, safe)
        d = log.get(c, AMBER_DIS)
        responses[c] = {i: normalize_yes_no(d[i]) for i in dis_ids if i in d}
        dis = score_amber_discriminative(questions, responses[c])
        overall = dis.get("overall")
        entry = {k: v for k, v in asdict(gen).items() if k not in ("per_response", "problems")}
        entry["discriminative"] = {k: asdict(v) for k, v in dis.items()}
        entry["amber_score"] = amber_score(gen.chair, overall.f1) if overall is not None else None
        report["metrics"][c] = entry
    for c in conditions[1:]:
        both = [i for i in dis_ids if i in responses["none"] and i in responses[c]]
        truth = [questions[i].truth for i in both]
        before, after = [responses["none"][i] for i in both], [responses[c][i] for i in both]
        acc = paired_bootstrap(
            truth,
            [_amber_correct(t, r) for t, r in zip(truth, before, strict=True)],
            [_amber_correct(t, r) for t, r in zip(truth, after, strict=True)],
        )["accuracy"]
        f1 = paired_bootstrap(
            ["yes" if t == "no" else "no" for t in truth],
            [_positive_no(t, r) for t, r in zip(truth, before, strict=True)],
            [_positive_no(t, r) for t, r in zip(truth, after, strict=True)],
        )["f1"]
        m0, m1 = report["metrics"]["none"], report["metrics"][c]
        diff = {k: m1[k] - m0[k] for k in ("chair", "cover", "hal", "cog")}
        if m0["amber_score"] is not None and m1["amber_score"] is not None:
            diff["amber_score"] = m1["amber_score"] - m0["amber_score"]
        flips = [
            {"id": i, "query": q.text, "truth": questions[i].truth, "before": log.get("none", AMBER_DIS)[i]}
            | {"after": log.get(c, AMBER_DIS)[i]}
            for q in splits[AMBER_DIS].questions
            if (i := q.question_id) in both and responses["none"][i] != responses[c][i]
        ]
        report["vs_none"][c] = {"accuracy": acc, "f1": f1, **diff, "flipped": flips}
    gen_split = splits[AMBER_GEN]
    report["examples"] = [
        {"id": q.question_id, "image": q.image, "query": q.text}
        | {c: log.get(c, AMBER_GEN).get(q.question_id, "") for c in conditions}
        for q in gen_split.questions[:6]
    ] + [
        {"id": q.question_id, "image": q.image, "query": q.text}
        | {c: log.get(c, AMBER_DIS).get(q.question_id, "") for c in conditions}
        for q in splits[AMBER_DIS].questions[:6]
    ]
    return report


AMBER_GEN_KEYS = ("chair", "cover", "hal", "cog", "n_responses", "n_invalid")
AMBER_DIS_KEYS = ("n", "accuracy", "precision", "recall", "f1", "invalid")


def _amber_problems(report: Mapping) -> list[str]:
    return [p for ps in report["problems"].values() for p in ps]


def _amber_tables(report: Mapping):
    gen = [[c, *(m[k] for k in AMBER_GEN_KEYS), m["amber_score"]] for c, m in report["metrics"].items()]
    dis = [
        [c, dim, *(s[k] for k in AMBER_DIS_KEYS)]
        for c, m in report["metrics"].items()
        for dim, s in m["discriminative"].items()
    ]
    diff = [
        [
            c,
            _fmt_ci(d["accuracy"]),
            _fmt_ci(d["f1"]),
            *(d[k] for k in ("chair", "cover", "hal", "cog")),
            d.get("amber_score", float("nan")),
            len(d["flipped"]),
        ]
        for c, d in report["vs_none"].items()
    ]
    return (
        (["condition", *AMBER_GEN_KEYS, "AMBER score"], gen),
        (["condition", "dimension", *AMBER_DIS_KEYS], dis),
        (
            [
                "condition",
                "Δ accuracy",
                "Δ F1 (No positive)",
                "Δ CHAIR",
                "Δ Cover",
                "Δ Hal",
                "Δ Cog",
                "Δ AMBER score",
                "flipped",
            ],
            diff,
        ),
    )


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows),
    ]


def render_amber_markdown(report: Mapping) -> str:
    lines = [f"# AMBER report: {report['model']}", ""]
    lines += [f"- **{c}**: {note}" for c, note in report["conditions"].items()]
    (gh, gr), (dh, dr), (xh, xr) = _amber_tables(report)
    lines += ["", "Generative (fractions; AMBER score = (1 - CHAIR + F1) / 2):", "", *_md_table(gh, gr)]
    lines += ["", "Discriminative (No positive):", "", *_md_table(dh, dr)]
    lines += ["", "Difference vs none (bootstrap 95% CI over the discriminative questions, paired):", ""]
    lines += _md_table(xh, xr)
    problems = _amber_problems(report)
    lines += ["", f"Problems ({len(problems)}):", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def render_amber_html(report: Mapping) -> str:
    import plotly.graph_objects as go

    from headlab.reports.html import Page

    page = Page(f"AMBER report: {report['model']}")
    page.bullets([f"{c}: {note}" for c, note in report["conditions"].items()])
    if report.get("interrupted"):
        page.paragraph("Interrupted: the numbers cover the questions answered so far; rerun to finish.")
    (gh, gr), (dh, dr), (xh, xr) = _amber_tables(report)
    page.heading("Generative (AMBER score = (1 - CHAIR + F1) / 2)")
    page.table(gh, gr)
    page.heading("Discriminative (No positive)")
    page.table(dh, dr)
    page.heading("Difference vs none (bootstrap 95% CI over the discriminative questions, paired)")
    page.table(xh, xr)
    keys = ("chair", "cover", "hal", "cog")
    fig = go.Figure(
        [go.Bar(name=c, x=list(keys), y=[m[k] for k in keys]) for c, m in report["metrics"].items()]
    )
    fig.update_layout(barmode="group", title="AMBER generative", yaxis_range=[0, 1], height=340)
    page.figure(fig)
    page.heading("Example answers")
    ex = ("id", "image", "query", *report["conditions"])
    page.table(ex, [[e[k] for k in ex] for e in report["examples"]])
    page.heading("Flipped discriminative answers")
    fk = ("id", "query", "truth", "before", "after")
    for c, d in report["vs_none"].items():
        page.heading(f"none -> {c} ({len(d['flipped'])})", level=3)
        page.table(fk, [[f[k] for k in fk] for f in d["flipped"]])
    problems = _amber_problems(report)
    page.heading(f"Problems ({len(problems)})")
    page.bullets(problems)
    return page.render()


def amber_report(
    out: Path,
    *,
    model: str = "zoo:llava",
    data: Path | None = None,
    images: Path | None = None,
    conditions: Sequence[str] = ("none", "vhr", "var"),
    n: int | None = None,
    max_new_tokens: int = 4,
    gen_tokens: int = 16,
    var_tau: float = 20.0,
    progress: Progress | None = None,
) -> LvlmReportResult:
    """Answer, score and write the AMBER report; `n` = first N queries of each kind."""
    from headlab.datasets.amber import load_amber_annotations, load_amber_generative

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    conditions = check_options(n, min(max_new_tokens, gen_tokens), conditions)
    if data is None:
        data = out / "data"
        if not (data / "annotations.json").is_file():
            write_amber_benchmark(data)
    data = Path(data)
    missing = [f for f in AMBER_FILES if not (data / f).is_file()]
    if missing:
        raise InputError(f"AMBER folder {data} lacks {missing} (the release's data/ layout)")
    folder = images if images is not None else data / "image"
    questions, dis_problems = load_amber_annotations(data / "annotations.json")
    objects, gen_problems = load_amber_generative(data / "annotations.json")
    splits = {
        AMBER_GEN: load_amber_queries(
            data / "query" / "query_generative.json", folder, objects, n, AMBER_GEN
        ),
        AMBER_DIS: load_amber_queries(
            data / "query" / "query_discriminative.json", folder, questions, n, AMBER_DIS
        ),
    }
    lm = load_lvlm(model, "AMBER")
    log = AnswerLog(out / ANSWERS, model)
    run = answer_all(
        lm,
        [splits[AMBER_GEN]],
        conditions,
        log,
        max_new_tokens=gen_tokens,
        var_tau=var_tau,
        progress=progress,
    )
    if not run.interrupted:
        more = answer_all(
            lm,
            [splits[AMBER_DIS]],
            conditions,
            log,
            max_new_tokens=max_new_tokens,
            var_tau=var_tau,
            progress=progress,
        )
        run = AnswerRun(
            run.done + more.done, run.skipped + more.skipped, more.interrupted, run.seconds + more.seconds
        )
    report = build_amber_report(
        model,
        data,
        splits,
        conditions,
        log,
        lm.tower("lm").n_layers,
        var_tau=var_tau,
        annotation_problems=sorted(set(dis_problems + gen_problems)),
        max_new_tokens=max_new_tokens,
        gen_tokens=gen_tokens,
        n_per_kind=n,
        interrupted=run.interrupted,
        bootstrap=BOOTSTRAP,
    )
    html = _write(out, report, render_amber_markdown(report), render_amber_html(report))
    return LvlmReportResult(html, report, run)
