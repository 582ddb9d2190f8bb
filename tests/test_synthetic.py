"""Synthetic tasks: deterministic, and their ground truth holds by construction."""

from __future__ import annotations

import pytest

from headlab.datasets import synthetic as syn


@pytest.mark.parametrize("name", sorted(syn.TASKS))
def test_generators_are_seeded(name):
    make = syn.TASKS[name]
    assert make(5, seed=3) == make(5, seed=3)
    assert make(5, seed=3) != make(5, seed=4)


def test_induction_ground_truth():
    for ex in syn.induction(50, length=(5, 15), prefix=(0, 6), seed=1):
        tokens, first, start = ex.get("tokens"), ex.get("first_copy"), ex.get("start")
        assert len(set(tokens[start : start + first])) == first  # distinct tokens: one continuation
        assert tokens[start : start + first] == tokens[start + first :]
        seen = ex.prompt.split()
        last = seen[-1]
        assert ex.answer == tokens[tokens.index(last, start) + 1]  # the token after the earlier occurrence


def test_ioi_templates_and_corruption():
    examples = syn.ioi(40, seed=2)
    assert {e.get("template") for e in examples} == {"ABBA", "BABA"}
    for e in examples:
        io, s = e.get("io"), e.get("s")
        assert e.answer == f" {io}" and e.prompt.count(s) == 2 and e.prompt.count(io) == 1
        assert e.corrupted.count(s) == 1 and io in e.corrupted  # ABC: the subject is no longer repeated
        assert e.prompt.endswith(f"{s} gave a {e.prompt.split(' gave a ')[1].split()[0]} to")


def test_colored_objects_minimal_difference():
    for e in syn.colored_objects(30, seed=0):
        assert e.prompt.split("What color")[0] == e.corrupted.split("What color")[0]
        assert e.answer != e.corrupted_answer
        colors, things = e.get("colors"), e.get("objects")
        asked = e.prompt.split("What color is the ")[1].split("?")[0]
        assert e.answer == f" {colors[things.index(asked)]}"


def test_greater_than_and_multi_doc_and_judge():
    for e in syn.greater_than(20, seed=0):
        assert e.prompt.startswith("The ") and f"17{e.answer} to the year 17" in e.prompt
    for slot in range(5):
        for e in syn.multi_doc_qa(5, k=5, gold=slot, seed=slot):
            docs = e.prompt.split("Question:")[0]
            name = e.prompt.split(" of ")[-1].split("?")[0]
            gold_doc = f"Document [{slot + 1}]: {name} has"
            assert gold_doc in docs and e.get("gold") == slot
            assert docs.split(gold_doc)[1].split()[1] == e.answer.strip()
    for e in syn.pairwise_judge(10, seed=0):
        good = e.get("good")
        assert f"Response A: {good}" in e.prompt and f"Response B: {good}" in e.corrupted
        assert (e.answer, e.corrupted_answer) == (" A", " B")
