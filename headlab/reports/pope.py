"""POPE report: greedy yes/no answers of an LVLM per split file and intervention condition, scored with the
official metrics, with the paired difference each intervention makes and the answers it flipped.

Conditions: "none" (the plain model), "vhr" (`VHR()`, paper defaults) and "var" (`VAR(tau=...)`; models
whose default VAR range 2..L-2 is empty, i.e. with at most 3 language layers, get layers (0, 1) and the
report says so). Prompts use the LLaVA-1.5 format with POPE's usual suffix-free question.

Answers are appended to `answers.jsonl` in the output folder as they come, one line per (condition, split,
question_id) with the raw text, so a rerun skips what is there and Ctrl-C keeps everything answered so far.
Malformed question lines (`load_pope` problems), missing images and malformed answer lines are counted and
listed, never fatal. Differences vs "none" come with a bootstrap 95% confidence interval over the questions
answered under both conditions (paired resampling, fixed seed). Outputs: report.json (every number),
report.md (tables) and report.html (self-contained: tables, a bar chart per split, flipped examples).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab.datasets.pope import PopeFile, PopeQuestion, load_pope, parse_answer, score_pope
from headlab.errors import HeadlabError, InputError

CONDITIONS = ("none", "vhr", "var")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
ANSWERS = "answers.jsonl"
Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> tick; see `answer_all`


@dataclass
class Split:
    """One POPE question file: its questions (the first `n` valid ones) and what was wrong in it."""

    name: str
    path: Path
    images: Path
    questions: list[PopeQuestion]
    problems: list[str] = field(default_factory=list)  # malformed lines
    missing_images: list[str] = field(default_factory=list)  # questions skipped: image not found


def load_splits(data: Sequence[Path], images: Path | None, n: int | None) -> list[Split]:
    """The split files (named after their file stem); images are looked up in `images`, else in an
    `images` folder beside each file. Questions whose image is missing are left out and listed."""
    splits, names = [], set()
    for path in map(Path, data):
        if not path.is_file():
            raise InputError(f"POPE file {path} does not exist")
        if path.stem in names:
            raise InputError(f"two POPE files are named {path.stem!r}; give the splits distinct file names")
        names.add(path.stem)
        pope: PopeFile = load_pope(path)
        folder = images if images is not None else path.parent / "images"
        split = Split(path.stem, path, folder, [], list(pope.problems))
        for q in pope.questions:
            if n is not None and len(split.questions) >= n:
                break
            if (folder / q.image).is_file():
                split.questions.append(q)
            else:
                split.missing_images.append(f"{path.name}: question {q.question_id}: {folder / q.image}")
        splits.append(split)
    return splits


# ------------------------------------------------------------------------------------------ conditions


def condition_interventions(name: str, n_layers: int, *, var_tau: float = 20.0) -> tuple[tuple, str]:
    """The interventions of a condition for a language model of `n_layers` layers, and a note on them."""
    from headlab.interventions import VAR, VHR

    if name == "none":
        return (), "the plain model"
    if name == "vhr":
        return (VHR(),), "VHR(), paper defaults (alpha 2)"
    if name == "var":
        if len(range(2, n_layers - 1)) == 0:
            note = (
                f"VAR(tau={var_tau}, layers=(0, 1)): the default range 2..L-2 is empty for a "
                f"{n_layers}-layer language model, so layers 0 and 1 are used"
            )
            return (VAR(tau=var_tau, layers=(0, 1)),), note
        return (VAR(tau=var_tau),), f"VAR(tau={var_tau}), official-code defaults (layers 2..L-2)"
    raise InputError(f"unknown condition {name!r}: choose from {', '.join(CONDITIONS)}")


def parse_conditions(text: str) -> list[str]:
    """'none,vhr,var' -> ['none', 'vhr', 'var'], checked; 'none' is always included (the baseline)."""
    names = [c.strip().lower() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONDITIONS]
    if bad or not names:
        raise InputError(
            f"--interventions takes a comma-separated subset of {','.join(CONDITIONS)}, got {text!r}"
        )
    return ["none"] + [c for c in dict.fromkeys(names) if c != "none"]


# --------------------------------------------------------------------------------------------- answers


class AnswerLog:
    """`answers.jsonl`: the raw answer per (condition, split, question_id), appended and flushed one line at
    a time. Malformed lines are listed in `problems` and their questions asked again."""

    def __init__(self, path: Path, model: str) -> None:
        self.path, self.model = path, model
        self.answers: dict[tuple[str, str], dict[int, str]] = {}
        self.problems: list[str] = []
        if path.is_file():
            self._read()

    def _read(self) -> None:
        for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key, qid, text = (
                    (str(rec["condition"]), str(rec["split"])),
                    int(rec["question_id"]),
                    rec["answer"],
                )
                if not isinstance(text, str):
                    raise TypeError("answer is not a string")
            except (ValueError, KeyError, TypeError) as err:
                self.problems.append(
                    f"{self.path.name} line {i} is malformed ({err}); its question is asked again"
                )
                continue
            if rec.get("model", self.model) != self.model:
                raise HeadlabError(
                    f"{self.path} holds answers of model {rec.get('model')!r}, not {self.model!r}; "
                    "use another --out folder for another model"
                )
            self.answers.setdefault(key, {})[qid] = text

    def get(self, condition: str, split: str) -> dict[int, str]:
        return self.answers.get((condition, split), {})

    def append(self, condition: str, split: str, question_id: int, text: str) -> None:
        rec = {"model": self.model, "condition": condition, "split": split, "question_id": question_id}
        rec.update(answer=text, parsed=parse_answer(text))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self.answers.setdefault((condition, split), {})[question_id] = text


def generate_answer(lm, prompt: str, image: Path, max_new_tokens: int) -> str:
    """The greedy continuation (at most `max_new_tokens` tokens) of one prompt with its image, as text."""
    import torch

    from headlab.inputs import prepare

    inputs = prepare(lm, [prompt], [image])
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokenizer = getattr(lm.processor, "tokenizer", None) or lm.tokenizer
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def prompt_for(question: PopeQuestion) -> str:
    """The LLaVA-1.5 conversation around a POPE question."""
    from headlab.zoo.llava import conversation

    return conversation(question.text)


@dataclass
class AnswerRun:
    done: int = 0
    skipped: int = 0
    interrupted: bool = False
    seconds: float = 0.0


def answer_all(
    lm,
    splits: Sequence[Split],
    conditions: Sequence[str],
    log: AnswerLog,
    *,
    max_new_tokens: int = 4,
    var_tau: float = 20.0,
    progress: Progress | None = None,
) -> AnswerRun:
    """Answer every question not yet in `log`, per condition and split; Ctrl-C stops with `interrupted`."""
    from headlab.interventions import intervene

    run, start = AnswerRun(), time.perf_counter()
    n_layers = lm.tower("lm").n_layers
    try:
        for condition in conditions:
            interventions, _ = condition_interventions(condition, n_layers, var_tau=var_tau)
            for split in splits:
                have = log.get(condition, split.name)
                todo = [q for q in split.questions if q.question_id not in have]
                run.skipped += len(split.questions) - len(todo)
                if not todo:
                    continue
                tick = progress(f"{condition} / {split.name}", len(todo)) if progress else None
                scope = intervene(lm, *interventions) if interventions else contextlib.nullcontext()
                with scope:
                    for q in todo:
                        text = generate_answer(lm, prompt_for(q), split.images / q.image, max_new_tokens)
                        log.append(condition, split.name, q.question_id, text)
                        run.done += 1
                        if tick:
                            tick()
    except KeyboardInterrupt:
        run.interrupted = True
    run.seconds = time.perf_counter() - start
    return run


# ----------------------------------------------------------------------------------------- statistics


def _metrics(pred_yes: np.ndarray, label_yes: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and F1 along the last axis ("yes" positive), as score_pope computes them."""
    tp = (pred_yes & label_yes).sum(-1)
    fp = (pred_yes & ~label_yes).sum(-1)
    fn = (~pred_yes & label_yes).sum(-1)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return {"accuracy": (pred_yes == label_yes).mean(-1), "f1": f1}


def paired_bootstrap(
    labels: Sequence[str],
    before: Sequence[str],
    after: Sequence[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Difference after - before of accuracy and F1 on the same questions (parsed "yes"/"no" answers), with a
    percentile bootstrap 95% CI: questions resampled with replacement, the same draw for both conditions."""
    y = np.asarray([v == "yes" for v in labels], dtype=bool)
    a = np.asarray([v == "yes" for v in before], dtype=bool)
    b = np.asarray([v == "yes" for v in after], dtype=bool)
    if not len(y) == len(a) == len(b):
        raise InputError(f"paired bootstrap needs equal lengths, got {len(y)}, {len(a)}, {len(b)}")
    if len(y) == 0:
        return {m: {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 0} for m in ("accuracy", "f1")}
    idx = np.random.default_rng(seed).integers(0, len(y), size=(resamples, len(y)))  # [resample, question]
    point_a, point_b = _metrics(a, y), _metrics(b, y)
    boot_a, boot_b = _metrics(a[idx], y[idx]), _metrics(b[idx], y[idx])
    out = {}
    for m in ("accuracy", "f1"):
        diff = boot_b[m] - boot_a[m]
        out[m] = {
            "delta": float(point_b[m] - point_a[m]),
            "ci_low": float(np.percentile(diff, 2.5)),
            "ci_high": float(np.percentile(diff, 97.5)),
            "n": len(y),
        }
    return out


def flipped(
    questions: Sequence[PopeQuestion], before: Mapping[int, str], after: Mapping[int, str]
) -> list[dict]:
    """The questions whose parsed answer differs between two conditions."""
    out = []
    for q in questions:
        if q.question_id in before and q.question_id in after:
            pa, pb = parse_answer(before[q.question_id]), parse_answer(after[q.question_id])
            if pa != pb:
                out.append(
                    {"question_id": q.question_id, "image": q.image, "question": q.text, "label": q.label}
                    | {
                        "before": before[q.question_id],
                        "after": after[q.question_id],
                        "now_correct": pb == q.label,
                    }
                )
    return out


# ------------------------------------------------------------------------------------------- the report


def build_report(
    model: str, splits: Sequence[Split], conditions: Sequence[str], log: AnswerLog, n_layers: int, **extra
) -> dict:
    """Every number of the report as plain JSON-able data."""
    report: dict = {
        "model": model,
        "conditions": {
            c: condition_interventions(c, n_layers, var_tau=extra.get("var_tau", 20.0))[1] for c in conditions
        },
        "splits": {},
        "problems": {"answers_file": list(log.problems)},
        **extra,
    }
    for split in splits:
        entry: dict = {
            "file": str(split.path),
            "n_questions": len(split.questions),
            "metrics": {},
            "vs_none": {},
        }
        entry["malformed_lines"], entry["missing_images"] = split.problems, split.missing_images
        for c in conditions:
            entry["metrics"][c] = asdict(score_pope(split.questions, log.get(c, split.name)))
        base = log.get("none", split.name)
        for c in conditions[1:]:
            other = log.get(c, split.name)
            both = [q for q in split.questions if q.question_id in base and q.question_id in other]
            entry["vs_none"][c] = paired_bootstrap(
                [q.label for q in both],
                [parse_answer(base[q.question_id]) for q in both],
                [parse_answer(other[q.question_id]) for q in both],
            ) | {"flipped": flipped(split.questions, base, other)}
        report["splits"][split.name] = entry
    return report


def _fmt_ci(d: Mapping) -> str:
    return f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def render_markdown(report: Mapping) -> str:
    lines = [f"# POPE report: {report['model']}", ""]
    lines += [f"- **{c}**: {note}" for c, note in report["conditions"].items()]
    lines += ["", "| split | condition | n | accuracy | precision | recall | F1 | yes-ratio | unanswered |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in report["splits"].items():
        for c, m in s["metrics"].items():
            cells = " | ".join(f"{m[k]:.3f}" for k in METRICS)
            lines.append(f"| {name} | {c} | {m['n']} | {cells} | {m['unanswered']} |")
    lines += ["", "Difference vs none, bootstrap 95% CI (paired, 1000 resamples, seed 0):", ""]
    lines += ["| split | condition | Δ accuracy | Δ F1 | flipped |", "|---|---|---|---|---|"]
    for name, s in report["splits"].items():
        for c, d in s["vs_none"].items():
            lines.append(
                f"| {name} | {c} | {_fmt_ci(d['accuracy'])} | {_fmt_ci(d['f1'])} | {len(d['flipped'])} |"
            )
    problems = _problems(report)
    lines += ["", f"Problems ({len(problems)}):", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def _problems(report: Mapping) -> list[str]:
    out = list(report["problems"]["answers_file"])
    for s in report["splits"].values():
        out += [f"malformed line: {p}" for p in s["malformed_lines"]]
        out += [f"missing image: {p}" for p in s["missing_images"]]
    return out


def _flipped_section(page, report: Mapping) -> None:
    """One table per (split, condition) of the answers the condition flipped vs none."""
    keys = ("question_id", "image", "question", "label", "before", "after", "now_correct")
    page.heading("Flipped answers")
    for name, s in report["splits"].items():
        for c, d in s["vs_none"].items():
            page.heading(f"{name}: none -> {c} ({len(d['flipped'])})", level=3)
            page.table(
                keys, [[f[k] if k != "now_correct" else str(f[k]) for k in keys] for f in d["flipped"]]
            )


def render_html(report: Mapping, vhd=None) -> str:
    """The self-contained HTML page; `vhd` is an optional (layer, head, vhd) DataFrame for a heat map."""
    import plotly.graph_objects as go

    from headlab.reports.html import Page

    page = Page(f"POPE report: {report['model']}")
    page.bullets([f"{c}: {note}" for c, note in report["conditions"].items()])
    if report.get("interrupted"):
        page.paragraph("Interrupted: the numbers cover the questions answered so far; rerun to finish.")
    page.heading("Metrics")
    rows = [
        [name, c, m["n"], *(m[k] for k in METRICS), m["unanswered"]]
        for name, s in report["splits"].items()
        for c, m in s["metrics"].items()
    ]
    page.table(["split", "condition", "n", *METRICS, "unanswered"], rows)
    page.heading("Difference vs none (bootstrap 95% CI, paired, 1000 resamples)")
    rows = [
        [name, c, _fmt_ci(d["accuracy"]), _fmt_ci(d["f1"]), len(d["flipped"])]
        for name, s in report["splits"].items()
        for c, d in s["vs_none"].items()
    ]
    page.table(["split", "condition", "Δ accuracy", "Δ F1", "flipped"], rows)
    for name, s in report["splits"].items():
        fig = go.Figure(
            [go.Bar(name=c, x=list(METRICS), y=[m[k] for k in METRICS]) for c, m in s["metrics"].items()]
        )
        fig.update_layout(barmode="group", title=f"{name}", yaxis_range=[0, 1], height=340)
        page.heading(f"Split {name}")
        page.figure(fig)
    maps = report.get("attention_maps") or {}
    if maps.get("image_mass"):
        frame = pd.DataFrame(maps["image_mass"]).pivot(index="layer", columns="head", values="mass")
        fig = go.Figure(go.Heatmap(z=frame.values, x=list(frame.columns), y=list(frame.index)))
        fig.update_layout(
            title=f"attention mass on the image tokens at the last query (mean over {maps['images']} images)",
            xaxis_title="head",
            yaxis_title="layer",
        )
        page.heading("Image attention")
        page.figure(fig)
    if maps.get("visual_sinks"):
        sinks = maps["visual_sinks"]
        fig = go.Figure(go.Heatmap(z=sinks["phi"], colorscale="Magma"))
        fig.update_layout(
            title=f"visual-sink score phi per layer and image token (sink dims {sinks['dims']}; "
            f"phi > {sinks['tau']:g} = visual sink)",
            xaxis_title="image token (row-major over the patch grid)",
            yaxis_title="layer input",
        )
        page.heading("Visual sinks")
        page.paragraph(f"visual sinks per layer: {sinks['sinks_per_layer']}")
        page.figure(fig)
    if vhd is not None and len(vhd):
        grid = vhd.pivot(index="layer", columns="head", values="vhd")
        fig = go.Figure(
            go.Heatmap(z=grid.values, x=list(grid.columns), y=list(grid.index), colorscale="Viridis")
        )
        fig.update_layout(title="VHD per head (mean over images)", xaxis_title="head", yaxis_title="layer")
        page.heading("Vision-aware head divergence")
        page.figure(fig)
    _flipped_section(page, report)
    problems = _problems(report)
    page.heading(f"Problems ({len(problems)})")
    page.bullets(problems)
    return page.render()


def write_report(report: Mapping, out: Path, vhd=None) -> Path:
    """report.json, report.md and report.html in `out`; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    path = out / "report.html"
    path.write_text(render_html(report, vhd), encoding="utf-8")
    return path


@dataclass
class PopeReportResult:
    html: Path
    report: dict
    run: AnswerRun


def vhd_heatmap_data(lm, split: Split, out: Path, n_images: int):
    """Per-head VHD (layer, head, vhd) from the first `n_images` distinct images of `split`, captured with and
    without the image into `out/vhd_store` (reused on a rerun)."""
    from headlab.analyses.vhd import capture_vhd_conditions, vhd_per_head
    from headlab.store import Store

    picks: dict[str, PopeQuestion] = {}
    for q in split.questions:
        if len(picks) < n_images:
            picks.setdefault(q.image, q)
    if not picks:
        return None
    root = out / "vhd_store"
    fresh = not root.exists()
    store = Store.create(root, lm, exist_ok=True)
    if fresh:
        qs = list(picks.values())
        capture_vhd_conditions(
            lm, store, [prompt_for(q) for q in qs], [_image(split.images / q.image) for q in qs]
        )
    return vhd_per_head(store)


@torch.no_grad()
def attention_maps(lm, split: Split, n_images: int, *, tau: float = 20.0) -> dict:
    """On the first `n_images` distinct images of `split` (with their first question): each language-model
    head's attention mass on the image tokens at the last query (mean over images), and VAR's visual-sink
    score phi = max over the sink dimensions |x_d| / RMS(x) of every image token entering each layer (mean
    over images; sink dimensions found on the BOS token). Tokens with phi > tau are visual sinks."""
    import headlab as hl
    from headlab.interventions.var import sink_dims_from_states, sink_scores

    picks: dict[str, PopeQuestion] = {}
    for q in split.questions:
        if len(picks) < n_images:
            picks.setdefault(q.image, q)
    if not picks:
        return {}
    masses, phis, dims = [], [], None
    for q in picks.values():
        inputs = lm.processor(
            text=[prompt_for(q)], images=[_image(split.images / q.image)], return_tensors="pt"
        )
        with hl.capture(lm, stats=hl.Stats(which=("mass",), towers=("lm",))) as rec:
            out = lm.model(**dict(inputs), output_hidden_states=True)
        frame = rec.head_stats
        masses.append(frame[(frame.stat == "mass_last") & (frame.role == "image")])
        states = out.hidden_states[:-1]  # the input of each language-model layer
        dims = dims or sink_dims_from_states(states, 0)
        image = inputs["input_ids"][0] == lm.image_token_id
        phis.append(torch.stack([sink_scores(h[0, image], dims) for h in states]))  # [layer, image token]
    mass = pd.concat(masses).groupby(["layer", "head"]).value.mean().reset_index()
    phi = torch.stack(phis).mean(0)
    return {
        "images": len(picks),
        "image_mass": mass.rename(columns={"value": "mass"}).to_dict(orient="records"),
        "visual_sinks": {
            "dims": list(dims),
            "tau": tau,
            "phi": phi.tolist(),
            "sinks_per_layer": (phi > tau).sum(-1).tolist(),
            "grid": list(lm.tower("vision").grid) if "vision" in {t.name for t in lm.towers} else None,
        },
    }


def _image(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def check_options(n: int | None, max_new_tokens: int, conditions: Sequence[str]) -> list[str]:
    """Validate the shared report options; returns the conditions (`none` first, the baseline)."""
    if n is not None and n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    conditions = list(conditions)
    if not conditions or conditions[0] != "none":
        raise InputError("the conditions must start with 'none' (the baseline the others are compared to)")
    return conditions


def load_lvlm(model: str, what: str):
    import headlab as hl
    from headlab.loading import Family

    lm = hl.load(model)
    if lm.family is not Family.LVLM:
        raise InputError(f"{what} needs a vision-language model; {model} is a {lm.family.value} model")
    return lm


def pope_report(
    out: Path,
    *,
    model: str = "zoo:llava",
    data: Sequence[Path] = (),
    images: Path | None = None,
    conditions: Sequence[str] = CONDITIONS,
    n: int | None = None,
    max_new_tokens: int = 4,
    var_tau: float = 20.0,
    vhd_images: int = 4,
    progress: Progress | None = None,
) -> PopeReportResult:
    """Answer, score and write the report (see the module docstring). Without `data`, the three synthetic
    POPE files of `scenes.write_pope_benchmark` are written into `out/data` (once) and used."""
    from headlab.datasets import scenes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not data:
        folder = out / "data"
        if not (folder / "pope_adversarial.json").is_file():
            scenes.write_pope_benchmark(folder)
        data = [folder / f"pope_{s}.json" for s in ("random", "popular", "adversarial")]
    conditions = check_options(n, max_new_tokens, conditions)
    splits = load_splits(data, images, n)
    lm = load_lvlm(model, "POPE")
    log = AnswerLog(out / ANSWERS, model)
    run = answer_all(
        lm, splits, conditions, log, max_new_tokens=max_new_tokens, var_tau=var_tau, progress=progress
    )
    n_layers = lm.tower("lm").n_layers
    vhd = None
    if vhd_images > 0 and splits and not run.interrupted:
        vhd = vhd_heatmap_data(lm, splits[0], out, vhd_images)
    report = build_report(
        model,
        splits,
        conditions,
        log,
        n_layers,
        var_tau=var_tau,
        max_new_tokens=max_new_tokens,
        n_per_split=n,
        interrupted=run.interrupted,
        bootstrap={"resamples": 1000, "seed": 0, "level": 0.95, "paired": True},
    )
    if vhd is not None:
        report["vhd_per_head"] = vhd[["layer", "head", "vhd"]].to_dict(orient="records")
    if vhd_images > 0 and splits and not run.interrupted:
        report["attention_maps"] = attention_maps(lm, splits[0], vhd_images, tau=var_tau)
    return PopeReportResult(write_report(report, out, vhd), report, run)
