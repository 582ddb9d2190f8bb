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
caption after merging. With no caption every metric is None (n/a); otherwise an empty denominator gives 0.0.

Ids follow `headlab.ids.example_id` (integers or non-empty strings, as given). The ground truth is a JSON object,
whose keys are always strings: a key written as a plain integer ("42") stands for the integer id 42, any
other key ("000000042", "COCO_val2014_42") for that string id, so "000000042" and 42 are two images.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from headlab.datasets.records import read_records
from headlab.errors import InputError
from headlab.ids import INT64_MAX, INT64_MIN, example_id

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
_PLAIN_INT = re.compile(r"-?(0|[1-9][0-9]*)")
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
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(
                f"could not read the synonyms file {path} ({err}); save it as UTF-8 text"
            ) from None
        vocab = cls()
        for number, line in enumerate(text.splitlines(), start=1):
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
    chair_s: float | None  # None (all four): no caption
    chair_i: float | None
    recall: float | None
    length: float | None
    mentions: int
    hallucinated: int


def score_chair(
    captions: Mapping[int | str, str], truth: Mapping[int | str, set[str]], vocab: Vocabulary
) -> ChairScore:
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
    if not n:
        return ChairScore(0, None, None, None, None, 0, 0)
    return ChairScore(
        captions=n,
        chair_s=n_bad_captions / n,
        chair_i=n_hallu / n_mentions if n_mentions else 0.0,
        recall=recalled / n_truth if n_truth else 0.0,
        length=n_words / n,
        mentions=n_mentions,
        hallucinated=n_hallu,
    )


def load_captions(
    path: str | Path, *, id_key: str = "image_id", caption_key: str = "caption"
) -> tuple[dict, list]:
    records = read_records(path)
    captions, problems = {}, list(records.problems)
    for where, obj in records.items:
        try:
            image_id = example_id(obj.get(id_key))
        except InputError as err:
            problems.append(f"{path}:{where}: {id_key}: {err}")
            continue
        if not isinstance(obj.get(caption_key), str):
            problems.append(f"{path}:{where}: needs a string {caption_key!r}")
            continue
        captions[image_id] = obj[caption_key]
    return captions, problems


def truth_key(key: str) -> int | str:
    """A ground-truth key as an image id: a plain integer ("42") is the int 42, any other key stays a string."""
    if _PLAIN_INT.fullmatch(key) and INT64_MIN <= int(key) <= INT64_MAX:
        return int(key)
    return key


def load_truth(path: str | Path, vocab: Vocabulary, *, problems: list[str] | None = None) -> dict:
    """{image_id (`truth_key`): set of node words} from a JSON object of object-word lists (synonyms are
    mapped). A bad entry (not a list of words, or a word outside the vocabulary) raises InputError, or, when a
    `problems` list is given, is listed there and left out (its image then has no ground truth)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # also UnicodeDecodeError
        raise InputError(f"could not read the ground truth {path}: {err}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} must hold a JSON object {{image_id: [objects]}}")
    truth = {}
    for key, objects in raw.items():
        try:
            truth[truth_key(key)] = _truth_nodes(objects, vocab, f"{path}: image {key}")
        except InputError as err:
            if problems is None:
                raise
            problems.append(str(err))
    return truth


def _truth_nodes(objects: object, vocab: Vocabulary, where: str) -> set[str]:
    if not isinstance(objects, list) or not all(isinstance(w, str) for w in objects):
        raise InputError(f"{where}: expected a list of object words")
    unknown = [w for w in objects if vocab.node(w.lower()) is None]
    if unknown:
        raise InputError(f"{where}: {unknown} are not in the object vocabulary")
    return {vocab.node(w.lower()) for w in objects}
