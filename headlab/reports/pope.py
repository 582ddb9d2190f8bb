"""POPE report: greedy yes/no answers of an LVLM per split file and intervention condition, scored with the
official metrics, with the paired difference each intervention makes and the answers it flipped.

Conditions: "none" (the plain model), "vhr" (`VHR()`, paper defaults) and "var" (`VAR(tau=...)`; models
whose default VAR range 2..L-2 is empty, i.e. with at most 3 language layers, get layers (0, 1) and the
report says so). Prompts use the LLaVA-1.5 format with POPE's usual suffix-free question.

Answers go to `answers.jsonl` in the output folder as they come (`reports.answers`: one whole line per
(condition, split, question_id), tied to the model's fingerprint), so a rerun skips what is there and
Ctrl-C keeps everything answered so far.

Bad items never stop the report; these rules hold for the MME, AMBER and CHAIR reports too, which run on
`Split`, `answer_all` and `outcome` from here:
- a malformed question record, and a question whose image path is unusable or names no file, are listed per
  split ("malformed_lines", "missing_images") and left out before answering;
- a question whose answer fails (its image does not decode, is a decompression bomb, the processor or the
  model raises) is listed per split and condition ("failed": its id and the reason) and stays unanswered;
  every other question is answered, and a rerun tries it again;
- a metric over zero answered questions is None (n/a), and so is a difference involving one;
- the run's `reports.output.Outcome` (complete / partial / empty / interrupted) gives the exit code.

Differences vs "none" come with a bootstrap 95% confidence interval over the questions answered under both
conditions (paired resampling, fixed seed). Outputs, written atomically (`reports.output`): report.json
(every number), report.md (tables) and report.html (self-contained: tables, a bar chart per split, flipped
examples, and the image maps of `reports.maps` on the first `vhd_images` images of the first split).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from headlab.datasets.pope import PopeFile, PopeQuestion, load_pope, parse_answer, score_pope
from headlab.errors import InputError
from headlab.reports.answers import ANSWERS, AnswerLog, ModelIdentity, load_report_model
from headlab.reports.output import (
    Outcome,
    check_folder,
    check_out,
    fmt,
    reason,
    synthetic_data,
    write_report_files,
)

CONDITIONS = ("none", "vhr", "var")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
DEFAULT_MODEL = "zoo:llava"
BOOTSTRAP = {"resamples": 1000, "seed": 0, "level": 0.95, "paired": True}
Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> tick; see `answer_all`


@dataclass
class Split:
    """One question file: its usable questions (the first `n`), and the records left out with the reason."""

    name: str
    path: Path
    images: Path
    questions: list[PopeQuestion]
    problems: list[str] = field(default_factory=list)  # malformed records
    missing_images: list[str] = field(
        default_factory=list
    )  # questions left out: image path unusable or absent

    def image_file(self, q: PopeQuestion) -> Path:
        """The image file of `q` inside the image folder (`inputs.image_path`: InputError if it leads out)."""
        from headlab.inputs import image_path

        return image_path(q.image, self.images)

    def add(self, q: PopeQuestion, where: str) -> None:
        """Keep `q` when its image file exists; else list it in `missing_images` ("where: why")."""
        try:
            path = self.image_file(q)
        except InputError as err:
            self.missing_images.append(f"{where}: {err}")
            return
        if path.is_file():
            self.questions.append(q)
        else:
            self.missing_images.append(f"{where}: image {path} does not exist")


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


@dataclass(frozen=True, kw_only=True)
class Failure:
    """One answer that could not be given in this run."""

    condition: str
    split: str
    question_id: int | str
    reason: str


@dataclass
class AnswerRun:
    done: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def then(self, more: AnswerRun) -> AnswerRun:
        """This run followed by `more` (its interruption is the last word)."""
        return AnswerRun(
            self.done + more.done,
            self.skipped + more.skipped,
            self.failed + more.failed,
            more.interrupted,
            self.seconds + more.seconds,
        )

    def failures(self, split: str) -> dict[str, list[str]]:
        """{condition: ["question ID: reason", ...]} of one split."""
        out: dict[str, list[str]] = {}
        for f in self.failed:
            if f.split == split:
                out.setdefault(f.condition, []).append(f"question {f.question_id!r}: {f.reason}")
        return out


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
    """Answer every question not yet in `log`, per condition and split; a failing question is listed in
    `failed` and the others go on; Ctrl-C stops with `interrupted`."""
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
                        _answer_one(lm, split, q, condition, log, run, max_new_tokens)
                        if tick:
                            tick()
    except KeyboardInterrupt:
        run.interrupted = True
    run.seconds = time.perf_counter() - start
    return run


def _answer_one(lm, split: Split, q: PopeQuestion, condition: str, log: AnswerLog, run: AnswerRun, tokens):
    try:
        text = generate_answer(lm, prompt_for(q), split.image_file(q), tokens)
    except Exception as err:  # an item's failure is listed; only Ctrl-C stops the run
        run.failed.append(
            Failure(condition=condition, split=split.name, question_id=q.question_id, reason=reason(err))
        )
        return
    log.append(condition, split.name, q.question_id, text)
    run.done += 1


def outcome(
    splits: Sequence[Split], conditions: Sequence[str], log: AnswerLog, run: AnswerRun, bad_input: int
):
    """The run's `Outcome`: usable questions x conditions, how many are answered, what failed or was bad."""
    items = answered = 0
    for split in splits:
        for c in conditions:
            have = log.get(c, split.name)
            items += len(split.questions)
            answered += sum(q.question_id in have for q in split.questions)
    return Outcome(
        items=items,
        answered=answered,
        failed=len(run.failed),
        bad_input=bad_input,
        interrupted=run.interrupted,
    )


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
) -> dict[str, dict[str, float | None]]:
    """Difference after - before of accuracy and F1 on the same questions (parsed "yes"/"no" answers), with a
    percentile bootstrap 95% CI: questions resampled with replacement, the same draw for both conditions.
    No question answered under both: every number is None (n/a)."""
    y = np.asarray([v == "yes" for v in labels], dtype=bool)
    a = np.asarray([v == "yes" for v in before], dtype=bool)
    b = np.asarray([v == "yes" for v in after], dtype=bool)
    if not len(y) == len(a) == len(b):
        raise InputError(f"paired bootstrap needs equal lengths, got {len(y)}, {len(a)}, {len(b)}")
    if len(y) == 0:
        return {m: {"delta": None, "ci_low": None, "ci_high": None, "n": 0} for m in ("accuracy", "f1")}
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
    questions: Sequence[PopeQuestion], before: Mapping[int | str, str], after: Mapping[int | str, str]
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


def report_head(identity: ModelIdentity, conditions, n_layers: int, var_tau: float, log: AnswerLog) -> dict:
    """The fields every LVLM report starts with: the model, the conditions, the answer log's problems."""
    return {
        "model": identity.given,
        "model_path": identity.path,
        "conditions": {c: condition_interventions(c, n_layers, var_tau=var_tau)[1] for c in conditions},
        "problems": {"answers_file": list(log.problems)},
        "notes": list(log.notes),
    }


def build_report(
    identity: ModelIdentity,
    splits: Sequence[Split],
    conditions: Sequence[str],
    log: AnswerLog,
    run: AnswerRun,
    n_layers: int,
    **extra,
) -> dict:
    """Every number of the report as plain JSON-able data."""
    report = report_head(identity, conditions, n_layers, extra.get("var_tau", 20.0), log)
    report |= {"splits": {}, **extra}
    for split in splits:
        entry: dict = {"file": str(split.path), "n_questions": len(split.questions), "metrics": {}}
        entry |= {"vs_none": {}, "malformed_lines": split.problems, "missing_images": split.missing_images}
        entry["failed"] = run.failures(split.name)
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
    bad = sum(len(s.problems) + len(s.missing_images) for s in splits)
    report["outcome"] = outcome(splits, conditions, log, run, bad).as_dict()
    return report


def fmt_ci(d: Mapping) -> str:
    if d["delta"] is None:
        return "n/a"
    return f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def render_markdown(report: Mapping) -> str:
    lines = [f"# POPE report: {report['model']}", ""]
    lines += [f"- **{c}**: {note}" for c, note in report["conditions"].items()]
    lines += ["", "| split | condition | n | accuracy | precision | recall | F1 | yes-ratio | unanswered |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in report["splits"].items():
        for c, m in s["metrics"].items():
            cells = " | ".join(fmt(m[k]) for k in METRICS)
            lines.append(f"| {name} | {c} | {m['n']} | {cells} | {m['unanswered']} |")
    lines += ["", "Difference vs none, bootstrap 95% CI (paired, 1000 resamples, seed 0):", ""]
    lines += ["| split | condition | Δ accuracy | Δ F1 | flipped |", "|---|---|---|---|---|"]
    for name, s in report["splits"].items():
        for c, d in s["vs_none"].items():
            lines.append(
                f"| {name} | {c} | {fmt_ci(d['accuracy'])} | {fmt_ci(d['f1'])} | {len(d['flipped'])} |"
            )
    return "\n".join(lines + problems_markdown(report, split_problems(report["splits"]))) + "\n"


def split_problems(splits: Mapping) -> list[str]:
    """The listed problems of the splits (or subtasks) of a report: bad records, missing images, failures."""
    out = []
    for name, s in splits.items():
        out += [f"malformed line: {p}" for p in s["malformed_lines"]]
        out += [f"missing image: {p}" for p in s["missing_images"]]
        out += [f"failed ({name} / {c}): {p}" for c, ps in s["failed"].items() for p in ps]
    return out


def problems_markdown(report: Mapping, problems: list[str]) -> list[str]:
    """The outcome line, the problems (answer log first) and the notes, as Markdown lines."""
    problems = list(report["problems"]["answers_file"]) + problems
    o = report["outcome"]
    lines = ["", f"Outcome: {o['status']} ({o['answered']} of {o['items']} answers, {o['failed']} failed)"]
    lines += ["", f"Problems ({len(problems)}):", ""] + [f"- {p}" for p in problems]
    if report["notes"]:
        lines += ["", f"Notes ({len(report['notes'])}):", ""] + [f"- {n}" for n in report["notes"]]
    return lines


def problems_html(page, report: Mapping, problems: list[str]) -> None:
    """The outcome, the problems and the notes as HTML sections (see `problems_markdown`)."""
    problems = list(report["problems"]["answers_file"]) + problems
    o = report["outcome"]
    page.heading(f"Problems ({len(problems)})")
    page.paragraph(f"Outcome: {o['status']} ({o['answered']} of {o['items']} answers, {o['failed']} failed)")
    page.bullets(problems)
    if report["notes"]:
        page.heading(f"Notes ({len(report['notes'])})")
        page.bullets(report["notes"])


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
    from headlab.reports.maps import render_maps

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
        [name, c, fmt_ci(d["accuracy"]), fmt_ci(d["f1"]), len(d["flipped"])]
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
    render_maps(page, report.get("attention_maps") or {}, vhd)
    _flipped_section(page, report)
    problems_html(page, report, split_problems(report["splits"]))
    return page.render()


def write_report(report: Mapping, out: Path, vhd=None) -> Path:
    """report.json, report.md and report.html in `out`, atomically; returns the HTML path."""
    return write_report_files(out, report, render_markdown(report), render_html(report, vhd))


@dataclass
class ReportResult:
    """What a report function returns: the HTML path, every number, and the answering run."""

    html: Path
    report: dict
    run: AnswerRun

    @property
    def outcome(self) -> dict:
        return self.report["outcome"]


def check_options(
    n: int | None, max_new_tokens: int, conditions: Sequence[str], var_tau: float = 20.0
) -> list[str]:
    """Validate the shared report options; returns the conditions (`none` first, the baseline)."""
    if n is not None and n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if max_new_tokens < 1:
        raise InputError(f"the number of tokens to generate must be at least 1, got {max_new_tokens}")
    if not math.isfinite(var_tau) or var_tau <= 0:
        raise InputError(f"--var-tau must be a positive number, got {var_tau}")
    conditions = list(conditions)
    if not conditions or conditions[0] != "none":
        raise InputError("the conditions must start with 'none' (the baseline the others are compared to)")
    for c in conditions:
        if c not in CONDITIONS:
            raise InputError(f"unknown condition {c!r}: choose from {', '.join(CONDITIONS)}")
    return conditions


def load_lvlm(out: Path, model: str | None, what: str):
    """(lm, identity) of the report's model (`answers.load_report_model`), refused unless an LVLM."""
    from headlab.loading import Family

    lm, identity = load_report_model(out, model, DEFAULT_MODEL)
    if lm.family is not Family.LVLM:
        raise InputError(
            f"{what} needs a vision-language model; {identity.given} is a {lm.family.value} model"
        )
    return lm, identity


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
    vhd_images: int = 4,
    progress: Progress | None = None,
) -> ReportResult:
    """Answer, score and write the report (see the module docstring). Without `data`, the three synthetic
    POPE files of `scenes.write_pope_benchmark` are written into `out/data` (once) and used. `model`: None =
    the model of `out/answers.jsonl`, else zoo:llava."""
    from headlab.datasets import scenes

    out = check_out(out)
    check_folder(images, "--images")
    conditions = check_options(n, max_new_tokens, conditions, var_tau)
    if vhd_images < 0:
        raise InputError(f"--vhd-images must be 0 (no image maps) or more, got {vhd_images}")
    out.mkdir(parents=True, exist_ok=True)
    if not data:
        folder = synthetic_data(out / "data", scenes.write_pope_benchmark)
        data = [folder / f"pope_{s}.json" for s in ("random", "popular", "adversarial")]
    splits = load_splits(data, images, n)
    lm, identity = load_lvlm(out, model, "POPE")
    log = AnswerLog(out / ANSWERS, identity)
    run = answer_all(
        lm, splits, conditions, log, max_new_tokens=max_new_tokens, var_tau=var_tau, progress=progress
    )
    vhd, maps, notes = None, {}, []
    if vhd_images > 0 and splits and not run.interrupted:
        from headlab.reports.maps import image_maps

        try:
            vhd, maps, notes = image_maps(lm, splits[0], out, vhd_images, var_tau)
        except KeyboardInterrupt:
            run.interrupted = True
    report = build_report(
        identity,
        splits,
        conditions,
        log,
        run,
        lm.tower("lm").n_layers,
        var_tau=var_tau,
        max_new_tokens=max_new_tokens,
        n_per_split=n,
        interrupted=run.interrupted,
        bootstrap=BOOTSTRAP,
    )
    report["notes"] += notes
    if vhd is not None:
        report["vhd_per_head"] = vhd[["layer", "head", "vhd"]].to_dict(orient="records")
    if maps:
        report["attention_maps"] = maps
    return ReportResult(write_report(report, out, vhd), report, run)
