"""`headlab report chair`: CHAIR (Rohrbach et al., 2018) on generated image descriptions, per condition.

Data folder (`--data DIR`): `synonyms.txt` (one object per line, its synonyms after commas: the CHAIR
vocabulary), `truth.json` ({image_id: [objects in the image]}, words from the vocabulary) and `images.json`
([{image_id, image}], the images to describe, found in `--images` or `DIR/images`). For COCO, build these
from the instance/caption annotations and the CHAIR synonym list (see README). Without `--data`, a
synthetic set in this format is written from `headlab.datasets.scenes` (test scenes with partner rate 0.5;
truth = the scene's objects).

Each image is described ("Describe the image.", greedy, `gen_tokens` tokens) under each condition (none /
vhr / var, `runs.answering`), answers appended to `answers.jsonl` (a rerun resumes), then scored with
`headlab.datasets.chair.score_chair`: CHAIR_s (captions with a hallucinated object), CHAIR_i (hallucinated
mentions / mentions), recall, length. Differences from `none` come with a paired bootstrap 95% CI over
images for CHAIR_s (per-caption indicator) and as plain differences for the rest; each condition's CHAIR_s,
CHAIR_i and recall get a bootstrap 95% interval over its captions (the error bars of the chart).

Built on `reports.benchmark` and `runs.answering` (answers, bad items and exit codes follow their rules): an images.json entry that is
malformed, has an id breaking the id rule (`headlab.ids.example_id`), has no usable ground truth (a truth.json
entry that is not a list of vocabulary words is listed, not fatal) or whose image is missing, is listed and
left out; an image whose description fails is listed per condition; with no description a metric is None.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from headlab.datasets import chair
from headlab.datasets.pope import PopeQuestion
from headlab.datasets.records import read_records
from headlab.errors import InputError
from headlab.ids import example_id
from headlab.reports.benchmark import (
    BATCH_SIZE,
    BOOTSTRAP,
    GEN_TOKENS,
    IMAGES,
    INTERVENTIONS,
    MODEL,
    VAR_TAU,
    Answered,
    answer,
    begin,
    bootstrap_intervals,
    condition_lines,
    fmt_ci,
    problems_section,
    ratio,
    split_problems,
    start_document,
)
from headlab.reports.document import Document
from headlab.reports.output import minus, synthetic_data, write_report_files
from headlab.reports.registry import Report, ReportOption, ReportResult, out_option
from headlab.runs.answering import CONDITIONS, Split
from headlab.runs.answers import AnswerLog
from headlab.runs.outcome import Progress

if TYPE_CHECKING:
    import numpy as np

FILES = ("synonyms.txt", "truth.json", "images.json")
SPLIT = "chair"
KEYS = ("captions", "chair_s", "chair_i", "recall", "length")


def write_chair_benchmark(
    folder: str | Path, n_images: int = 40, *, seed: int = 4321, size: int = 32
) -> Path:
    """A synthetic CHAIR set in the format above, from scenes (objects = the scene categories)."""
    from headlab.datasets import scenes

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    made = scenes.make_scenes(n_images, prior=0.5, seed=seed, start_id=300_000)
    for s in made:
        scenes.render(s, size=size).save(folder / "images" / s.filename)
    (folder / "synonyms.txt").write_text("\n".join(sorted(scenes.CATEGORIES)) + "\n")
    (folder / "truth.json").write_text(json.dumps({str(s.image_id): list(s.objects) for s in made}, indent=1))
    images = [{"image_id": s.image_id, "image": s.filename} for s in made]
    (folder / "images.json").write_text(json.dumps(images, indent=1))
    return folder


def load_chair_split(data: Path, images: Path | None, n: int | None) -> tuple[Split, chair.Vocabulary, dict]:
    missing = [f for f in FILES if not (data / f).is_file()]
    if missing:
        raise InputError(f"CHAIR folder {data} lacks {missing} (synonyms.txt, truth.json, images.json)")
    vocab = chair.Vocabulary.from_file(data / "synonyms.txt")
    from headlab.models.llava import CAPTION_PROMPT

    split = Split(SPLIT, data / "images.json", images if images is not None else data / "images", [])
    truth = chair.load_truth(data / "truth.json", vocab, problems=split.problems)
    records = read_records(data / "images.json")
    split.problems += records.problems
    for index, entry in records.items:
        where = f"images.json[{index}]"
        try:
            image_id = example_id(entry.get("image_id"))
        except InputError as err:
            split.problems.append(f"{where}: image_id: {err}")
            continue
        if not isinstance(entry.get("image"), str) or not entry["image"]:
            split.problems.append(f"{where}: image {image_id!r} needs an image file name")
            continue
        if image_id not in truth:
            split.problems.append(
                f"{where}: image {image_id!r} ({entry['image']}) has no ground truth in truth.json"
            )
            continue
        if n is not None and len(split.questions) >= n:
            break
        split.add(PopeQuestion(image_id, entry["image"], CAPTION_PROMPT, ""), f"{where}: image {image_id!r}")
    return split, vocab, truth


def _bootstrap_chair_s(before: np.ndarray, after: np.ndarray) -> dict:
    """Paired bootstrap over images of the CHAIR_s difference (after - before), 95% interval; None (n/a)
    without an image described under both conditions."""
    import numpy as np

    if not len(before):
        return {"delta": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(BOOTSTRAP["seed"])
    idx = rng.integers(0, len(before), size=(BOOTSTRAP["resamples"], len(before)))
    deltas = after[idx].mean(1) - before[idx].mean(1)
    low, high = np.quantile(deltas, [0.025, 0.975])
    return {"delta": float(after.mean() - before.mean()), "ci_low": float(low), "ci_high": float(high)}


def chair_intervals(captions: dict, truth, vocab) -> dict[str, list[float] | None]:
    """Bootstrap 95% intervals of CHAIR_s, CHAIR_i and recall over `captions` (as `score_chair` counts)."""
    columns: dict[str, list[float]] = {
        k: [] for k in ("bad", "hallucinated", "mentions", "recalled", "truth")
    }
    for image_id, caption in captions.items():
        nodes, _ = chair.mentions(caption, vocab)
        bad = [n for n in nodes if n not in truth[image_id]]
        columns["bad"].append(float(bool(bad)))
        columns["hallucinated"].append(len(bad))
        columns["mentions"].append(len(nodes))
        columns["recalled"].append(len(truth[image_id] & set(nodes)))
        columns["truth"].append(len(truth[image_id]))
    columns["captions"] = [1.0] * len(captions)
    statistics = {
        "chair_s": lambda s: s["bad"] / s["captions"],
        "chair_i": lambda s: ratio(s["hallucinated"], s["mentions"]),
        "recall": lambda s: ratio(s["recalled"], s["truth"]),
    }
    return bootstrap_intervals(columns, statistics)


def _chair_metrics(split, vocab, truth, conditions, log: AnswerLog) -> tuple[dict, dict, dict]:
    """Per condition: the CHAIR metrics (with their intervals under "intervals"), the hallucinated objects
    per image, and example captions."""
    ids = [q.question_id for q in split.questions]
    metrics, hallucinated, examples = {}, {}, {}
    for condition in conditions:
        answers = log.get(condition, SPLIT)
        captions = {i: answers[i] for i in ids if i in answers}
        score = chair.score_chair(captions, truth, vocab)
        metrics[condition] = {k: getattr(score, k) for k in KEYS}
        metrics[condition]["intervals"] = chair_intervals(captions, truth, vocab)
        hallucinated[condition] = {
            i: [w for w in chair.mentions(c, vocab)[0] if w not in truth[i]] for i, c in captions.items()
        }
        examples[condition] = [
            {"image_id": i, "caption": captions[i], "hallucinated": hallucinated[condition][i]}
            for i in ids[:8]
            if i in captions
        ]
    return metrics, hallucinated, examples


def build_chair_report(ans: Answered, split: Split, vocab, truth, *, gen_tokens: int) -> dict:
    import numpy as np

    conditions = ans.conditions
    metrics, hallucinated, examples = _chair_metrics(split, vocab, truth, conditions, ans.log)
    ids = [q.question_id for q in split.questions]
    differences = {}
    for condition in conditions[1:]:
        shared = [i for i in ids if i in hallucinated["none"] and i in hallucinated[condition]]
        before = np.array([bool(hallucinated["none"][i]) for i in shared], dtype=float)
        after = np.array([bool(hallucinated[condition][i]) for i in shared], dtype=float)
        differences[condition] = {
            "chair_s": _bootstrap_chair_s(before, after),
            **{k: minus(metrics[condition][k], metrics["none"][k]) for k in ("chair_i", "recall", "length")},
        }
    splits = {SPLIT: {"malformed_lines": split.problems, "missing_images": split.missing_images}}
    splits[SPLIT]["failed"] = ans.run.failures(SPLIT)
    report = ans.head() | {"benchmark": "CHAIR", "metrics": metrics, "differences": differences}
    report |= {"examples": examples, "gen_tokens": gen_tokens, "images": len(ids)}
    report["problems"]["images"] = split_problems(splits)
    report["outcome"] = ans.outcome([split], len(split.problems) + len(split.missing_images))
    return report


def document(report) -> Document:
    from headlab.reports.figures import grouped_bars

    doc = start_document("CHAIR report", report, what="images")
    doc.heading("Metrics")
    doc.table(["condition", *KEYS], [[c, *(m[k] for k in KEYS)] for c, m in report["metrics"].items()])
    if report["differences"]:
        doc.heading("Differences from none")
        doc.table(
            ["condition", "CHAIR_s (95% CI)", "CHAIR_i", "recall", "length"],
            [
                [c, fmt_ci(d["chair_s"]), d["chair_i"], d["recall"], d["length"]]
                for c, d in report["differences"].items()
            ],
        )
    intervals = {c: m.get("intervals", {}) for c, m in report["metrics"].items()}
    title = "CHAIR per condition (error bars: bootstrap 95% interval over captions)"
    fig = grouped_bars(report["metrics"], intervals, ("chair_s", "chair_i", "recall"), title=title)
    fig.update_layout(yaxis_range=[0, 1])
    doc.figure(fig)
    for c, rows in report["examples"].items():
        doc.heading(f"Example captions: {c}", 3)
        doc.table(
            ["image", "caption", "hallucinated"],
            [[r["image_id"], r["caption"], ", ".join(r["hallucinated"])] for r in rows],
        )
    problems_section(doc, report, report["problems"]["images"])
    return doc


def chair_report(
    out: Path,
    *,
    model: str | None = None,
    data: Path | None = None,
    images: Path | None = None,
    conditions: Sequence[str] = CONDITIONS,
    n: int | None = None,
    gen_tokens: int = 16,
    var_tau: float = 20.0,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> ReportResult:
    """Describe, score and write the CHAIR report; `n` = the first N images; `model` as in `pope_report`."""
    out, conditions = begin(
        REPORT,
        out,
        conditions,
        images=images,
        n=n,
        gen_tokens=gen_tokens,
        var_tau=var_tau,
        batch_size=batch_size,
    )
    data = Path(data) if data is not None else synthetic_data(out / "data", write_chair_benchmark)
    split, vocab, truth = load_chair_split(data, images, n)
    ans = answer(
        out,
        model,
        "CHAIR",
        conditions,
        [([split], gen_tokens)],
        var_tau=var_tau,
        progress=progress,
        batch_size=batch_size,
    )
    report = build_chair_report(ans, split, vocab, truth, gen_tokens=gen_tokens)
    return ReportResult(write_report_files(out, report, document(report)), report, ans.run)


def summary(result: ReportResult, out: Path) -> list[str]:
    return condition_lines(result, out, {"CHAIR_s": "chair_s", "CHAIR_i": "chair_i", "recall": "recall"})


REPORT = Report(
    name="chair",
    help="CHAIR on generated descriptions: CHAIR_s, CHAIR_i, recall, length per condition, resumable.",
    options=(
        out_option("answers.jsonl, report.json/.md/.html"),
        MODEL,
        ReportOption(
            name="data",
            type=Path,
            help="CHAIR folder: synonyms.txt, truth.json, images.json (default: synthetic in OUT/data)",
        ),
        replace(IMAGES, help="image folder (default: DATA/images)"),
        INTERVENTIONS,
        ReportOption(name="n", type=int, ge=1, aliases=("--first",), help="first N images (default: all)"),
        GEN_TOKENS,
        VAR_TAU,
        BATCH_SIZE,
    ),
    run=chair_report,
    summary=summary,
)
