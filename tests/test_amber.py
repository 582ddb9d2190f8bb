"""AMBER generative scoring on small files in the official formats, against hand-computed metrics."""

from __future__ import annotations

import json
import sys
import types

import pytest

import headlab as hl
from headlab.datasets import amber

RELATIONS = {
    "dog": ["puppy"],
    "person": ["man", "woman", "people"],
    "grass": ["ground"],
    "tree": [],
    "cat": [],
    "frisbee": [],
    "car": ["vehicle"],
    "bench": [],
    "light": [],
    "bin": ["can"],
}
ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "person", "grass", "tree"], "hallu": ["cat", "frisbee"]},
    {"id": 2, "type": "generative", "truth": ["car", "tree"], "hallu": ["person", "dog"]},
    {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 4, "type": "generative", "truth": ["bench"], "hallu": ["tree"]},
]
RESPONSES = [
    {"id": 1, "response": "Two dogs play with a man on the grass. A cat watches. The light is bright."},
    {"id": 2, "response": "A vehicle parked near trees, with people and a puppy; you can see it."},
    {"id": 3, "response": "No"},  # a discriminative id
    {"id": 4, "response": None},  # not a string
    {"response": "A dog."},  # no id
    {"id": 4, "response": "An empty bench."},
]


@pytest.fixture
def amber_files(tmp_path):
    (tmp_path / "relation.json").write_text(json.dumps(RELATIONS, indent=4))
    (tmp_path / "safe_words.txt").write_text("light\nsign")  # no final newline, as the release
    (tmp_path / "annotations.json").write_text(json.dumps(ANNOTATIONS, indent=4))
    (tmp_path / "responses.json").write_text(json.dumps(RESPONSES))
    annotations, problems = amber.load_amber_generative(tmp_path / "annotations.json")
    assert not problems and sorted(annotations) == [1, 2, 4]
    assert annotations[1].truth == ("dog", "person", "grass", "tree")
    relations = amber.load_amber_relations(tmp_path / "relation.json")
    safe = amber.load_safe_words(tmp_path / "safe_words.txt")
    assert safe == {"light", "sign"}
    return tmp_path, annotations, relations, safe


def test_generative_metrics_by_hand(amber_files):
    path, annotations, relations, safe = amber_files
    score = amber.score_amber_generative(path / "responses.json", annotations, relations, safe)
    # Rule-based nouns kept (vocabulary words, singularised):
    #  [0] id 1: dog, man, grass, cat, light  ("watches" -> watch, not a vocabulary word)
    #      light: safe word, skipped (still in CHAIR's denominator); dog: truth; man: association of person
    #      -> covers person; grass: truth; cat: not truth -> hallucinated, and a hallu object -> mentioned.
    #      5 nouns, 1 hallucinated; covered dog, person, grass (3 of 4); hallu mentioned cat (1 of 2).
    #  [1] id 2: vehicle, tree, people, puppy  ("you can see": the modal "can" is not a noun)
    #      vehicle: association of car -> covers car; tree: truth; people: association of the hallu object
    #      person -> mentioned, hallucinated; puppy: association of the hallu object dog -> same.
    #      4 nouns, 2 hallucinated; covered 2 of 2; hallu mentioned 2 of 2.
    #  [2], [3], [4]: invalid (discriminative id, non-string response, no id).
    #  [5] id 4: bench -> truth. 1 noun, 0 hallucinated; covered 1 of 1; hallu mentioned 0 of 1.
    # CHAIR = (1 + 2 + 0) / (5 + 4 + 1) = 0.3
    # Cover = (3 + 2 + 1) / (4 + 2 + 1) = 6/7 (micro, as the official script; the per-response mean is 11/12)
    # Hal = 2 of 3 responses have a hallucinated noun
    # Cog = (1 + 2 + 0) / (2 + 2 + 1) = 0.6
    assert score.chair == pytest.approx(0.3)
    assert score.cover == pytest.approx(6 / 7)
    assert score.hal == pytest.approx(2 / 3)
    assert score.cog == pytest.approx(0.6)
    assert (score.n_responses, score.n_nouns, score.n_hallucinated, score.n_invalid) == (3, 10, 3, 3)
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in score.problems] == ["2", "3", "4"]
    assert "not a generative" in score.problems[0] and "string" in score.problems[1]
    assert "integer id" in score.problems[2]
    first, second, third = score.per_response
    assert first.nouns == ("dog", "man", "grass", "cat", "light") and first.safe == ("light",)
    assert first.hallucinated == ("cat",) and first.covered == ("dog", "person", "grass")
    assert first.mentioned_hallu == ("cat",)
    assert second.nouns == ("vehicle", "tree", "people", "puppy")
    assert second.hallucinated == ("people", "puppy") and second.mentioned_hallu == ("person", "dog")
    assert (third.index, third.id, third.covered) == (5, 4, ("bench",))
    summary = score.as_dict()
    assert summary["chair"] == score.chair and len(summary["per_response"]) == 3
    assert json.loads(json.dumps(summary))["problems"] == list(score.problems)
    assert "per_response" not in score.as_dict(details=False)

    # the same entries as a parsed list or an {id: text} mapping give the same metrics
    as_list = amber.score_amber_generative(RESPONSES, annotations, relations, safe)
    assert (as_list.chair, as_list.cover, as_list.n_invalid) == (score.chair, score.cover, 3)
    assert as_list.problems[0].startswith("responses[2]:")
    mapping = {r["id"]: r["response"] for r in RESPONSES[:2]}
    assert amber.score_amber_generative(mapping, annotations, relations, safe).chair == pytest.approx(3 / 9)


def test_safe_words_plurals_and_official_quirks(amber_files):
    _, annotations, relations, safe = amber_files
    entries = {1: "Some lights.", 2: "Cars, more cars, and the ground."}
    score = amber.score_amber_generative(entries, annotations, relations, safe)
    light, cars = score.per_response
    # a safe word is never hallucinated but counts in CHAIR's denominator (official chair_num)
    assert light.nouns == light.safe == ("light",) and not light.hallucinated
    # every occurrence counts; "ground" is an association of grass, a truth object of id 1 only
    assert cars.nouns == ("car", "car", "ground") and cars.hallucinated == ("ground",)
    assert score.chair == pytest.approx(1 / 4) and score.hal == pytest.approx(1 / 2)
    # a safe word that is also a truth object is never covered (the official code skips it first)
    sign = amber.AmberObjects(9, truth=("sign",), hallu=())
    skipped = amber.score_amber_generative({9: "A sign."}, {9: sign}, {"sign": []}, {"sign"})
    assert (skipped.chair, skipped.cover, skipped.n_nouns) == (0.0, 0.0, 1)
    # duplicate truth objects: only the first can be covered, as in the official flags
    twice = amber.AmberObjects(7, truth=("ship", "ship"), hallu=())
    assert amber.score_amber_generative({7: "Two ships."}, {7: twice}, {"ship": []}).cover == 0.5


def test_rule_nouns():
    vocab = ["bench", "woman", "puppy", "can", "TV", "e-book", "traffic light", "people", "glass", "dog"]
    text = "Benches, women, puppies and glasses; we can see a TV, e-books, traffic lights and a trash can."
    assert amber.rule_nouns(text, vocab) == [
        "bench",
        "woman",
        "puppy",
        "glass",
        "TV",
        "e-book",
        "traffic light",
        "can",
    ]
    # people stays people (a vocabulary word); hyphenated words split when not in the vocabulary
    assert amber.rule_nouns("People and a dog-friendly park. One can see a can of soda.", vocab) == [
        "people",
        "dog",
        "can",
    ]
    assert amber.hallucination_vocabulary(RELATIONS) >= {"dog", "puppy", "can", "vehicle"}


def test_custom_nouns_and_similarity():
    objects = {1: amber.AmberObjects(1, truth=("dog",), hallu=("frisbee",))}
    relations = {"dog": [], "frisbee": [], "cat": [], "bench": [], "ball": []}
    text = "A cat, a bench and a ball."
    exact = amber.score_amber_generative({1: text}, objects, relations)
    assert exact.chair == 1.0 and exact.cover == 0.0 and exact.cog == 0.0

    scores = {("cat", "dog"): 0.9, ("bench", "frisbee"): 0.85, ("ball", "frisbee"): 0.8}

    def similarity(a, b):
        return scores.get((a, b), 0.0)

    scored = amber.score_amber_generative({1: text}, objects, relations, similarity=similarity)
    # cat ~ dog (0.9 > 0.8): correct, covers dog; bench ~ frisbee (0.85): marks frisbee, still hallucinated
    # (no similar truth object); ball ~ frisbee is exactly 0.8, not above the threshold: hallucinated.
    (detail,) = scored.per_response
    assert detail.hallucinated == ("bench", "ball") and detail.covered == ("dog",)
    assert scored.chair == pytest.approx(2 / 3) and scored.cover == 1.0 and scored.cog == 1.0
    stricter = amber.score_amber_generative(
        {1: text}, objects, relations, similarity=similarity, threshold=0.95
    )
    assert stricter.chair == 1.0

    # a custom extractor: its words are still filtered to the hallucination vocabulary
    custom = amber.score_amber_generative(
        {1: "ignored"}, objects, relations, nouns=lambda text: ["dog", "unicorn", "dog"]
    )
    assert custom.per_response[0].nouns == ("dog", "dog") and custom.chair == 0.0

    with pytest.raises(hl.InputError, match="nouns must be"):
        amber.score_amber_generative({1: text}, objects, relations, nouns="pos")
    with pytest.raises(hl.InputError, match="similarity must be"):
        amber.score_amber_generative({1: text}, objects, relations, similarity="wordnet")


def test_nltk_option_says_what_to_install():
    try:
        amber.nltk_noun_extractor()
    except hl.InputError as err:
        assert "python -m nltk.downloader averaged_perceptron_tagger_eng wordnet punkt_tab" in str(err)
        assert "pip install nltk" in str(err) or "not installed (" in str(err)
    else:
        pytest.skip("nltk and its data are installed here, so the missing-data error cannot occur")
    objects = {1: amber.AmberObjects(1, ("dog",), ())}
    with pytest.raises(hl.InputError, match="nltk"):
        amber.score_amber_generative({1: "A dog."}, objects, {"dog": []}, nouns="nltk")


def test_spacy_option_says_what_to_install():
    try:
        amber.spacy_similarity()
    except hl.InputError as err:
        assert "en_core_web_lg" in str(err) and "spacy download" in str(err)
    else:
        pytest.skip("spaCy and en_core_web_lg are installed here, so the missing-model error cannot occur")
    objects = {1: amber.AmberObjects(1, ("dog",), ())}
    with pytest.raises(hl.InputError, match="spacy"):
        amber.score_amber_generative({1: "A dog."}, objects, {"dog": []}, similarity="spacy")


def test_nltk_and_spacy_wiring_with_stand_ins(monkeypatch):
    """The nltk/spacy options call the official functions (stand-in modules; the real data is not here)."""
    tags = {"Two": "CD", "chase": "VBP", "a": "DT", "near": "IN", ".": "."}  # anything else: a noun
    nltk = types.ModuleType("nltk")
    nltk.word_tokenize = lambda text: text.replace(".", " .").split()
    nltk.pos_tag = lambda tokens: [(t, tags.get(t, "NN")) for t in tokens]
    stem = types.ModuleType("nltk.stem")
    stem.WordNetLemmatizer = type("L", (), {"lemmatize": lambda self, w: w[:-1] if w == "dogs" else w})
    nltk.stem = stem
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.stem", stem)
    assert amber.nltk_noun_extractor()("Two dogs chase a Cat.") == ["dog", "Cat"]  # NN* only, case kept

    class Doc:
        def __init__(self, text):
            self.text = text

        def similarity(self, other):
            return 0.9 if {self.text, other.text} == {"cat", "dog"} else 0.1

    spacy = types.ModuleType("spacy")
    spacy.load = lambda name: Doc if name == "en_core_web_lg" else None
    monkeypatch.setitem(sys.modules, "spacy", spacy)
    objects = {1: amber.AmberObjects(1, ("dog",), ())}
    relations = {"dog": [], "cat": [], "bench": []}
    score = amber.score_amber_generative(
        {1: "Two dogs chase a cat near a bench."}, objects, relations, nouns="nltk", similarity="spacy"
    )
    # nouns dog (truth), cat (similar to dog: correct), bench (similar to nothing: hallucinated)
    detail = score.per_response[0]
    assert detail.nouns == ("dog", "cat", "bench") and detail.hallucinated == ("bench",)


def test_loaders_report_problems(tmp_path):
    entries = [
        {"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
        {"id": 2, "type": "generative", "truth": "dog", "hallu": []},
        {"id": 3, "type": "discriminative-attribute-state", "truth": "yes"},
        {"id": 4, "type": "caption", "truth": [], "hallu": []},
    ]
    (tmp_path / "annotations.json").write_text(json.dumps(entries))
    annotations, problems = amber.load_amber_generative(tmp_path / "annotations.json")
    assert list(annotations) == [1] and len(problems) == 2
    assert "[1]" in problems[0] and "'caption'" in problems[1]
    (tmp_path / "relation.json").write_text(json.dumps({"dog": "puppy"}))
    with pytest.raises(hl.InputError, match="lists of words"):
        amber.load_amber_relations(tmp_path / "relation.json")
    with pytest.raises(hl.InputError, match="could not read"):
        amber.load_safe_words(tmp_path / "missing.txt")


def test_amber_score_formula():
    # the paper: AMBER = (1 - CHAIR + F1) / 2, i.e. (100 - 30 + 80) / 2 = 75 in percentages
    assert amber.amber_score(0.3, 0.8) == pytest.approx(0.75)
    assert amber.amber_score(0.0, 1.0) == 1.0
    with pytest.raises(hl.InputError, match="fractions"):
        amber.amber_score(30.0, 80.0)
