"""AMBER (Wang et al., 2023; github.com/junyangwang0410/AMBER): the discriminative and generative tasks.

`annotations.json` is a list indexed by id - 1. Discriminative entries carry `type` and `truth` ("yes"/"no");
generative entries (ids 1..1004 in the release) carry `truth` (objects in the image) and `hallu` (objects a
model is likely to hallucinate there). Responses are a JSON list of {id, response}.

Discriminative: yes/no questions scored with "No" as the positive class. The official scorer matches exactly
"Yes" or "No", so raw model text goes through `normalize_yes_no` first (the first word, case-insensitive;
anything else stays invalid and counts as wrong). Metrics overall and per dimension: existence
(discriminative-hallucination), attribute (state, number, action) and relation: accuracy, precision = correct
No / predicted No, recall = correct No / truth No, F1.

Generative: `score_amber_generative` follows the official `inference.py` step by step (semantics below, with
where headlab departs from it). `relation.json` maps a word to its associated words; its keys and values
together are the hallucination vocabulary. `safe_words.txt` lists words that are never judged.

1. Nouns of a response. Official: NLTK `word_tokenize` + `pos_tag`, tags starting with NN, WordNet lemma
   (case-sensitive: a capitalised "Dogs" stays "Dogs"). That needs NLTK data, downloaded from GitHub, so the
   default here (`nouns="rules"`) is rule-based instead: lowercase word tokens (hyphenated words kept whole
   when they are vocabulary words, else split), each singularised by CHAIR's rule-based `singularize` unless
   already a vocabulary word, greedy bigram merges when the vocabulary has two-word entries, and every token
   that is then a vocabulary word counts, matched case-insensitively. Unlike NN tagging it cannot tell parts
   of speech apart, so a vocabulary word used as a verb or adjective counts as a noun ("they watch", "a hot
   day", "a sound structure"); the one exception is the modal "can" (a vocabulary word, an association of
   "bin"), counted only after an article, a possessive or a noun modifier ("a can", "trash can") or before
   "of" ("we can see" is not a noun; "that can be seen" is not either, at the cost of "that can"). Lemmas
   can differ too: plural vocabulary entries ("slippers", "chopsticks") match as written, where WordNet
   would reduce them to a singular outside the vocabulary, and sentence-initial capitals are lowercased.
   `nouns="nltk"` runs the official extraction when nltk and its data are installed; `nouns=` also takes a
   callable text -> words.
2. Keep the nouns in the hallucination vocabulary (every occurrence, duplicates counted).
3. Judge each kept noun against the response's annotation. A safe word is skipped: never hallucinated, but
   still counted in CHAIR's denominator, and it marks no truth object as covered (the official code checks
   safe words first, so e.g. "sign" as a truth object is never covered). Otherwise, the first exact match
   among the truth objects' associations then the truth objects marks that truth object covered and the
   noun is correct. Otherwise an exact match among the hallu objects' associations then the hallu objects
   marks that hallu object mentioned; then, with a similarity, the first hallu candidate scoring above the
   threshold (0.8, strict) is marked too, and the first truth candidate above it makes the noun correct and
   covers its truth object. Any noun left is hallucinated. Similarity: exact match only by default;
   `similarity="spacy"` uses en_core_web_lg as the official code does; a callable (a, b) -> float is
   accepted.
4. Metrics, over the valid responses (fractions here; the official script prints them x100, rounded):
   - CHAIR = hallucinated nouns / kept nouns, summed over all responses;
   - Cover = covered truth objects / truth objects, summed over all responses (a micro average, as the
     official `safe_cover_score / safe_cover_num`; truth lists keep their duplicates, of which only the first
     is ever covered, as in the official code);
   - Hal = responses with at least one hallucinated noun / responses;
   - Cog = mentioned hallu objects / hallu objects, summed over all responses (official
     `hallu_cover_score / hallu_cover_num`; a hallu object counts as mentioned even when a similar truth
     object then makes the noun correct).
   `amber_score(chair, f1)` is the paper's AMBER score, (1 - CHAIR + F1) / 2 with the discriminative F1.

Departures from the official script besides noun extraction: a truth or hallu object missing from
relation.json has no associations (the official code raises KeyError); malformed response entries (not an
object, no valid id, an id that is not a generative annotation, a non-string response) are counted and
listed with their index instead of crashing; with no valid response every metric is None (n/a), otherwise
an empty denominator gives 0.0 (the same for the discriminative scores). Ids follow `headlab.ids.example_id`
(integers or non-empty strings, as given; true, 1.0 and null are refused).
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from headlab.datasets.chair import singularize
from headlab.datasets.records import read_records
from headlab.errors import InputError
from headlab.ids import example_id

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
        if kind not in DIMENSIONS or truth not in ("yes", "no") or not _is_id(obj.get("id")):
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
    accuracy: float | None  # None: no response scored
    precision: float | None
    recall: float | None
    f1: float | None
    invalid: int  # responses that were not exactly Yes/No (counted wrong)


def _score(pairs: list[tuple[str, str]]) -> AmberScore:
    """pairs of (truth "yes"/"no", response "Yes"/"No"/other)."""
    n = len(pairs)
    if not n:
        return AmberScore(0, None, None, None, None, 0)
    correct = sum(resp.lower() == truth for truth, resp in pairs if resp in ("Yes", "No"))
    pred_no = sum(resp == "No" for _, resp in pairs)
    truth_no = sum(truth == "no" for truth, _ in pairs)
    correct_no = sum(resp == "No" and truth == "no" for truth, resp in pairs)
    precision = correct_no / pred_no if pred_no else 0.0
    recall = correct_no / truth_no if truth_no else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    invalid = sum(resp not in ("Yes", "No") for _, resp in pairs)
    return AmberScore(n, correct / n, precision, recall, f1, invalid)


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
        if not _is_id(obj.get("id")) or not isinstance(obj.get("response"), str):
            problems.append(f"{path}:{where}: needs an id (an integer or a string) and a string response")
            continue
        responses[obj["id"]] = obj["response"]
    return responses, problems


# --- generative task -------------------------------------------------------------------------------------

SIMILARITY_THRESHOLD = 0.8  # the official --similarity_score: similar when the score is strictly above it
NLTK_INSTALL = (
    "pip install nltk && python -m nltk.downloader averaged_perceptron_tagger_eng wordnet punkt_tab"
)
SPACY_INSTALL = "pip install spacy && python -m spacy download en_core_web_lg"

_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")
# "can" is a vocabulary word (an association of "bin") and, far more often, a modal verb: as a noun it
# follows an article, a possessive or a noun modifier, or comes before "of" ("this/that/one can" are left
# out: "that can be seen", "one can see").
_CAN_CUE_WORDS = (
    "a an the each every another his their its my your our "
    "trash garbage rubbish soda tin beer paint watering metal aluminum aluminium empty"
)
_CAN_CUES = frozenset(_CAN_CUE_WORDS.split())


def _is_id(value: object) -> bool:
    """`value` follows the id rule of `headlab.ids.example_id`."""
    try:
        example_id(value)
    except InputError:
        return False
    return True


def _is_word_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(w, str) for w in value)


@dataclass(frozen=True)
class AmberObjects:
    """A generative entry: the objects in the image and the likely hallucinations, in the file's order."""

    id: int
    truth: tuple[str, ...]
    hallu: tuple[str, ...]


def load_amber_generative(path: str | Path) -> tuple[dict[int, AmberObjects], list[str]]:
    """Generative entries by id, and problems (discriminative entries are skipped silently)."""
    records = read_records(path)
    entries: dict[int, AmberObjects] = {}
    problems = list(records.problems)
    for index, obj in records.items:
        kind = obj.get("type")
        if kind in DIMENSIONS:
            continue
        oid, truth, hallu = obj.get("id"), obj.get("truth"), obj.get("hallu")
        if kind != "generative" or not _is_id(oid) or not _is_word_list(truth) or not _is_word_list(hallu):
            problems.append(
                f"{path}[{index}]: not a generative AMBER entry (type {kind!r}; "
                "needs an id and word lists 'truth' and 'hallu')"
            )
            continue
        if oid in entries:
            problems.append(f"{path}[{index}]: id {oid} appears again; the later entry is kept")
        entries[oid] = AmberObjects(oid, tuple(truth), tuple(hallu))
    return entries, problems


def load_amber_relations(path: str | Path) -> dict[str, tuple[str, ...]]:
    """`relation.json`: {word: [associated words]} (words kept as written, e.g. "TV")."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: also JSON and UTF-8 errors
        raise InputError(f"could not read the AMBER word associations {path}: {err}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} must hold a JSON object {{word: [associated words]}}")
    bad = [key for key, words in raw.items() if not _is_word_list(words)]
    if bad:
        raise InputError(f"{path}: the associations of {bad[:5]} must be lists of words")
    return {key: tuple(words) for key, words in raw.items()}


def load_safe_words(path: str | Path) -> frozenset[str]:
    """`safe_words.txt`: one word per line (blank lines and surrounding spaces ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"could not read the AMBER safe words {path}: {err}") from None
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def hallucination_vocabulary(relations: Mapping[str, Iterable[str]]) -> frozenset[str]:
    """The words AMBER judges: the keys and values of relation.json."""
    return frozenset(relations).union(*(set(words) for words in relations.values()))


def rule_noun_extractor(vocabulary: Iterable[str]) -> Callable[[str], list[str]]:
    """The default noun extraction (see the module docstring), returning vocabulary words as spelled there."""
    lookup: dict[str, str] = {}
    for word in sorted(vocabulary):
        lookup.setdefault(word.lower(), word)
    has_bigrams = any(" " in word for word in lookup)

    def normal(token: str) -> str:
        return token if token in lookup else singularize(token)

    def extract(text: str) -> list[str]:
        raw: list[str] = []
        for token in _TOKEN.findall(text.lower()):
            if "-" in token and normal(token) not in lookup:
                raw.extend(token.split("-"))
            else:
                raw.append(token)
        tokens = [normal(t) for t in raw]
        found, i = [], 0
        while i < len(tokens):
            if has_bigrams and i + 1 < len(tokens):
                pairs = (f"{tokens[i]} {tokens[i + 1]}", f"{raw[i]} {raw[i + 1]}")
                pair = next((p for p in pairs if p in lookup), None)
                if pair is not None:
                    found.append(lookup[pair])
                    i += 2
                    continue
            modal = raw[i] == "can" and not (
                (i > 0 and raw[i - 1] in _CAN_CUES) or (i + 1 < len(raw) and raw[i + 1] == "of")
            )
            if tokens[i] in lookup and not modal:
                found.append(lookup[tokens[i]])
            i += 1
        return found

    return extract


def rule_nouns(text: str, vocabulary: Iterable[str]) -> list[str]:
    """Vocabulary words mentioned in `text` by the rule-based extraction (every occurrence, in order)."""
    return rule_noun_extractor(vocabulary)(text)


def nltk_noun_extractor() -> Callable[[str], list[str]]:
    """The official extraction: NLTK word_tokenize + pos_tag, NN* tags, WordNet lemma (case kept).

    Raises InputError naming what is missing when nltk or its data is not installed."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer
    except ImportError as err:
        raise InputError(
            f"nouns='nltk' needs the nltk package, which is not installed; install it and its data: {NLTK_INSTALL}"
        ) from err
    lemmatizer = WordNetLemmatizer()

    def extract(text: str) -> list[str]:
        tagged = nltk.pos_tag(nltk.word_tokenize(text))
        return [lemmatizer.lemmatize(word) for word, tag in tagged if tag.startswith("NN")]

    try:
        extract("Two dogs sit on a bench.")
    except LookupError as err:
        found = re.search(r"Resource\s+(?:\x1b\[\d+m)?'?([\w./-]+)", str(err))  # 'name' or ANSI-coloured
        missing = found.group(1) if found else "a tokenizer, tagger or WordNet resource"
        raise InputError(
            f"nouns='nltk' needs NLTK data that is not installed ({missing}); "
            f"download it with: {NLTK_INSTALL.split(' && ')[1]}"
        ) from err
    return extract


def spacy_similarity(model: str = "en_core_web_lg") -> Callable[[str, str], float]:
    """The official word similarity: spaCy `nlp(a).similarity(nlp(b))` with en_core_web_lg (cached).

    Raises InputError naming what is missing when spaCy or the model is not installed."""
    try:
        import spacy
    except ImportError as err:
        raise InputError(
            f"similarity='spacy' needs the spacy package, which is not installed; install it and the "
            f"{model} model: {SPACY_INSTALL}"
        ) from err
    try:
        nlp = spacy.load(model)
    except OSError as err:
        raise InputError(
            f"similarity='spacy' needs the spaCy model {model}, which is not installed: "
            f"python -m spacy download {model}"
        ) from err
    doc = functools.cache(nlp)

    @functools.cache
    def similarity(a: str, b: str) -> float:
        with warnings.catch_warnings():  # words without vectors: spaCy warns and returns 0
            warnings.simplefilter("ignore", UserWarning)
            return float(doc(a).similarity(doc(b)))

    return similarity


@dataclass(frozen=True)
class AmberResponseDetail:
    index: int  # position in the response list (line for JSON Lines, id for a mapping)
    id: int
    nouns: tuple[str, ...]  # kept nouns, every occurrence: CHAIR's denominator
    hallucinated: tuple[str, ...]
    safe: tuple[str, ...]  # kept nouns that are safe words (never judged)
    covered: tuple[str, ...]  # truth objects mentioned
    mentioned_hallu: tuple[str, ...]  # hallu objects mentioned
    n_truth: int
    n_hallu: int


@dataclass(frozen=True)
class AmberGenerativeScore:
    chair: float | None  # hallucinated nouns / kept nouns; None (all four): no valid response
    cover: float | None  # covered truth objects / truth objects
    hal: float | None  # responses with a hallucinated noun / responses
    cog: float | None  # mentioned hallu objects / hallu objects
    n_responses: int  # valid responses scored
    n_nouns: int
    n_hallucinated: int
    n_invalid: int  # malformed entries, skipped
    problems: tuple[str, ...]  # one line per malformed entry, with its index
    per_response: tuple[AmberResponseDetail, ...]

    def as_dict(self, details: bool = True) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "per_response"}
        out["problems"] = list(self.problems)
        if details:
            out["per_response"] = [asdict(d) for d in self.per_response]
        return out


def _response_entries(
    responses: str | Path | Sequence[object] | Mapping[int, str],
) -> tuple[list[tuple[object, object]], list[str], str]:
    """(index, entry) pairs, problems already found, and the name used in problem lines."""
    if isinstance(responses, str | Path):
        records = read_records(responses)
        return list(records.items), list(records.problems), str(responses)
    if isinstance(responses, Mapping):
        return [(k, {"id": k, "response": v}) for k, v in responses.items()], [], "responses"
    return list(enumerate(responses)), [], "responses"


def _first(candidates: list[tuple[str, int]], match: Callable[[str], bool]) -> int | None:
    return next((slot for word, slot in candidates if match(word)), None)


def _judge(
    index: int,
    entry: AmberObjects,
    nouns: list[str],
    relations: Mapping[str, Sequence[str]],
    safe_words: frozenset[str],
    similar: Callable[[str, str], float] | None,
    threshold: float,
) -> AmberResponseDetail:
    """One response, step 3 of the module docstring (the official candidate order and first-match rule)."""

    def candidates(objects: tuple[str, ...]) -> list[tuple[str, int]]:
        associated = [(w, i) for i, obj in enumerate(objects) for w in relations.get(obj, ())]
        return associated + [(obj, i) for i, obj in enumerate(objects)]

    truth, hallu = candidates(entry.truth), candidates(entry.hallu)
    covered, mentioned = [False] * len(entry.truth), [False] * len(entry.hallu)
    hallucinated, safe = [], []
    for noun in nouns:
        if noun in safe_words:
            safe.append(noun)
            continue
        slot = _first(truth, noun.__eq__)
        if slot is not None:
            covered[slot] = True
            continue
        slot = _first(hallu, noun.__eq__)
        if slot is not None:
            mentioned[slot] = True
        if similar is not None:
            slot = _first(hallu, lambda w, noun=noun: similar(noun, w) > threshold)
            if slot is not None:
                mentioned[slot] = True
            slot = _first(truth, lambda w, noun=noun: similar(noun, w) > threshold)
            if slot is not None:
                covered[slot] = True
                continue
        hallucinated.append(noun)
    return AmberResponseDetail(
        index=index,
        id=entry.id,
        nouns=tuple(nouns),
        hallucinated=tuple(hallucinated),
        safe=tuple(safe),
        covered=tuple(obj for obj, hit in zip(entry.truth, covered, strict=True) if hit),
        mentioned_hallu=tuple(obj for obj, hit in zip(entry.hallu, mentioned, strict=True) if hit),
        n_truth=len(entry.truth),
        n_hallu=len(entry.hallu),
    )


def score_amber_generative(
    responses: str | Path | Sequence[object] | Mapping[int, str],
    annotations: Mapping[int, AmberObjects],
    relations: Mapping[str, Sequence[str]],
    safe_words: Iterable[str] = (),
    *,
    nouns: str | Callable[[str], Iterable[str]] = "rules",
    similarity: str | Callable[[str, str], float] | None = None,
    threshold: float = SIMILARITY_THRESHOLD,
) -> AmberGenerativeScore:
    """CHAIR, Cover, Hal and Cog of generative responses (see the module docstring for the exact rules).

    responses: a response file (JSON list or JSON Lines of {id, response}), the parsed list, or {id: text};
    every entry is scored, duplicates included, as in the official script. Entries that are not an object,
    have no valid id, have an id that is not in `annotations`, or a non-string response are skipped,
    counted in `n_invalid` and listed in `problems` with their index (so a response file that also holds
    discriminative answers lists each of them: give this scorer the generative entries only).
    annotations: from `load_amber_generative`; relations: from `load_amber_relations`.
    nouns: "rules" (default), "nltk" (the official NLTK extraction), or a callable text -> words; only
    words of the hallucination vocabulary are kept, whatever the extractor returns.
    similarity: None (exact matching only), "spacy" (en_core_web_lg, as the official code), or a callable
    (a, b) -> float; similar means strictly above `threshold`.
    """
    vocabulary = hallucination_vocabulary(relations)
    if callable(nouns):
        extract = nouns
    elif nouns == "rules":
        extract = rule_noun_extractor(vocabulary)
    elif nouns == "nltk":
        extract = nltk_noun_extractor()
    else:
        raise InputError(f"nouns must be 'rules', 'nltk' or a callable text -> words, not {nouns!r}")
    if similarity is None or callable(similarity):
        similar = similarity
    elif similarity == "spacy":
        similar = spacy_similarity()
    else:
        raise InputError(
            f"similarity must be None, 'spacy' or a callable (a, b) -> float, not {similarity!r}"
        )
    safe = frozenset(safe_words)

    entries, problems, name = _response_entries(responses)
    details = []
    for index, obj in entries:
        where = f"{name}[{index}]" if name == "responses" else f"{name}:{index}"
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected an object {{id, response}}")
            continue
        rid, text = obj.get("id"), obj.get("response")
        if not _is_id(rid):
            problems.append(f"{where}: needs an integer id or a string id, got {rid!r}")
        elif rid not in annotations:
            problems.append(f"{where}: id {rid} is not a generative AMBER entry")
        elif not isinstance(text, str):
            problems.append(f"{where}: id {rid}: the response must be a string, got {type(text).__name__}")
        else:
            kept = [w for w in extract(text) if w in vocabulary]
            details.append(_judge(index, annotations[rid], kept, relations, safe, similar, threshold))

    n = len(details)
    n_nouns = sum(len(d.nouns) for d in details)
    n_hallucinated = sum(len(d.hallucinated) for d in details)
    n_truth = sum(d.n_truth for d in details)
    n_hallu = sum(d.n_hallu for d in details)
    return AmberGenerativeScore(
        chair=(n_hallucinated / n_nouns if n_nouns else 0.0) if n else None,
        cover=(sum(len(d.covered) for d in details) / n_truth if n_truth else 0.0) if n else None,
        hal=sum(bool(d.hallucinated) for d in details) / n if n else None,
        cog=(sum(len(d.mentioned_hallu) for d in details) / n_hallu if n_hallu else 0.0) if n else None,
        n_responses=n,
        n_nouns=n_nouns,
        n_hallucinated=n_hallucinated,
        n_invalid=len(problems),
        problems=tuple(problems),
        per_response=tuple(details),
    )


def amber_score(chair: float, f1: float) -> float:
    """The paper's AMBER score, (1 - CHAIR + F1) / 2: generative CHAIR and the overall discriminative F1.

    Takes fractions, as headlab's scores hold them, and returns one; x100 it is the paper's
    (100 - CHAIR + F1) / 2 on percentages."""
    for label, value in (("chair", chair), ("f1", f1)):
        if not 0.0 <= value <= 1.0:
            raise InputError(
                f"amber_score takes fractions in [0, 1]; {label}={value} (a percentage? divide by 100)"
            )
    return (1.0 - chair + f1) / 2
