"""VHD from a store equals the divergence the VHR intervention computes at run time; T-VHD sums the top-k;
`headlab analyze vhd STORE` saves the result into the store; `capture_vhd_conditions` stores what a browser
needs under both conditions and resumes; bad input gets a clear error."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import headlab as hl
from headlab.analyses import run_analysis
from headlab.analyses.vhd import capture_vhd_conditions, token_vhd, vhd_per_example, vhd_per_head
from headlab.cli import app
from headlab.conditions import NO_IMAGE, WITH_IMAGE
from headlab.datasets import scenes
from headlab.inputs import text_only_prompt
from headlab.interventions import VHR, intervene
from headlab.zoo import llava as llava_recipe

QUESTIONS = ("apple", "car", "tree")


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    lm = hl.load("zoo:llava")
    store = hl.Store.create(tmp_path_factory.mktemp("vhd") / "store", lm)
    made = scenes.make_scenes(len(QUESTIONS), prior=0.5, seed=2)
    prompts = [llava_recipe.conversation(scenes.question(o)) for o in QUESTIONS]
    images = [scenes.render(s) for s in made]
    capture_vhd_conditions(lm, store, prompts, images)
    return lm, store, prompts, images


@torch.no_grad()
def test_store_vhd_equals_the_runtime_divergence_of_vhr(filled):
    lm, store, prompts, images = filled
    frame = vhd_per_example(store)
    for example, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        inputs = lm.processor(text=[prompt], images=[image], return_tensors="pt")
        with intervene(lm, VHR()) as runner:
            lm.model(**inputs)
        runtime = runner.patches[0].vhd[0][0]  # layer 0: no reinforcement below it yet
        stored = frame[(frame.example == example) & (frame.layer == 0)].sort_values("head").vhd
        torch.testing.assert_close(
            torch.tensor(stored.to_numpy()).float(), runtime.float(), atol=1e-4, rtol=1e-4
        )


def test_per_head_and_token_vhd(filled):
    _, store, _, _ = filled
    per_example = vhd_per_example(store)
    per_head = vhd_per_head(store)
    assert len(per_head) == 2 * 4 and set(per_head.n) == {len(QUESTIONS)}
    manual = per_example.groupby(["layer", "head"]).vhd.mean().to_numpy()
    torch.testing.assert_close(torch.tensor(per_head.vhd.to_numpy()), torch.tensor(manual))
    t = token_vhd(store, top_k=1)  # top-1 per layer: the largest VHD of each layer, summed
    want = per_example.groupby(["example", "layer"]).vhd.max().groupby("example").sum()
    torch.testing.assert_close(torch.tensor(t.t_vhd.to_numpy()), torch.tensor(want.to_numpy()))


def test_analyze_cli_saves_the_result(filled):
    _, store, _, _ = filled
    runner = CliRunner()
    done = runner.invoke(app, ["analyze", "vhd", str(store.root)])
    assert done.exit_code == 0, done.output
    assert "vhd" in store.results()
    assert len(store.result("vhd")) == 8 and store.result_params("vhd")["with_condition"] == "with_image"
    listed = runner.invoke(app, ["analyze", "list"])
    assert listed.exit_code == 0 and "vhd" in listed.output
    bad = runner.invoke(app, ["analyze", "vhd", str(store.root), "-o", "nope=1"])
    assert bad.exit_code == 2 and "has no option" in bad.output
    with pytest.raises(hl.SelectionError, match="with_condition=vhr is not a condition in"):
        run_analysis("vhd", store, with_condition="vhr")


def test_capture_vhd_conditions_stores_what_a_browser_needs_and_resumes(filled):
    lm, store, prompts, images = filled
    assert store.conditions() == [NO_IMAGE, WITH_IMAGE]
    ex = store.examples()
    assert set(ex[ex.condition == WITH_IMAGE].tower) == {"lm", "vision"}
    assert set(store.head_stats(condition=NO_IMAGE).tower) == {"lm"}
    for example, prompt in enumerate(prompts):
        with_image = store.example_info(example, condition=WITH_IMAGE)
        without = store.example_info(example, condition=NO_IMAGE)
        assert with_image.prompt == prompt and without.prompt == text_only_prompt(lm, prompt)
        assert with_image.tokens.count("<image>") == lm.tokens_per_image and "<image>" not in without.tokens
        assert store.image(example) is not None and store.image(example, condition=NO_IMAGE) is None
        assert store.pattern(example, 1, 0, condition=NO_IMAGE).shape[0] == len(without.tokens)
    shards = len(store.shard_ids())
    capture_vhd_conditions(lm, store, prompts, images)  # a rerun: every pair is committed
    assert len(store.shard_ids()) == shards
    with pytest.raises(hl.InputError, match="VHD compares a vision-language model"):
        capture_vhd_conditions(hl.load("zoo:vit"), store, prompts, images)
