"""AMBER report: generative descriptions and discriminative yes/no answers of an LVLM per intervention
condition, scored with `datasets.amber` (CHAIR / Cover / Hal / Cog, accuracy / F1 with "No" positive, and the
AMBER score), with the paired difference each intervention makes and the answers it flipped.

Input (`--data DIR`, the AMBER release layout): DIR/annotations.json, DIR/relation.json, DIR/safe_words.txt
and DIR/query/query_generative.json + DIR/query/query_discriminative.json (lists of {id, image, query});
images in `--images`, else DIR/image. Without data, a synthetic release is written from `datasets.scenes`
into `OUT/data`. Generative answers get `gen_tokens` greedy tokens, discriminative ones `max_new_tokens`.
Scores: `score_amber_generative` (rule nouns, exact matching) on the generative answers,
`score_amber_discriminative` on `normalize_yes_no` of the discriminative ones, and `amber_score(CHAIR,
overall F1)`. Differences vs none: the paired bootstrap over the discriminative questions (accuracy with
invalid answers wrong; F1 with "No" positive, as AMBER), aggregate differences for the generative metrics.
Each condition's CHAIR / Cover / Hal / Cog get a bootstrap 95% interval over its scored responses (the
error bars of the generative chart); flipped discriminative answers are listed with their image.

Built on `reports.benchmark` and `runs.answering` (answers, bad items and exit codes follow their rules): a query entry that is malformed,
has an id breaking the id rule (`headlab.ids.example_id`) or without an annotation of its kind, or whose image is
missing, is listed and left out; a query whose answer fails is listed per kind and condition; a metric over
zero answers is None (n/a).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from headlab.datasets.pope import PopeQuestion
from headlab.datasets.records import read_records
from headlab.errors import InputError
from headlab.ids import example_id
from headlab.reports.benchmark import (
    BATCH_SIZE,
    GEN_TOKENS,
    IMAGES,
    INTERVENTIONS,
    MAX_NEW_TOKENS,
    MODEL,
    VAR_TAU,
    Answered,
    answer,
    begin,
    bootstrap_intervals,
    condition_lines,
    flipped_thumbnails,
    fmt_ci,
    paired_bootstrap,
    problems_section,
    ratio,
    start_document,
)
from headlab.reports.document import Document, Thumbnail
from headlab.reports.output import minus, synthetic_data, write_report_files
from headlab.reports.registry import Report, ReportOption, ReportResult, out_option
from headlab.runs.answering import CONDITIONS, Split
from headlab.runs.answers import AnswerLog
from headlab.runs.outcome import Progress

AMBER_GEN, AMBER_DIS = "generative", "discriminative"
AMBER_FILES = ("annotations.json", "relation.json", "safe_words.txt")


def write_amber_benchmark(
    folder: str | Path, n_images: int = 20, *, seed: int = 1234, size: int = 32
) -> Path:
    """A synthetic AMBER release: per scene one generative entry (truth = its objects, hallu = the absent
    partners of its objects) and two existence questions (a present object, yes; an absent one, no)."""
    from headlab.datasets import scenes
    from headlab.models.llava import CAPTION_PROMPT

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
    path: Path, images: Path, known: Mapping[int | str, object], n: int | None, name: str
) -> Split:
    """A query file as a `Split` of questions (label "" : the truth lives in annotations.json); queries whose id
    has no annotation of the right kind, malformed entries and missing images are listed and left out."""
    split = Split(name, path, images, [])
    if not path.is_file():
        split.problems.append(f"{path} does not exist: no {name} queries")
        return split
    records = read_records(path)
    split.problems += records.problems
    for index, obj in records.items:
        where = f"{path.name}[{index}]"
        image, query = obj.get("image"), obj.get("query")
        try:
            qid = example_id(obj.get("id"))
        except InputError as err:
            split.problems.append(f"{where}: {err}")
            continue
        if not isinstance(image, str) or not isinstance(query, str):
            split.problems.append(f"{where}: needs an image (a file name) and a query (text)")
        elif qid not in known:
            split.problems.append(f"{where}: id {qid!r} has no {name} entry in annotations.json")
        elif n is not None and len(split.questions) >= n:
            break
        else:
            split.add(PopeQuestion(qid, image, query, ""), where)
    return split


def _positive_no(truth: str, response: str) -> str:
    """AMBER's "No"-positive view for the bootstrap's F1: "yes" = predicted No (invalid = not No)."""
    return "yes" if response == "No" else "no"


def _amber_correct(truth: str, response: str) -> str:
    right = response.lower() == truth and response in ("Yes", "No")
    return truth if right else ("no" if truth == "yes" else "yes")


def generative_intervals(score) -> dict[str, list[float] | None]:
    """Bootstrap 95% intervals of CHAIR, Cover, Hal and Cog over the scored responses of `score` (an
    `AmberGenerativeScore`: each metric is a ratio of per-response sums)."""
    details = score.per_response
    columns = {
        "nouns": [len(d.nouns) for d in details],
        "hallucinated": [len(d.hallucinated) for d in details],
        "has_hallucination": [float(bool(d.hallucinated)) for d in details],
        "covered": [len(d.covered) for d in details],
        "truth": [d.n_truth for d in details],
        "mentioned_hallu": [len(d.mentioned_hallu) for d in details],
        "hallu": [d.n_hallu for d in details],
        "responses": [1.0] * len(details),
    }
    statistics = {
        "chair": lambda s: ratio(s["hallucinated"], s["nouns"]),
        "cover": lambda s: ratio(s["covered"], s["truth"]),
        "hal": lambda s: s["has_hallucination"] / s["responses"],
        "cog": lambda s: ratio(s["mentioned_hallu"], s["hallu"]),
    }
    return bootstrap_intervals(columns, statistics)


def _amber_metrics(conditions, splits, log: AnswerLog, files: dict) -> tuple[dict, dict]:
    """Per condition: the generative scores (with their intervals under "intervals"), the discriminative
    ones and the AMBER score; and the normalised discriminative responses per condition."""
    from headlab.datasets.amber import (
        amber_score,
        normalize_yes_no,
        score_amber_discriminative,
        score_amber_generative,
    )

    gen_ids = [q.question_id for q in splits[AMBER_GEN].questions]
    dis_ids = [q.question_id for q in splits[AMBER_DIS].questions]
    metrics, responses = {}, {}
    for c in conditions:
        g = log.get(c, AMBER_GEN)
        gen = score_amber_generative(
            {i: g[i] for i in gen_ids if i in g}, files["objects"], files["relations"], files["safe"]
        )
        d = log.get(c, AMBER_DIS)
        responses[c] = {i: normalize_yes_no(d[i]) for i in dis_ids if i in d}
        dis = score_amber_discriminative(files["questions"], responses[c])
        entry = {k: v for k, v in asdict(gen).items() if k not in ("per_response", "problems")}
        entry["intervals"] = generative_intervals(gen)
        entry["discriminative"] = {k: asdict(v) for k, v in dis.items()}
        f1 = dis["overall"].f1
        entry["amber_score"] = None if gen.chair is None or f1 is None else amber_score(gen.chair, f1)
        metrics[c] = entry
    return metrics, responses


def _amber_vs_none(c: str, metrics, responses, splits, files, log: AnswerLog) -> dict:
    dis_ids = [q.question_id for q in splits[AMBER_DIS].questions]
    both = [i for i in dis_ids if i in responses["none"] and i in responses[c]]
    truth = [files["questions"][i].truth for i in both]
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
    m0, m1 = metrics["none"], metrics[c]
    diff = {k: minus(m1[k], m0[k]) for k in ("chair", "cover", "hal", "cog", "amber_score")}
    flips = [
        {
            "id": i,
            "image": q.image,
            "query": q.text,
            "truth": files["questions"][i].truth,
            "before": log.get("none", AMBER_DIS)[i],
        }
        | {"after": log.get(c, AMBER_DIS)[i]}
        for q in splits[AMBER_DIS].questions
        if (i := q.question_id) in both and responses["none"][i] != responses[c][i]
    ]
    return {"accuracy": acc, "f1": f1, **diff, "flipped": flips}


def build_amber_report(
    ans: Answered, data: Path, splits: dict, files: dict, annotation_problems: list[str], **extra
) -> dict:
    conditions, log = ans.conditions, ans.log
    report = ans.head() | {"benchmark": "amber", "data": str(data)}
    report |= {
        "n_generative": len(splits[AMBER_GEN].questions),
        "n_discriminative": len(splits[AMBER_DIS].questions),
    }
    report["problems"] |= {f"{k}_queries": s.problems + s.missing_images for k, s in splits.items()}
    report["problems"] |= {"annotations": annotation_problems}
    report["problems"] |= {
        f"{k}_failed": [f"{c}: {p}" for c, ps in ans.run.failures(k).items() for p in ps] for k in splits
    }
    report |= extra
    report["metrics"], responses = _amber_metrics(conditions, splits, log, files)
    report["vs_none"] = {
        c: _amber_vs_none(c, report["metrics"], responses, splits, files, log) for c in conditions[1:]
    }
    report["examples"] = [
        {"id": q.question_id, "image": q.image, "query": q.text}
        | {c: log.get(c, kind).get(q.question_id, "") for c in conditions}
        for kind in (AMBER_GEN, AMBER_DIS)
        for q in splits[kind].questions[:6]
    ]
    bad = len(annotation_problems) + sum(len(s.problems) + len(s.missing_images) for s in splits.values())
    report["outcome"] = ans.outcome(list(splits.values()), bad)
    return report


AMBER_GEN_KEYS = ("chair", "cover", "hal", "cog", "n_responses", "n_invalid")
AMBER_DIS_KEYS = ("n", "accuracy", "precision", "recall", "f1", "invalid")
AMBER_DIFF_HEADERS = (
    "Δ accuracy",
    "Δ F1 (No positive)",
    "Δ CHAIR",
    "Δ Cover",
    "Δ Hal",
    "Δ Cog",
    "Δ AMBER score",
)


def _amber_problems(report: Mapping) -> list[str]:
    """Every problem but the answer log's (which `problems_section` puts first)."""
    return [p for key, ps in report["problems"].items() if key != "answers_file" for p in ps]


def _amber_tables(report: Mapping):
    gen = [[c, *(m[k] for k in AMBER_GEN_KEYS), m["amber_score"]] for c, m in report["metrics"].items()]
    dis = [
        [c, dim, *(s[k] for k in AMBER_DIS_KEYS)]
        for c, m in report["metrics"].items()
        for dim, s in m["discriminative"].items()
    ]
    diff_keys = ("chair", "cover", "hal", "cog", "amber_score")
    diff = [
        [c, fmt_ci(d["accuracy"]), fmt_ci(d["f1"]), *(d[k] for k in diff_keys), len(d["flipped"])]
        for c, d in report["vs_none"].items()
    ]
    return (
        (["condition", *AMBER_GEN_KEYS, "AMBER score"], gen),
        (["condition", "dimension", *AMBER_DIS_KEYS], dis),
        (["condition", *AMBER_DIFF_HEADERS, "flipped"], diff),
    )


def document(report: Mapping, thumbs: Mapping[str, str | None] | None = None) -> Document:
    """The report's document; `thumbs`: {image: thumbnail} of the flipped discriminative answers."""
    from headlab.reports.figures import grouped_bars

    doc = start_document("AMBER report", report)
    (gh, gr), (dh, dr), (xh, xr) = _amber_tables(report)
    doc.heading("Generative (fractions; AMBER score = (1 - CHAIR + F1) / 2)")
    doc.table(gh, gr)
    doc.heading("Discriminative (No positive)")
    doc.table(dh, dr)
    doc.heading("Difference vs none (bootstrap 95% CI over the discriminative questions, paired)")
    doc.table(xh, xr)
    keys = ("chair", "cover", "hal", "cog")
    intervals = {c: m.get("intervals", {}) for c, m in report["metrics"].items()}
    title = "AMBER generative (error bars: bootstrap 95% interval over responses)"
    fig = grouped_bars(report["metrics"], intervals, keys, title=title, yaxis_range=[0, 1], height=340)
    doc.figure(fig)
    doc.heading("Example answers")
    ex = ("id", "image", "query", *report["conditions"])
    doc.table(ex, [[e[k] for k in ex] for e in report["examples"]])
    doc.heading("Flipped discriminative answers")
    fk = ("id", "image", "query", "truth", "before", "after")
    for c, d in report["vs_none"].items():
        doc.heading(f"none -> {c} ({len(d['flipped'])})", level=3)
        if not d["flipped"]:
            doc.paragraph("No answer changed.")
            continue
        rows = [
            {**f, "image": Thumbnail(str(f["image"]), (thumbs or {}).get(f["image"]))} for f in d["flipped"]
        ]
        doc.table(fk, [[f[k] for k in fk] for f in rows])
    problems_section(doc, report, _amber_problems(report))
    return doc


def _amber_files(data: Path) -> tuple[dict, list[str]]:
    """The scoring files of an AMBER folder, and the annotation problems (listed, not fatal)."""
    from headlab.datasets.amber import (
        load_amber_annotations,
        load_amber_generative,
        load_amber_relations,
        load_safe_words,
    )

    missing = [f for f in AMBER_FILES if not (data / f).is_file()]
    if missing:
        raise InputError(f"AMBER folder {data} lacks {missing} (the release's data/ layout)")
    questions, dis_problems = load_amber_annotations(data / "annotations.json")
    objects, gen_problems = load_amber_generative(data / "annotations.json")
    files = {"questions": questions, "objects": objects}
    files |= {
        "relations": load_amber_relations(data / "relation.json"),
        "safe": load_safe_words(data / "safe_words.txt"),
    }
    return files, sorted(set(dis_problems + gen_problems))


def amber_report(
    out: Path,
    *,
    model: str | None = None,
    data: Path | None = None,
    images: Path | None = None,
    conditions: Sequence[str] = CONDITIONS,
    n: int | None = None,
    max_new_tokens: int = 4,
    gen_tokens: int = 16,
    var_tau: float = 20.0,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> ReportResult:
    """Answer, score and write the AMBER report; `n` = first N queries of each kind; `model` as in
    `pope_report`."""
    out, conditions = begin(
        REPORT,
        out,
        conditions,
        images=images,
        n=n,
        max_new_tokens=max_new_tokens,
        gen_tokens=gen_tokens,
        var_tau=var_tau,
        batch_size=batch_size,
    )
    data = Path(data) if data is not None else synthetic_data(out / "data", write_amber_benchmark)
    files, annotation_problems = _amber_files(data)
    folder = images if images is not None else data / "image"
    splits = {
        AMBER_GEN: load_amber_queries(
            data / "query" / "query_generative.json", folder, files["objects"], n, AMBER_GEN
        ),
        AMBER_DIS: load_amber_queries(
            data / "query" / "query_discriminative.json", folder, files["questions"], n, AMBER_DIS
        ),
    }
    groups = [([splits[AMBER_GEN]], gen_tokens), ([splits[AMBER_DIS]], max_new_tokens)]
    ans = answer(
        out, model, "AMBER", conditions, groups, var_tau=var_tau, progress=progress, batch_size=batch_size
    )
    report = build_amber_report(
        ans,
        data,
        splits,
        files,
        annotation_problems,
        max_new_tokens=max_new_tokens,
        gen_tokens=gen_tokens,
        n_per_kind=n,
    )
    thumbs = flipped_thumbnails([splits[AMBER_DIS]], {AMBER_DIS: {"vs_none": report["vs_none"]}})
    doc = document(report, thumbs[AMBER_DIS])
    return ReportResult(write_report_files(out, report, doc), report, ans.run)


def summary(result: ReportResult, out: Path) -> list[str]:
    metrics = {"CHAIR": "chair", "Cover": "cover", "Hal": "hal", "Cog": "cog", "AMBER score": "amber_score"}
    lines = condition_lines(result, out, metrics)
    bad = sum(len(p) for p in result.report["problems"].values())
    return lines + ([f"  {bad} problems: see the report"] if bad else [])


REPORT = Report(
    name="amber",
    help="AMBER: CHAIR / Cover / Hal / Cog, discriminative accuracy / F1 and the AMBER score, resumable.",
    options=(
        out_option("answers.jsonl, report.json/.md/.html"),
        MODEL,
        ReportOption(
            name="data",
            type=Path,
            help="AMBER data folder: annotations.json, relation.json, safe_words.txt, query/query_*.json "
            "(default: synthetic in OUT/data)",
        ),
        replace(IMAGES, help="image folder (default: DATA/image)"),
        INTERVENTIONS,
        ReportOption(
            name="n", type=int, ge=1, aliases=("--first",), help="first N queries of each kind (default: all)"
        ),
        replace(MAX_NEW_TOKENS, help="greedy tokens per yes/no answer"),
        GEN_TOKENS,
        VAR_TAU,
        BATCH_SIZE,
    ),
    run=amber_report,
    summary=summary,
)
