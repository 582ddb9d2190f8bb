"""AMBER (Wang et al., 2023), discriminative part: yes/no questions scored with "No" as the positive class.

`annotations.json` is a list indexed by id - 1; discriminative entries carry `type` and `truth` ("yes"/"no").
Responses are a JSON list of {id, response}; the official scorer matches exactly "Yes" or "No", so raw model
text goes through `normalize_yes_no` first (the first word, case-insensitive; anything else stays invalid and
counts as wrong). Metrics overall and per dimension: existence (discriminative-hallucination), attribute
(state, number, action) and relation: accuracy, precision = correct No / predicted No, recall = correct No /
truth No, F1.

The generative part (CHAIR / Cover / Hal / Cog with POS tagging and spaCy similarity) is not implemented yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from headlab.datasets.records import read_records
from headlab.errors import InputError

DIMENSIONS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "attribute",
    "discriminative-attribute-number": "attribute",
    "discriminative-attribute-action": "attribute",
    "discriminative-relation": "relation",
    "relation": "relation",
}


@dataclass(frozen=True)
class AmberQuestion:
    id: int
    type: str
    truth: str  # "yes" / "no"

    @property
    def dimension(self) -> str:
        return DIMENSIONS[self.type]


def load_amber_annotations(path: str | Path) -> tuple[dict[int, AmberQuestion], list[str]]:
    """Discriminative questions by id, and problems (generative entries are skipped silently)."""
    records = read_records(path)
    questions, problems = {}, list(records.problems)
    for index, obj in records.items:
        kind = obj.get("type")
        if kind == "generative":
            continue
        truth = str(obj.get("truth", "")).lower()
        if kind not in DIMENSIONS or truth not in ("yes", "no") or not isinstance(obj.get("id"), int):
            problems.append(
                f"{path}[{index}]: not a discriminative AMBER entry (type {kind!r}, truth {truth!r})"
            )
            continue
        questions[obj["id"]] = AmberQuestion(obj["id"], kind, truth)
    return questions, problems


def normalize_yes_no(text: str) -> str:
    """ "Yes" or "No" from a model's text (its first word), or the text unchanged when it is neither."""
    words = text.strip().replace(",", " ").replace(".", " ").split()
    first = words[0].lower() if words else ""
    return {"yes": "Yes", "no": "No"}.get(first, text)


@dataclass(frozen=True)
class AmberScore:
    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    invalid: int  # responses that were not exactly Yes/No (counted wrong)


def _score(pairs: list[tuple[str, str]]) -> AmberScore:
    """pairs of (truth "yes"/"no", response "Yes"/"No"/other)."""
    n = len(pairs)
    correct = sum(resp.lower() == truth for truth, resp in pairs if resp in ("Yes", "No"))
    pred_no = sum(resp == "No" for _, resp in pairs)
    truth_no = sum(truth == "no" for truth, _ in pairs)
    correct_no = sum(resp == "No" and truth == "no" for truth, resp in pairs)
    precision = correct_no / pred_no if pred_no else 0.0
    recall = correct_no / truth_no if truth_no else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    invalid = sum(resp not in ("Yes", "No") for _, resp in pairs)
    return AmberScore(n, correct / n if n else 0.0, precision, recall, f1, invalid)


def score_amber_discriminative(
    questions: Mapping[int, AmberQuestion], responses: Mapping[int, str]
) -> dict[str, AmberScore]:
    """Scores "overall" and per dimension over the questions that have a response (exact Yes/No matching)."""
    unknown = sorted(set(responses) - set(questions))
    if unknown:
        raise InputError(f"responses for ids that are not discriminative questions: {unknown[:5]}")
    groups: dict[str, list[tuple[str, str]]] = {"overall": []}
    for qid, response in responses.items():
        q = questions[qid]
        groups["overall"].append((q.truth, response))
        groups.setdefault(q.dimension, []).append((q.truth, response))
    return {name: _score(pairs) for name, pairs in groups.items()}


def load_amber_responses(path: str | Path) -> tuple[dict[int, str], list[str]]:
    records = read_records(path)
    responses, problems = {}, list(records.problems)
    for where, obj in records.items:
        if not isinstance(obj.get("id"), int) or not isinstance(obj.get("response"), str):
            problems.append(f"{path}:{where}: needs an integer id and a string response")
            continue
        responses[obj["id"]] = obj["response"]
    return responses, problems
