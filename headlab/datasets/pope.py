"""POPE (Li et al., EMNLP 2023): question files, the official answer parser and metrics.

Question files are JSON Lines (the COCO files, despite their .json name) or a pretty-printed JSON array (the
SEEM-built A-OKVQA / GQA files), with `question_id`, `image`, `text` and `label` ("yes"/"no").

Answer parsing follows the official evaluate.py (and LLaVA's eval_pope): keep the text before the first ".",
drop commas, split on spaces; if any word is exactly "No", "not" or "no" the answer is "no", else "yes".
Metrics use "yes" as the positive class: accuracy, precision, recall, F1 and the yes-ratio (ideal 0.5).
Answers are aligned to questions by question_id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from headlab.datasets.records import read_records

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."  # the LLaVA convention


@dataclass(frozen=True)
class PopeQuestion:
    question_id: int
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
    seen: set[int] = set()
    for where, obj in records.items:
        missing = [k for k in ("question_id", "image", "text", "label") if k not in obj]
        label = str(obj.get("label", "")).strip().lower()
        if missing:
            out.problems.append(f"{path}:{where}: missing {', '.join(missing)}")
        elif label not in ("yes", "no"):
            out.problems.append(f"{path}:{where}: label {obj['label']!r} is neither yes nor no")
        elif not isinstance(obj["question_id"], int) or obj["question_id"] in seen:
            out.problems.append(f"{path}:{where}: question_id {obj['question_id']!r} is not a new integer")
        else:
            seen.add(obj["question_id"])
            out.questions.append(PopeQuestion(obj["question_id"], str(obj["image"]), str(obj["text"]), label))
    return out


def parse_answer(text: str) -> str:
    """The official POPE rule: "no" if a word before the first period is No/not/no, else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


@dataclass(frozen=True)
class PopeScore:
    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    tp: int
    fp: int
    tn: int
    fn: int
    unanswered: int  # questions without an answer: left out of every metric above


def score_pope(questions: list[PopeQuestion], answers: Mapping[int, str]) -> PopeScore:
    """Metrics over the questions that have an answer (raw model text, parsed here); `unanswered` counts the
    rest, which are left out of every metric and should be reported next to them."""
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
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PopeScore(
        n=n,
        accuracy=(tp + tn) / n if n else 0.0,
        precision=precision,
        recall=recall,
        f1=f1,
        yes_ratio=(tp + fp) / n if n else 0.0,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        unanswered=unanswered,
    )
