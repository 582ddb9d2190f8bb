"""POPE (Li et al., EMNLP 2023): question files, the official answer parser and metrics.

Question files are JSON Lines (the COCO files, despite their .json name) or a pretty-printed JSON array (the
SEEM-built A-OKVQA / GQA files), with `question_id`, `image`, `text` and `label` ("yes"/"no").

Answer parsing follows the official evaluate.py (and LLaVA's eval_pope): keep the text before the first ".",
drop commas, split on spaces; if any word is exactly "No", "not" or "no" the answer is "no", else "yes".
Metrics use "yes" as the positive class: accuracy, precision, recall, F1 and the yes-ratio (ideal 0.5).
Answers are aligned to questions by question_id. With no answered question every metric is None (n/a, never
0.0); otherwise a ratio with an empty denominator (precision when nothing was answered "yes", ...) is 0.0.

Loading: `question_id` follows the id rule of `headlab.ids.example_id` (an int within int64 or a non-empty
string, kept as given: "000000001" and 1 are two questions; 1.9, true and null are refused), `image` is a
non-empty string, `text` a string and `label` yes/no (any case). A record breaking any of these, or
repeating an earlier question_id, is one listed problem; the rest of the file is unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from headlab.datasets.records import read_records
from headlab.errors import InputError
from headlab.ids import example_id

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."  # the LLaVA convention


@dataclass(frozen=True)
class PopeQuestion:
    question_id: int | str
    image: str
    text: str
    label: str  # "yes" or "no"


@dataclass
class PopeFile:
    questions: list[PopeQuestion] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_pope(path: str | Path) -> PopeFile:
    """The questions of a POPE file; malformed records are listed in `problems`, never fatal."""
    records = read_records(path)
    out = PopeFile(problems=list(records.problems))
    seen: set[int | str] = set()
    for where, obj in records.items:
        try:
            out.questions.append(_question(obj, seen))
        except InputError as err:
            out.problems.append(f"{path}:{where}: {err}")
    return out


def _question(obj: dict, seen: set[int | str]) -> PopeQuestion:
    missing = [k for k in ("question_id", "image", "text", "label") if k not in obj]
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    label = str(obj["label"]).strip().lower()
    if label not in ("yes", "no"):
        raise InputError(f"label {obj['label']!r} is neither yes nor no")
    qid = example_id(obj["question_id"])
    if qid in seen:
        raise InputError(f"question_id {qid!r} appears again (each question needs its own id)")
    if not isinstance(obj["image"], str) or not obj["image"] or not isinstance(obj["text"], str):
        raise InputError("image must be a non-empty string (a file name) and text a string")
    seen.add(qid)
    return PopeQuestion(qid, obj["image"], obj["text"], label)


def parse_answer(text: str) -> str:
    """The official POPE rule: "no" if a word before the first period is No/not/no, else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


@dataclass(frozen=True)
class PopeScore:
    n: int
    accuracy: float | None  # None: no question answered
    precision: float | None
    recall: float | None
    f1: float | None
    yes_ratio: float | None
    tp: int
    fp: int
    tn: int
    fn: int
    unanswered: int  # questions without an answer: left out of every metric above


def score_pope(questions: list[PopeQuestion], answers: Mapping[int | str, str]) -> PopeScore:
    """Metrics over the questions that have an answer (raw model text, parsed here); `unanswered` counts the
    rest, which are left out of every metric and should be reported next to them. No answer: metrics None."""
    tp = fp = tn = fn = unanswered = 0
    for q in questions:
        if q.question_id not in answers:
            unanswered += 1
            continue
        pred = parse_answer(answers[q.question_id])
        if pred == "yes":
            tp, fp = tp + (q.label == "yes"), fp + (q.label == "no")
        else:
            tn, fn = tn + (q.label == "no"), fn + (q.label == "yes")
    n = tp + fp + tn + fn
    counts = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "unanswered": unanswered}
    if not n:
        return PopeScore(n=0, accuracy=None, precision=None, recall=None, f1=None, yes_ratio=None, **counts)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PopeScore(
        n=n,
        accuracy=(tp + tn) / n,
        precision=precision,
        recall=recall,
        f1=f1,
        yes_ratio=(tp + fp) / n,
        **counts,
    )
