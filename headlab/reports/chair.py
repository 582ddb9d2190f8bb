"""`headlab report chair`: CHAIR (Rohrbach et al., 2018) on generated image descriptions, per condition.

Data folder (`--data DIR`): `synonyms.txt` (one object per line, its synonyms after commas: the CHAIR
vocabulary), `truth.json` ({image_id: [objects in the image]}, words from the vocabulary) and `images.json`
([{image_id, image}], the images to describe, found in `--images` or `DIR/images`). For COCO, build these
from the instance/caption annotations and the CHAIR synonym list (see README). Without `--data`, a
synthetic set in this format is written from `headlab.datasets.scenes` (test scenes with partner rate 0.5;
truth = the scene's objects).

Each image is described ("Describe the image.", greedy, `gen_tokens` tokens) under each condition (none /
vhr / var, as the POPE report), answers appended to `answers.jsonl` (a rerun resumes), then scored with
`headlab.datasets.chair.score_chair`: CHAIR_s (captions with a hallucinated object), CHAIR_i (hallucinated
mentions / mentions), recall, length. Differences from `none` come with a paired bootstrap 95% CI over
images for CHAIR_s (per-caption indicator) and as plain differences for the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headlab.datasets import chair, scenes
from headlab.datasets.pope import PopeQuestion
from headlab.errors import InputError
from headlab.reports.html import Page
from headlab.reports.lvlm import BOOTSTRAP, LvlmReportResult, _md_table, _write
from headlab.reports.pope import (
    ANSWERS,
    AnswerLog,
    Progress,
    Split,
    answer_all,
    check_options,
    condition_interventions,
    load_lvlm,
)
from headlab.zoo.llava import CAPTION_PROMPT

FILES = ("synonyms.txt", "truth.json", "images.json")
SPLIT = "chair"
KEYS = ("captions", "chair_s", "chair_i", "recall", "length")


def write_chair_benchmark(
    folder: str | Path, n_images: int = 40, *, seed: int = 4321, size: int = 32
) -> Path:
    """A synthetic CHAIR set in the format above, from scenes (objects = the scene categories)."""
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
    truth = chair.load_truth(data / "truth.json", vocab)
    folder = images if images is not None else data / "images"
    split = Split(SPLIT, data / "images.json", folder, [])
    try:
        entries = json.loads((data / "images.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{data / 'images.json'} is not valid JSON: {err}") from err
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("image_id"), int)
            and isinstance(entry.get("image"), str)
        )
        if not ok or entry["image_id"] not in truth:
            split.problems.append(
                f"images.json entry {i} ({json.dumps(entry)[:120]}): needs an integer image_id with ground "
                "truth and an image name"
            )
            continue
        if n is not None and len(split.questions) >= n:
            break
        if not (folder / entry["image"]).is_file():
            split.missing_images.append(f"image {entry['image_id']}: {folder / entry['image']}")
            continue
        split.questions.append(PopeQuestion(entry["image_id"], entry["image"], CAPTION_PROMPT, ""))
    return split, vocab, truth


def _bootstrap_chair_s(before: np.ndarray, after: np.ndarray) -> dict:
    """Paired bootstrap over images of the CHAIR_s difference (after - before), 95% interval."""
    rng = np.random.default_rng(BOOTSTRAP["seed"])
    idx = rng.integers(0, len(before), size=(BOOTSTRAP["resamples"], len(before)))
    deltas = after[idx].mean(1) - before[idx].mean(1)
    low, high = np.quantile(deltas, [0.025, 0.975])
    return {"delta": float(after.mean() - before.mean()), "ci_low": float(low), "ci_high": float(high)}


def build_chair_report(
    model, split, vocab, truth, conditions, log, n_layers, *, var_tau, gen_tokens, interrupted
):
    ids = [q.question_id for q in split.questions]
    metrics, hallucinated, examples = {}, {}, {}
    for condition in conditions:
        answers = log.get(condition, SPLIT)
        captions = {i: answers[i] for i in ids if i in answers}
        if not captions:
            continue
        score = chair.score_chair(captions, truth, vocab)
        metrics[condition] = {k: getattr(score, k) for k in KEYS}
        hallucinated[condition] = {
            i: [w for w in chair.mentions(c, vocab)[0] if w not in truth[i]] for i, c in captions.items()
        }
        examples[condition] = [
            {"image_id": i, "caption": captions[i], "hallucinated": hallucinated[condition][i]}
            for i in ids[:8]
            if i in captions
        ]
    differences = {}
    if "none" in metrics:
        for condition in [c for c in metrics if c != "none"]:
            shared = [i for i in ids if i in hallucinated["none"] and i in hallucinated[condition]]
            before = np.array([bool(hallucinated["none"][i]) for i in shared], dtype=float)
            after = np.array([bool(hallucinated[condition][i]) for i in shared], dtype=float)
            differences[condition] = {
                "chair_s": _bootstrap_chair_s(before, after),
                **{k: metrics[condition][k] - metrics["none"][k] for k in ("chair_i", "recall", "length")},
            }
    notes = {c: condition_interventions(c, n_layers, var_tau=var_tau)[1] for c in conditions}
    return {
        "benchmark": "CHAIR",
        "model": model,
        "conditions": notes,
        "metrics": metrics,
        "differences": differences,
        "examples": examples,
        "gen_tokens": gen_tokens,
        "images": len(ids),
        "problems": split.problems + split.missing_images + log.problems,
        "bootstrap": BOOTSTRAP,
        "interrupted": interrupted,
    }


def render_chair_markdown(report) -> str:
    lines = [f"# CHAIR report: {report['model']}", ""]
    lines += _md_table(
        ["condition", *KEYS], [[c, *(m[k] for k in KEYS)] for c, m in report["metrics"].items()]
    )
    for c, d in report["differences"].items():
        s = d["chair_s"]
        lines.append(
            f"- {c} - none: CHAIR_s {s['delta']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}], "
            f"CHAIR_i {d['chair_i']:+.3f}, recall {d['recall']:+.3f}"
        )
    lines += ["", f"Problems ({len(report['problems'])}):", *[f"- {p}" for p in report["problems"]]]
    return "\n".join(lines) + "\n"


def render_chair_html(report) -> str:
    import plotly.graph_objects as go

    page = Page(f"CHAIR report: {report['model']}")
    page.bullets([f"{c}: {note}" for c, note in report["conditions"].items()])
    page.heading("Metrics")
    page.table(["condition", *KEYS], [[c, *(m[k] for k in KEYS)] for c, m in report["metrics"].items()])
    if report["differences"]:
        page.heading("Differences from none")
        page.table(
            ["condition", "CHAIR_s (95% CI)", "CHAIR_i", "recall", "length"],
            [
                [
                    c,
                    f"{d['chair_s']['delta']:+.3f} [{d['chair_s']['ci_low']:+.3f}, {d['chair_s']['ci_high']:+.3f}]",
                    d["chair_i"],
                    d["recall"],
                    d["length"],
                ]
                for c, d in report["differences"].items()
            ],
        )
    fig = go.Figure(
        [
            go.Bar(x=list(report["metrics"]), y=[m[k] for m in report["metrics"].values()], name=k)
            for k in ("chair_s", "chair_i", "recall")
        ]
    )
    fig.update_layout(barmode="group", title="CHAIR per condition")
    page.figure(fig)
    for c, rows in report["examples"].items():
        page.heading(f"Example captions: {c}", 3)
        page.table(
            ["image", "caption", "hallucinated"],
            [[r["image_id"], r["caption"], ", ".join(r["hallucinated"])] for r in rows],
        )
    page.heading(f"Problems ({len(report['problems'])})")
    page.bullets(report["problems"])
    return page.render()


def chair_report(
    out: Path,
    *,
    model: str = "zoo:llava",
    data: Path | None = None,
    images: Path | None = None,
    conditions: Sequence[str] = ("none", "vhr", "var"),
    n: int | None = None,
    gen_tokens: int = 16,
    var_tau: float = 20.0,
    progress: Progress | None = None,
) -> LvlmReportResult:
    """Describe, score and write the CHAIR report; `n` = the first N images."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    conditions = check_options(n, gen_tokens, conditions)
    if data is None:
        data = out / "data"
        if not (data / "truth.json").is_file():
            write_chair_benchmark(data)
    split, vocab, truth = load_chair_split(Path(data), images, n)
    lm = load_lvlm(model, "CHAIR")
    log = AnswerLog(out / ANSWERS, model)
    run = answer_all(
        lm, [split], conditions, log, max_new_tokens=gen_tokens, var_tau=var_tau, progress=progress
    )
    report = build_chair_report(
        model,
        split,
        vocab,
        truth,
        conditions,
        log,
        lm.tower("lm").n_layers,
        var_tau=var_tau,
        gen_tokens=gen_tokens,
        interrupted=run.interrupted,
    )
    html = _write(out, report, render_chair_markdown(report), render_chair_html(report))
    return LvlmReportResult(html, report, run)
