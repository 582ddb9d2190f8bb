"""MME hallucination subset (Fu et al., 2023): existence, count, position, color.

Each subtask has 30 images x 2 yes/no questions (one "Yes", one "No"). The eval tool reads one results file
per subtask with lines `image_name <TAB> question <TAB> gt_answer <TAB> prediction`.

Parsing (official): lowercase; exactly "yes"/"no" is taken as is; otherwise "yes" within the first four
characters means yes, "no" there means no, anything else is "other" and counts as wrong.
Score per subtask: 100 * acc + 100 * acc+, where acc+ is the fraction of images whose questions are all
right; at most 200 a subtask, 800 for the four-subtask hallucination set. A subtask without a scored line
has acc, acc+ and score None (n/a, never 0).

Files are read line by line (`tsv_lines`): a line that is not valid UTF-8 is one listed problem, like a line
with the wrong number of fields; the other lines are unaffected.
"""

from __future__ import annotations

import codecs
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from headlab.errors import InputError

HALLUCINATION_SUBTASKS = ("existence", "count", "position", "color")


@dataclass(frozen=True)
class MmeLine:
    image: str
    question: str
    answer: str  # "yes" / "no"
    prediction: str  # raw model text


@dataclass
class MmeFile:
    subtask: str
    lines: list[MmeLine] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def tsv_lines(path: Path) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(line number, tab-separated fields, None) per non-blank line of `path`, or (number, None, problem) for a
    line that is not UTF-8. A byte-order mark at the start is ignored; lines end at "\n" (or "\r\n")."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as err:
            yield (
                number,
                None,
                f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); save it as UTF-8",
            )
            continue
        yield number, text.split("\t"), None


def load_mme_results(path: str | Path) -> MmeFile:
    """One subtask's results file (the subtask is the file name's stem); bad lines are listed, not fatal."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    out = MmeFile(subtask=path.stem)
    for number, parts, problem in tsv_lines(path):
        if parts is None:
            out.problems.append(problem)
            continue
        if len(parts) != 4:
            out.problems.append(f"{path}:{number}: expected 4 tab-separated fields, got {len(parts)}")
            continue
        image, question, answer, prediction = parts
        if answer.strip().lower() not in ("yes", "no"):
            out.problems.append(f"{path}:{number}: ground truth {answer!r} is neither Yes nor No")
            continue
        out.lines.append(MmeLine(image, question, answer.strip().lower(), prediction))
    return out


def parse_answer(text: str) -> str:
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


@dataclass(frozen=True)
class MmeScore:
    subtask: str
    questions: int
    images: int
    acc: float | None  # percent; None: no line scored
    acc_plus: float | None  # percent
    score: float | None  # acc + acc_plus, at most 200
    other: int  # predictions that were neither yes nor no


def score_mme(results: MmeFile) -> MmeScore:
    by_image: dict[str, list[bool]] = defaultdict(list)
    other = 0
    for line in results.lines:
        pred = parse_answer(line.prediction)
        other += pred == "other"
        by_image[line.image].append(pred == line.answer)
    right = [ok for oks in by_image.values() for ok in oks]
    if not right:
        return MmeScore(results.subtask, 0, 0, None, None, None, other)
    acc = 100 * sum(right) / len(right)
    acc_plus = 100 * sum(all(oks) for oks in by_image.values()) / len(by_image)
    return MmeScore(results.subtask, len(right), len(by_image), acc, acc_plus, acc + acc_plus, other)


def score_mme_dir(
    folder: str | Path, subtasks=HALLUCINATION_SUBTASKS
) -> tuple[dict[str, MmeScore], float | None]:
    """Scores of each subtask's `<subtask>.txt` in `folder` and their total (at most 200 per subtask)."""
    folder = Path(folder)
    missing = [s for s in subtasks if not (folder / f"{s}.txt").is_file()]
    if missing:
        raise InputError(f"{folder} has no results for {missing}; expected one <subtask>.txt per subtask")
    scores = {s: score_mme(load_mme_results(folder / f"{s}.txt")) for s in subtasks}
    return scores, mme_total(s.score for s in scores.values())


def mme_total(scores: Iterable[float | None]) -> float | None:
    """The sum of subtask scores, or None (n/a) when a subtask has none."""
    scores = list(scores)
    return None if any(s is None for s in scores) else sum(scores)
