"""What the LVLM benchmark reports (POPE, MME, AMBER, CHAIR) share: their options, how a pipeline starts
(`begin`) and answers (`answer` -> `Answered`, whose `head()` opens report.json), the paired bootstrap of a
condition against "none", the sections of their documents, and their console summaries.

Every one of them answers questions under the conditions of `runs.answering` (none / vhr / var) with the
answer log of `runs.answers`, and follows the same rules: bad records and missing images are listed and left
out, a failed answer is listed per split and condition, a metric over zero answers is None (n/a), and the
run's `Outcome` gives the exit code. Differences vs "none" come with a percentile bootstrap 95% confidence
interval over the questions answered under both conditions (paired resampling, `BOOTSTRAP`); each
condition's own metrics get one too (`bootstrap_intervals`, the error bars of the reports' bar charts).

VAR: what it did is counted per answer and summarised in report.json's "var" entry, whose statement the
document shows after the conditions (`reports.var_sinks`): on a model where no token passes VAR's sink
threshold tau (the paper's 20, kept as the default: the method gives tau = 20 and a per-model rule only
for the sink dimensions), the report says that the "var" condition equals "none", from the counts of the run.
Flipped answers are listed in full in report.json and in paged tables, with a thumbnail of each question's
image when its file opens (`reports.thumbnails`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from headlab.datasets.pope import PopeQuestion, parse_answer
from headlab.errors import InputError
from headlab.reports import registry
from headlab.reports.document import Document, Thumbnail
from headlab.reports.output import fmt
from headlab.reports.registry import Report, ReportOption, ReportResult
from headlab.runs import distributed
from headlab.runs.answering import (
    KNOWN_CONDITIONS,
    AnswerRun,
    Split,
    answer_all,
    condition_interventions,
    outcome,
)
from headlab.runs.answers import ANSWERS, AnswerLog, ModelIdentity, load_report_model
from headlab.runs.outcome import Progress

if TYPE_CHECKING:
    import numpy as np

DEFAULT_MODEL = "zoo:llava"
BOOTSTRAP = {"resamples": 1000, "seed": 0, "level": 0.95, "paired": True}


def parse_conditions(text: str) -> list[str]:
    """'none,vhr,var' -> ['none', 'vhr', 'var'], checked; 'none' is always included (the baseline)."""
    names = [c.strip().lower() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in KNOWN_CONDITIONS]
    if bad or not names:
        raise InputError(
            f"--interventions takes a comma-separated subset of {','.join(KNOWN_CONDITIONS)}, got {text!r}"
        )
    return ["none"] + [c for c in dict.fromkeys(names) if c != "none"]


def begin(report: Report, out: Path, conditions: Sequence[str], **values) -> tuple[Path, list[str]]:
    """The start of an LVLM report's pipeline: its options checked (`Report.check`), its conditions checked,
    then its folder made; (out, conditions)."""
    report.check(out=out, **values)
    conditions = checked_conditions(conditions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, conditions


def checked_conditions(conditions: Sequence[str]) -> list[str]:
    """The conditions of a Python call, checked: known ones, `none` (the baseline) first."""
    conditions = list(conditions)
    if not conditions or conditions[0] != "none":
        raise InputError("the conditions must start with 'none' (the baseline the others are compared to)")
    for c in conditions:
        if c not in KNOWN_CONDITIONS:
            raise InputError(f"unknown condition {c!r}: choose from {', '.join(KNOWN_CONDITIONS)}")
    return conditions


# ---------------------------------------------------------------------------------------------- options

MODEL = replace(
    registry.MODEL,
    help="local model directory, hub id or zoo:NAME "
    "(default: the model OUT/answers.jsonl was written with, else zoo:llava)",
)
IMAGES = ReportOption(
    name="images", type=Path, folder="in", help="image folder (default: an images/ folder beside each file)"
)
INTERVENTIONS = ReportOption(
    name="interventions",
    type=str,
    default="none,vhr,var",
    help="conditions: a subset of none,vhr,var,paint",
    dest="conditions",
    convert=parse_conditions,
)
MAX_NEW_TOKENS = ReportOption(
    name="max_new_tokens",
    type=int,
    ge=1,
    label="the number of tokens to generate",
    help="greedy tokens generated per answer",
)
GEN_TOKENS = replace(MAX_NEW_TOKENS, name="gen_tokens", help="greedy tokens per description")
VAR_TAU = ReportOption(name="var_tau", type=float, gt=0, help="VAR's sink threshold tau (paper: 20)")
BATCH_SIZE = ReportOption(
    name="batch_size",
    type=int,
    ge=1,
    help="questions answered together in one generate call (left-padded; answers as at batch 1)",
)


# -------------------------------------------------------------------------------------------- answering


@dataclass
class Answered:
    """An LVLM report's answering (`answer`): the model, the conditions, the answer log and the run."""

    lm: object
    identity: ModelIdentity
    conditions: list[str]
    log: AnswerLog
    run: AnswerRun
    var_tau: float
    splits: list[Split] = field(default_factory=list)
    var_records: list[dict] = field(default_factory=list)  # reports.var_sinks: every answer's VAR counts
    var_notes: list[str] = field(default_factory=list)

    def head(self) -> dict:
        """The fields every LVLM report starts with: the model, the conditions, the answer log's problems and
        notes, VAR's tau and what VAR did ("var", when it is a condition), whether the run was interrupted,
        and the bootstrap's settings."""
        from headlab.reports.var_sinks import var_summary

        n_layers = self.lm.tower("lm").n_layers
        notes = {c: condition_interventions(c, n_layers, var_tau=self.var_tau)[1] for c in self.conditions}
        head = {
            "model": self.identity.given,
            "model_path": self.identity.path,
            "conditions": notes,
            "problems": {"answers_file": list(self.log.problems)},
            "notes": list(self.log.notes) + self.var_notes,
            "var_tau": self.var_tau,
            "interrupted": self.run.interrupted,
            "bootstrap": BOOTSTRAP,
        }
        if "var" in self.conditions:
            answered = {
                s.name: {q.question_id for q in s.questions} & set(self.log.get("var", s.name))
                for s in self.splits
            }
            head["var"] = var_summary(self.var_records, answered, self.var_tau)
        return head

    def outcome(self, splits: Sequence[Split], bad_input: int) -> dict:
        """The run's outcome over `splits` (`runs.answering.outcome`), as report.json holds it."""
        return outcome(splits, self.conditions, self.log, self.run, bad_input).as_dict()


def answer(
    out: Path,
    model: str | None,
    what: str,
    conditions: list[str],
    groups: Sequence[tuple[Sequence[Split], int]],
    *,
    var_tau: float,
    progress: Progress | None,
    batch_size: int = 1,
) -> Answered:
    """Load the report's model (refused unless an LVLM; `model` None: the answer log's, else zoo:llava),
    open `out/answers.jsonl`, and answer each group of splits with its number of tokens, in order, until one
    is interrupted (`runs.answering.answer_all`); VAR's counts are kept in `out/var_sinks.json`."""
    from headlab.loading import Family
    from headlab.reports import var_sinks

    lm, identity = load_report_model(out, model, DEFAULT_MODEL)
    if lm.family is not Family.LVLM:
        raise InputError(
            f"{what} needs a vision-language model; {identity.given} is a {lm.family.value} model"
        )
    world = distributed.current()
    log = _shared_log(out / ANSWERS, identity, world)
    run = AnswerRun()
    for splits, tokens in groups:
        if run.interrupted:
            break
        more = answer_all(
            lm,
            splits,
            conditions,
            log,
            max_new_tokens=tokens,
            var_tau=var_tau,
            batch_size=batch_size,
            progress=progress,
            world=world if world.distributed else None,
        )
        run = run.then(more)
    if world.distributed:  # every rank's answers are in the log: rank 0 reads them all and writes the report
        run = AnswerRun.merged(world.gather(run))
        if not world.main:
            raise distributed.NotMainRank
        log = AnswerLog(out / ANSWERS, identity)
    records, notes = ([], [])
    if "var" in conditions:
        records, notes = var_sinks.update(out, identity, var_tau, run.var_seen)
    return Answered(
        lm=lm,
        identity=identity,
        conditions=conditions,
        log=log,
        run=run,
        var_tau=var_tau,
        splits=[split for splits, _ in groups for split in splits],
        var_records=records,
        var_notes=notes,
    )


def _shared_log(path: Path, identity, world) -> AnswerLog:
    """The answer log, opened by every rank of a data-parallel run before any rank appends: rank 0 first
    (creating it, or repairing a line a killed run left half written), then the others."""
    if not world.distributed:
        return AnswerLog(path, identity)
    log = AnswerLog(path, identity) if world.main else None
    world.barrier()
    if not world.main:
        log = AnswerLog(path, identity)
    world.barrier()
    return log


# ----------------------------------------------------------------------------------------------- numbers


def _metrics(pred_yes: np.ndarray, label_yes: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and F1 along the last axis ("yes" positive), as score_pope computes them."""
    import numpy as np

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
    import numpy as np

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


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den is 0 (the scorers' rule for an empty denominator)."""
    import numpy as np

    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


Statistic = Callable[[Mapping[str, "np.ndarray"]], "np.ndarray"]


def bootstrap_intervals(
    columns: Mapping[str, Sequence[float]],
    statistics: Mapping[str, Statistic],
    *,
    resamples: int = BOOTSTRAP["resamples"],
    seed: int = BOOTSTRAP["seed"],
) -> dict[str, list[float] | None]:
    """A percentile bootstrap 95% interval [low, high] of each statistic over items (the rows of `columns`,
    one value per item each), resampled with replacement. A statistic maps the column sums of the resamples
    ({name: [resample]}) to its value per resample: every metric of these reports is a function of per-item
    sums (a mean, or a ratio of sums as precision, F1 or CHAIR_i: `ratio`). No item: None for each."""
    import numpy as np

    data = {name: np.asarray(values, dtype=float) for name, values in columns.items()}
    n = len(next(iter(data.values()))) if data else 0
    if n == 0:
        return dict.fromkeys(statistics)
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    for start in range(0, resamples, 100):  # 100 resamples at a time: [100, item] indices
        idx = rng.integers(0, n, size=(min(100, resamples - start), n))
        sums = {name: column[idx].sum(-1) for name, column in data.items()}
        for name, stat in statistics.items():
            values[name].append(np.broadcast_to(stat(sums), idx.shape[:1]))
    return {
        name: [float(v) for v in np.percentile(np.concatenate(vs), [2.5, 97.5])]
        for name, vs in values.items()
    }


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


def fmt_ci(d: Mapping) -> str:
    """A difference with its interval, "+0.100 [-0.050, +0.250]", or n/a."""
    if d["delta"] is None:
        return "n/a"
    return f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def split_problems(splits: Mapping) -> list[str]:
    """The listed problems of the splits (or subtasks) of a report: bad records, missing images, failures."""
    out = []
    for name, s in splits.items():
        out += [f"malformed line: {p}" for p in s["malformed_lines"]]
        out += [f"missing image: {p}" for p in s["missing_images"]]
        out += [f"failed ({name} / {c}): {p}" for c, ps in s["failed"].items() for p in ps]
    return out


# ---------------------------------------------------------------------------------------------- document


def start_document(title: str, report: Mapping, what: str = "questions") -> Document:
    """A report's document opened with its conditions, what VAR did (`reports.var_sinks`), and a line when
    the run was interrupted."""
    doc = Document(f"{title}: {report['model']}")
    doc.bullets([f"{c}: {note}" for c, note in report["conditions"].items()])
    if (report.get("var") or {}).get("statement"):
        doc.paragraph(report["var"]["statement"])
    if report.get("interrupted"):
        doc.paragraph(f"Interrupted: the numbers cover the {what} answered so far; rerun to finish.")
    return doc


FLIP_KEYS = ("question_id", "image", "question", "label", "before", "after", "now_correct")


def flipped_section(doc: Document, splits: Mapping, thumbs: Mapping[str, Mapping] | None = None) -> None:
    """One table per (split, condition) of the answers the condition flipped vs none (paged when long), the
    image shown by its thumbnail (`thumbs[split][image]`, from `flipped_thumbnails`) when there is one."""
    doc.heading("Flipped answers")
    for name, s in splits.items():
        images = (thumbs or {}).get(name, {})
        for c, d in s["vs_none"].items():
            doc.heading(f"{name}: none -> {c} ({len(d['flipped'])})", level=3)
            if not d["flipped"]:
                doc.paragraph("No answer changed.")
                continue
            rows = []
            for f in d["flipped"]:
                row = {**f, "now_correct": str(f["now_correct"])}
                row["image"] = Thumbnail(str(f["image"]), images.get(f["image"]))
                rows.append([row[k] for k in FLIP_KEYS])
            doc.table(FLIP_KEYS, rows)


def flipped_thumbnails(splits: Sequence[Split], entries: Mapping) -> dict[str, dict[str, str | None]]:
    """{split: {image: thumbnail data URI or None}} for the images of the flipped answers in `entries`
    (report.json's splits or subtasks), made once per image file (`reports.thumbnails`)."""
    from headlab.errors import InputError
    from headlab.reports.thumbnails import Thumbnails

    made, out = Thumbnails(), {}
    for split in splits:
        by_image = {q.image: q for q in split.questions}
        images = {f["image"] for d in entries[split.name]["vs_none"].values() for f in d["flipped"]}
        out[split.name] = {}
        for image in sorted(images, key=str):
            try:
                out[split.name][image] = made.get(split.image_file(by_image[image]))
            except (InputError, KeyError):
                out[split.name][image] = None
    return out


def problems_section(doc: Document, report: Mapping, problems: list[str]) -> None:
    """The outcome, the problems (the answer log's first) and the notes."""
    problems = list(report["problems"]["answers_file"]) + problems
    o = report["outcome"]
    doc.heading(f"Problems ({len(problems)})")
    doc.paragraph(f"Outcome: {o['status']} ({o['answered']} of {o['items']} answers, {o['failed']} failed)")
    doc.bullets(problems)
    if report["notes"]:
        doc.heading(f"Notes ({len(report['notes'])})")
        doc.bullets(report["notes"])


def answered_line(run: AnswerRun, out: Path) -> str:
    """The console line of an answering run."""
    failed = f", {len(run.failed)} failed (listed in the report)" if run.failed else ""
    return (
        f"{run.done} answered, {run.skipped} already in {out / 'answers.jsonl'}{failed} ({run.seconds:.1f} s)"
    )


def condition_lines(result: ReportResult, out: Path, metrics: Mapping[str, str]) -> list[str]:
    """A report's console summary: the answering line, then per condition `metrics` (label: key in the
    report's "metrics"), each as a number or n/a."""
    lines = [answered_line(result.run, out)]
    for c, m in result.report["metrics"].items():
        lines.append(f"  {c}: " + ", ".join(f"{label} {fmt(m[key])}" for label, key in metrics.items()))
    return lines


def split_lines(result: ReportResult, out: Path, splits: str, label: str, spec: str = ".3f") -> list[str]:
    """A report's console summary: the answering line, then per split (`splits`: the report's key for them)
    the metric `label` under each condition, and how many records were left out."""
    lines = [answered_line(result.run, out)]
    for name, s in result.report[splits].items():
        values = ", ".join(f"{c} {fmt(m[label], spec)}" for c, m in s["metrics"].items())
        bad = len(s["malformed_lines"]) + len(s["missing_images"])
        lines.append(f"  {name}: {label} {values}" + (f" ({bad} skipped: see the report)" if bad else ""))
    return lines
