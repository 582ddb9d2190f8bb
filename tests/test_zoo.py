"""The trained zoo: the shipped weights load by name and show what their recipes promise, measured against
the generators' ground truth through headlab's own probe; recipes are deterministic; the CLI lists and
trains. Thresholds sit well below the shipped models' measured values (see zoo.json) and far above chance."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import headlab as hl
from headlab.cli import app
from headlab.datasets import scenes, synthetic
from headlab.zoo import llava as llava_recipe
from headlab.zoo import lm as lm_recipe
from headlab.zoo import vit as vit_recipe
from headlab.zoo.vocab import split_words, word_tokenizer


@pytest.fixture(scope="module")
def zoo_lm():
    return hl.load("zoo:lm")


def _repeated_tokens(lm, n: int = 32, length: int = 10, seed: int = 5):
    """`<s> t1..tL t1..tL` batches of distinct random "w<i>" tokens (the induction ground truth)."""
    rng = random.Random(seed)
    rows = [[f"w{i}" for i in rng.sample(range(64), length)] for _ in range(n)]
    return lm.tokenizer([" ".join(r + r) for r in rows], return_tensors="pt")


def test_zoo_lm_has_previous_token_induction_and_sink_heads(zoo_lm):
    length = 10
    inputs = _repeated_tokens(zoo_lm, length=length)
    with torch.no_grad(), hl.capture(zoo_lm, stats=hl.Stats(which=("alpha",)), patterns=hl.Select()) as rec:
        zoo_lm.model(**inputs)
    n = inputs["input_ids"].shape[1]
    second = torch.arange(1 + length, n)
    scores = {}
    for layer in range(zoo_lm.n_layers):
        for head in range(zoo_lm.n_heads):
            probs = torch.stack([rec.pattern(e, layer, head).probs for e in range(len(inputs["input_ids"]))])
            probs = probs.mean(0)
            q = torch.arange(1, n)
            scores[layer, head] = (
                probs[q, q - 1].mean().item(),  # previous token
                probs[second, second - length + 1].mean().item(),  # induction
            )
    prev_head = max(scores, key=lambda h: scores[h][0])
    induction_head = max(scores, key=lambda h: scores[h][1])
    assert scores[prev_head][0] > 0.5, scores
    assert scores[induction_head][1] > 0.4, scores
    assert induction_head[0] > prev_head[0]  # K-composition: the induction head reads a previous-token head
    alpha = rec.head_stats.query("stat == 'alpha' and role == 'pos:0'")
    assert alpha.value.max() > 0.3  # a first-token sink (Gu et al.'s received-attention score)


def test_zoo_lm_solves_its_tasks_far_above_chance(zoo_lm):
    acc = lm_recipe.task_accuracy(zoo_lm.model, zoo_lm.tokenizer, n=100)
    assert acc["ioi_acc"] > 0.9  # chance: 0.5 between the indirect object and the subject
    assert acc["ioi_logit_diff"] > 2.0
    assert acc["induction_acc"] > 0.6  # chance: 1/64
    assert acc["greater_than_prob_diff"] > 0.5


def test_zoo_lm_card_matches_a_fresh_evaluation(zoo_lm):
    card = hl.zoo.card("lm")
    fresh = lm_recipe.task_accuracy(zoo_lm.model, zoo_lm.tokenizer)
    for key, value in fresh.items():
        assert card["evaluation"]["tasks"][key] == pytest.approx(value, abs=1e-6)


def test_zoo_llava_answers_pope_and_hallucinates_more_on_adversarial():
    lm = hl.load("zoo:llava")
    assert lm.family is hl.Family.LVLM
    pope = llava_recipe.evaluate_llava(lm.model, lm.processor, n_images=100)
    assert pope["random"]["accuracy"] > 0.75  # chance: 0.5 (half the answers are yes)
    assert pope["adversarial"]["accuracy"] < pope["random"]["accuracy"] - 0.05
    assert pope["adversarial"]["yes_ratio"] > pope["random"]["yes_ratio"]  # the "Yes" of hallucination


def test_zoo_llava_prompt_expansion_matches_the_processor():
    lm = hl.load("zoo:llava")
    prompt = llava_recipe.conversation(scenes.question("apple"))
    image = scenes.render(scenes.make_scenes(1)[0])
    by_processor = lm.processor(text=prompt, images=image, return_tensors="pt")["input_ids"][0].tolist()
    assert by_processor == llava_recipe.encode(lm.processor.tokenizer, prompt)[0]


def test_zoo_vit_names_the_objects():
    lm = hl.load("zoo:vit")
    result = vit_recipe.evaluate_vit(lm.model, lm.processor, n_images=200)
    assert result["label_accuracy"] > 0.9  # always-absent would score 0.7
    assert result["exact_match"] > 0.5


def test_recipes_are_deterministic(tmp_path):
    a = hl.zoo.train("vit", tmp_path / "a", steps=4)
    b = hl.zoo.train("vit", tmp_path / "b", steps=4)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    card = json.loads((a / "zoo.json").read_text())
    assert card["training"]["steps"] == 4 and "exact_match" in card["evaluation"]


def test_lm_corpus_and_vocabulary_cover_every_task():
    texts = lm_recipe.corpus(0)
    tokenizer = word_tokenizer(texts, extra=lm_recipe.vocabulary())
    unk = tokenizer.unk_token_id
    for task in synthetic.TASKS:
        for ex in lm_recipe._examples(task, 20, seed=99):
            ids = tokenizer(f"{ex.prompt} {ex.answer}")["input_ids"]
            assert unk not in ids, (task, ex.prompt)


def test_word_tokenizer_keeps_answers_single_tokens():
    assert split_words("gave a drink to Mary, w17 w5 from 1732") == [
        *["gave", "a", "drink", "to", "Mary", ","],
        "w17",
        "w5",
        "from",
        "17",
        "32",
    ]
    tok = word_tokenizer(["When Mary and John", "the year 1732"])
    assert tok.convert_ids_to_tokens(tok("year 1732")["input_ids"]) == ["<s>", "year", "17", "32"]
    assert len(tok(" Mary", add_special_tokens=False)["input_ids"]) == 1


def test_cli_zoo_list_and_train(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["zoo", "list"])
    assert listed.exit_code == 0
    for name in hl.zoo.ZOO:
        assert name in listed.output
    trained = runner.invoke(app, ["zoo", "train", "vit", "--steps", "2", "--out", str(tmp_path / "v")])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "v" / "model.safetensors").is_file()
    unknown = runner.invoke(app, ["zoo", "train", "nope"])
    assert unknown.exit_code == 2 and "no zoo model named" in unknown.output


def test_unknown_or_unbuilt_zoo_names_get_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(hl.HeadlabError, match="no zoo model named 'nope'"):
        hl.load("zoo:nope")
    monkeypatch.setattr("headlab.zoo.registry.WEIGHTS", tmp_path)
    with pytest.raises(hl.ModelLoadError, match="headlab zoo train lm"):
        hl.load("zoo:lm")
