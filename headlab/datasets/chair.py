"""CHAIR (Rohrbach et al., 2018) as used by OPERA / VHR / CCA: object hallucination in captions.

Inputs, all from files:
- captions: JSON Lines or a JSON list of {image_id, caption} (key names configurable);
- the object vocabulary: a synonyms file, one object per line, comma-separated, the first word being the
  canonical "node word" (the format of the original `synonyms.txt`, 80 COCO categories);
- ground truth: a JSON object {image_id: [object words...]} (node words or synonyms; in the original, the
  union of COCO instance annotations and the objects mentioned in the reference captions).

Caption -> mentioned objects: lowercase word tokens, each singularised by rule (the original CHAIR used
pattern.en's `singularize`; OPERA's copy uses NLTK's WordNet lemmatiser, whose data cannot be downloaded
here, so headlab follows the original), then a greedy left-to-right bigram merge for two-word vocabulary
entries (traffic light, teddy bear, hot dog, cell phone, ...) and the special cases "baby/adult <animal>" ->
animal, "passenger jet/train" -> jet/train, "toilet seat" -> toilet, "bow tie" -> tie; "seat" is dropped
when "toilet" is mentioned. Every mention counts (duplicates kept).

Metrics (x100 when reported): CHAIR_i = hallucinated mentions / mentions; CHAIR_s = captions with a
hallucinated mention / captions; recall = sum |GT & mentioned| / sum |GT|; length = mean word tokens per
caption after merging.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from headlab.datasets.records import read_records
from headlab.errors import InputError

_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "knives": "knife",
    "wives": "wife",
    "leaves": "leaf",
    "halves": "half",
    "shelves": "shelf",
    "loaves": "loaf",
    "giraffes": "giraffe",
    "skis": "ski",
    "buses": "bus",
    "glasses": "glass",
    "dishes": "dish",
}
_ANIMALS = {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal"}
_RENAMES = {
    ("passenger", "jet"): "jet",
    ("passenger", "train"): "train",
    ("toilet", "seat"): "toilet",
    ("bow", "tie"): "tie",
}


def singularize(word: str) -> str:
    """Rule-based English singular (irregulars, -ies, -ves, -(s|x|z|ch|sh)es, -s; keeps -ss/-us/-is)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("ves"):
        return word[:-3] + "f"
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


@dataclass
class Vocabulary:
    """Synonym -> node word, for single words and two-word entries."""

    node_of: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"synonyms file {path} does not exist")
        vocab = cls()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            words = [w.strip().lower() for w in line.split(",") if w.strip()]
            if not words:
                continue
            for w in words:
                if w in vocab.node_of and vocab.node_of[w] != words[0]:
                    raise InputError(f"{path}:{number}: {w!r} is already a synonym of {vocab.node_of[w]!r}")
                vocab.node_of[w] = words[0]
        if not vocab.node_of:
            raise InputError(f"synonyms file {path} is empty")
        return vocab

    def node(self, word: str) -> str | None:
        return self.node_of.get(word) or self.node_of.get(singularize(word))


def words_of(caption: str, vocab: Vocabulary) -> list[str]:
    """Word tokens after singularising and the bigram merges (what CHAIR's length counts)."""
    raw = re.findall(r"[a-z]+", caption.lower())
    tokens = [w if w in vocab.node_of else singularize(w) for w in raw]
    merged, i = [], 0
    while i < len(tokens):
        pair = (tokens[i], tokens[i + 1]) if i + 1 < len(tokens) else None
        if pair and f"{pair[0]} {pair[1]}" in vocab.node_of:
            merged.append(f"{pair[0]} {pair[1]}")
            i += 2
        elif pair and pair in _RENAMES:
            merged.append(_RENAMES[pair])
            i += 2
        elif pair and pair[0] in ("baby", "adult") and pair[1] in _ANIMALS:
            merged.append(pair[1])
            i += 2
        else:
            merged.append(tokens[i])
            i += 1
    return merged


def mentions(caption: str, vocab: Vocabulary) -> tuple[list[str], int]:
    """(node words mentioned, duplicates kept; number of word tokens after merging)."""
    words = words_of(caption, vocab)
    kept = [w for w in words if w != "seat"] if "toilet" in words else words
    return [n for w in kept if (n := vocab.node(w)) is not None], len(words)


@dataclass(frozen=True)
class ChairScore:
    captions: int
    chair_s: float
    chair_i: float
    recall: float
    length: float
    mentions: int
    hallucinated: int


def score_chair(captions: Mapping[int, str], truth: Mapping[int, set[str]], vocab: Vocabulary) -> ChairScore:
    """CHAIR over captions whose image has ground truth (images without it raise an InputError)."""
    missing = sorted(set(captions) - set(truth))
    if missing:
        raise InputError(f"no ground-truth objects for images {missing[:5]}; add them to the truth file")
    n_mentions = n_hallu = n_bad_captions = n_words = recalled = n_truth = 0
    for image_id, caption in captions.items():
        gt = truth[image_id]
        nodes, length = mentions(caption, vocab)
        bad = [n for n in nodes if n not in gt]
        n_mentions += len(nodes)
        n_hallu += len(bad)
        n_bad_captions += bool(bad)
        n_words += length
        recalled += len(gt & set(nodes))
        n_truth += len(gt)
    n = len(captions)
    return ChairScore(
        captions=n,
        chair_s=n_bad_captions / n if n else 0.0,
        chair_i=n_hallu / n_mentions if n_mentions else 0.0,
        recall=recalled / n_truth if n_truth else 0.0,
        length=n_words / n if n else 0.0,
        mentions=n_mentions,
        hallucinated=n_hallu,
    )


def load_captions(
    path: str | Path, *, id_key: str = "image_id", caption_key: str = "caption"
) -> tuple[dict, list]:
    records = read_records(path)
    captions, problems = {}, list(records.problems)
    for where, obj in records.items:
        if not isinstance(obj.get(id_key), int) or not isinstance(obj.get(caption_key), str):
            problems.append(f"{path}:{where}: needs an integer {id_key!r} and a string {caption_key!r}")
            continue
        captions[obj[id_key]] = obj[caption_key]
    return captions, problems


def load_truth(path: str | Path, vocab: Vocabulary) -> dict[int, set[str]]:
    """{image_id: set of node words} from a JSON object of object-word lists (synonyms are mapped)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"could not read the ground truth {path}: {err}") from err
    if not isinstance(raw, dict):
        raise InputError(f"{path} must hold a JSON object {{image_id: [objects]}}")
    truth = {}
    for key, objects in raw.items():
        nodes = {vocab.node(w.lower()) for w in objects}
        unknown = [w for w in objects if vocab.node(w.lower()) is None]
        if unknown:
            raise InputError(f"{path}: image {key}: {unknown} are not in the object vocabulary")
        truth[int(key)] = nodes
    return truth
