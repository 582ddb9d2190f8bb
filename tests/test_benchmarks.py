"""Benchmark loaders and scorers on small files in the real formats, against hand-computed metrics."""

from __future__ import annotations

import json

import pytest

import headlab as hl
from headlab.datasets import amber, mme, pope


def _pope_lines():
    labels = {1: "yes", 2: "yes", 3: "no", 4: "no", 5: "no", 6: "yes"}
    return [
        {
            "question_id": q,
            "image": f"COCO_val2014_{q:012d}.jpg",
            "text": "Is there a dog in the image?",
            "label": lab,
        }
        for q, lab in labels.items()
    ]


def test_pope_jsonl_with_bad_lines(tmp_path):
    lines = [json.dumps(x) for x in _pope_lines()]
    lines.insert(2, "{broken")
    lines.append(json.dumps({"question_id": 7, "image": "x.jpg", "text": "?", "label": "maybe"}))
    path = tmp_path / "coco_pope_adversarial.json"  # JSON Lines despite the name, as the official files
    path.write_text("\n".join(lines) + "\n")
    loaded = pope.load_pope(path)
    assert [q.question_id for q in loaded.questions] == [1, 2, 3, 4, 5, 6]
    assert len(loaded.problems) == 2
    assert f"{path}:3: not valid JSON" in loaded.problems[0] and "neither yes nor no" in loaded.problems[1]


def test_pope_json_array(tmp_path):
    path = tmp_path / "gqa_pope_seem_random.json"
    path.write_text(json.dumps(_pope_lines(), indent=2))
    assert len(pope.load_pope(path).questions) == 6


def test_pope_answer_parsing_follows_the_official_rule():
    assert pope.parse_answer("Yes, there is.") == "yes"
    assert pope.parse_answer("No.") == "no"
    assert pope.parse_answer("There is not a dog.") == "no"
    assert pope.parse_answer("Yes. There is no cat.") == "yes"  # only the text before the first period
    assert pope.parse_answer("Not at all") == "yes"  # the official rule's quirk: only No / not / no match


def test_pope_metrics_hand_computed():
    questions = [
        pope.PopeQuestion(q["question_id"], q["image"], q["text"], q["label"]) for q in _pope_lines()
    ]
    answers = {1: "Yes, there is.", 2: "No.", 3: "There is not a dog.", 4: "yes", 5: "I see no dog"}
    s = pope.score_pope(questions, answers)
    assert (s.tp, s.fp, s.tn, s.fn, s.unanswered) == (1, 1, 2, 1, 1)
    assert s.accuracy == pytest.approx(0.6) and s.precision == pytest.approx(0.5)
    assert s.recall == pytest.approx(0.5) and s.f1 == pytest.approx(0.5) and s.yes_ratio == pytest.approx(0.4)


def test_mme_hand_computed(tmp_path):
    rows = [
        ("img1.jpg", "Is there a dog? Please answer yes or no.", "Yes", "Yes"),
        ("img1.jpg", "Is there a cat? Please answer yes or no.", "No", "No, there is not."),
        ("img2.jpg", "Is there a car? Please answer yes or no.", "Yes", "yes."),
        ("img2.jpg", "Is there a bus? Please answer yes or no.", "No", "Yes"),
        ("img3.jpg", "Is there a cup? Please answer yes or no.", "Yes", "I think yes"),
        ("img3.jpg", "Is there a hat? Please answer yes or no.", "No", "no"),
    ]
    text = "\n".join("\t".join(r) for r in rows) + "\nbroken line without tabs\n"
    for sub in mme.HALLUCINATION_SUBTASKS:
        (tmp_path / f"{sub}.txt").write_text(text)
    loaded = mme.load_mme_results(tmp_path / "existence.txt")
    assert len(loaded.lines) == 6 and "existence.txt:7: expected 4 tab-separated fields" in loaded.problems[0]
    s = mme.score_mme(loaded)
    assert s.acc == pytest.approx(400 / 6) and s.acc_plus == pytest.approx(100 / 3)
    assert s.score == pytest.approx(100.0) and s.other == 1 and s.images == 3
    scores, total = mme.score_mme_dir(tmp_path)
    assert set(scores) == set(mme.HALLUCINATION_SUBTASKS) and total == pytest.approx(400.0)
    (tmp_path / "color.txt").unlink()
    with pytest.raises(hl.InputError, match="color"):
        mme.score_mme_dir(tmp_path)


def test_amber_discriminative_no_is_positive(tmp_path):
    annotations = [
        {"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
        {"id": 2, "type": "discriminative-hallucination", "truth": "no"},
        {"id": 3, "type": "discriminative-hallucination", "truth": "yes"},
        {"id": 4, "type": "discriminative-attribute-state", "truth": "no"},
        {"id": 5, "type": "relation", "truth": "yes"},
        {"id": 6, "type": "discriminative-colour", "truth": "yes"},
    ]
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    questions, problems = amber.load_amber_annotations(tmp_path / "annotations.json")
    assert sorted(questions) == [2, 3, 4, 5] and len(problems) == 1 and "discriminative-colour" in problems[0]
    raw = {2: "No, there is none.", 3: "no", 4: "Yes.", 5: "maybe"}
    (tmp_path / "responses.json").write_text(json.dumps([{"id": k, "response": v} for k, v in raw.items()]))
    responses, bad = amber.load_amber_responses(tmp_path / "responses.json")
    assert not bad and responses == raw
    scores = amber.score_amber_discriminative(
        questions, {k: amber.normalize_yes_no(v) for k, v in raw.items()}
    )
    overall = scores["overall"]
    assert (overall.n, overall.invalid) == (4, 1) and overall.accuracy == pytest.approx(0.25)
    assert overall.precision == pytest.approx(0.5) and overall.recall == pytest.approx(0.5)
    existence = scores["existence"]
    assert existence.precision == pytest.approx(0.5) and existence.recall == pytest.approx(1.0)
    assert existence.f1 == pytest.approx(2 / 3)
    assert set(scores) == {"overall", "existence", "attribute", "relation"}
    with pytest.raises(hl.InputError, match="not discriminative"):
        amber.score_amber_discriminative(questions, {1: "Yes"})


SYNONYMS = """person, man, woman, people, boy, girl, child
dog, puppy
cat, kitten
traffic light, stoplight
toilet
chair, seat, stool
teddy bear, teddybear
bear
dining table, table, desk
"""


def test_chair_hand_computed(tmp_path):
    from headlab.datasets import chair

    (tmp_path / "synonyms.txt").write_text(SYNONYMS)
    vocab = chair.Vocabulary.from_file(tmp_path / "synonyms.txt")
    captions = [
        {"image_id": 1, "caption": "A man and two dogs near a traffic light."},
        {"image_id": 2, "caption": "A baby bear sits on a toilet seat next to a teddy bear."},
        {"image_id": 3, "caption": "Kittens on a desk."},
        {"image_id": "x", "caption": 5},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    (tmp_path / "truth.json").write_text(
        json.dumps({"1": ["person", "dog"], "2": ["bear", "toilet"], "3": ["kitten", "table", "boy"]})
    )
    caps, problems = chair.load_captions(tmp_path / "captions.jsonl")
    assert sorted(caps) == [1, 2, 3] and "captions.jsonl:4" in problems[0]
    truth = chair.load_truth(tmp_path / "truth.json", vocab)
    assert truth[3] == {"cat", "dining table", "person"}
    assert chair.mentions(caps[1], vocab) == (["person", "dog", "traffic light"], 8)
    assert chair.mentions(caps[2], vocab) == (["bear", "toilet", "teddy bear"], 10)
    assert chair.mentions(caps[3], vocab) == (["cat", "dining table"], 4)
    s = chair.score_chair(caps, truth, vocab)
    assert s.chair_s == pytest.approx(2 / 3) and s.chair_i == pytest.approx(2 / 8)
    assert s.recall == pytest.approx(6 / 7) and s.length == pytest.approx(22 / 3)
    assert chair.mentions("a toilet with a seat", vocab)[0] == ["toilet"]  # seat is dropped beside toilet
    with pytest.raises(hl.InputError, match="ground-truth"):
        chair.score_chair({9: "a dog"}, truth, vocab)
    (tmp_path / "bad.json").write_text(json.dumps({"1": ["unicorn"]}))
    with pytest.raises(hl.InputError, match="unicorn"):
        chair.load_truth(tmp_path / "bad.json", vocab)
