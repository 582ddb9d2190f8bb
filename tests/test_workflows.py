"""The research workflows of the README, end to end through the CLI and nothing else.

LLaVA (README "From a prompt file to a report, without Python"): `headlab demo` writes the scene images, the
README's prompt file asks about them, `headlab capture --condition with_image,no_image` stores both
conditions (every tower, tokens, images, labels), a rerun resumes, `headlab analyze vhd` reads them, the
dashboard's A - B and patterns work on the store, and `headlab report pope` keeps the same condition names
in its VHD store. ViT: a prompt file whose lines hold only an image is captured with the vision tower's
attention, images and no token ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from headlab.cli import app
from headlab.conditions import NO_IMAGE, WITH_IMAGE
from headlab.datasets import scenes
from headlab.store import Store

README = Path(__file__).parent.parent / "README.md"
QUESTIONS = [  # the README's prompt file: three POPE-style questions on the two scenes `headlab demo` draws
    {
        "id": "cup-0",
        "image": "scene_00000.png",
        "label": "yes",
        "prompt": "USER: <image>\nIs there a cup in the image? ASSISTANT:",
    },
    {
        "id": "apple-0",
        "image": "scene_00000.png",
        "label": "no",
        "prompt": "USER: <image>\nIs there an apple in the image? ASSISTANT:",
    },
    {
        "id": "car-1",
        "image": "scene_00001.png",
        "label": "yes",
        "prompt": "USER: <image>\nIs there a car in the image? ASSISTANT:",
    },
]
IMAGE_TOKENS = 16  # the zoo LLaVA expands <image> to 16 image tokens

runner = CliRunner()


def _run(*args: str, exit_code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    return result.output


def test_the_readme_prompt_file_is_the_tested_one():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"cat > out/workflow/questions\.jsonl <<'EOF'\n(.*?)\nEOF", text, re.S)
    assert block, "the README's workflow section lost its prompt file"
    assert [json.loads(line) for line in block.group(1).splitlines()] == QUESTIONS


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """The README's LLaVA path up to the capture: (folder, store path, capture output)."""
    root = tmp_path_factory.mktemp("workflow")
    demo = root / "demo"
    _run("demo", "--out", str(demo))
    for scene in scenes.make_scenes(2):  # the scenes the demo drew, the ones the questions ask about
        assert (demo / scene.filename).is_file()
    data = demo / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    store = root / "store"
    args = ("capture", "--model", "zoo:llava", "--data", str(data), "--out", str(store))
    first = _run(*args, "--condition", f"{WITH_IMAGE},{NO_IMAGE}")
    return root, store, first, args


def test_capture_stores_both_conditions_and_resumes(workflow):
    _, path, first, args = workflow
    assert "6 captured, 0 already in the store, 0 bad" in first
    again = _run(*args, "--condition", WITH_IMAGE, "--condition", NO_IMAGE)
    assert "0 captured, 6 already in the store, 0 bad" in again
    store = Store.open(path)
    assert store.conditions() == [NO_IMAGE, WITH_IMAGE]
    ex = store.examples()
    assert set(ex[ex.condition == WITH_IMAGE].tower) == {"lm", "vision"}  # every tower by default
    assert set(ex[ex.condition == NO_IMAGE].tower) == {"lm"}  # no image: the vision tower never runs
    assert len(ex) == 3 * 2 + 3 and store.verify().ok
    assert set(store.head_stats(condition=WITH_IMAGE).tower) == {"lm", "vision"}
    for tower in ("lm", "vision"):
        rows = store.pattern("cup-0", 0, 0, tower=tower, condition=WITH_IMAGE)
        np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-5)


def test_tokens_images_and_labels_are_stored(workflow):
    _, path, _, _ = workflow
    store = Store.open(path)
    ex = store.examples()
    for q in QUESTIONS:
        with_image = store.example_info(q["id"], condition=WITH_IMAGE)
        without = store.example_info(q["id"], condition=NO_IMAGE)
        lm_rows = ex[(ex.example == q["id"]) & (ex.tower == "lm")].set_index("condition").n_tokens
        assert len(with_image.tokens) == len(with_image.token_ids) == lm_rows[WITH_IMAGE]
        assert with_image.tokens.count("<image>") == IMAGE_TOKENS
        assert "<image>" not in without.tokens and len(without.tokens) == lm_rows[NO_IMAGE]
        assert without.prompt == q["prompt"].replace("<image>", "")  # the text-only rule
        assert [t for t in with_image.tokens if t != "<image>"] == list(without.tokens)
        assert with_image.image == q["image"] and without.image is None
        assert with_image.label == without.label == q["label"]
        assert store.tokens(q["id"], condition=NO_IMAGE) == list(without.tokens)
        thumbnail = store.image(q["id"])  # any condition that holds its image
        assert thumbnail is not None and max(thumbnail.size) <= 96
        assert store.image(q["id"], condition=NO_IMAGE) is None
    for condition in (WITH_IMAGE, NO_IMAGE):  # the bulk read is the per-example read, for every example
        bulk = store.example_infos(condition=condition)
        assert set(bulk) == {q["id"] for q in QUESTIONS}
        assert all(bulk[i] == store.example_info(i, condition=condition) for i in bulk)
    info = _run("store", "info", str(path))
    assert "tokens 3, images 3, labels 3" in info
    one = _run("store", "info", str(path), "--example", "car-1", "--condition", NO_IMAGE)
    assert "'car'" in one and 'label: "yes"' in one and "image: -" in one


def test_analyze_vhd_and_the_dashboard_read_the_conditions(workflow):
    from headlab.dashboards.app import make_app
    from headlab.dashboards.data import BrowserData, Source

    _, path, _, _ = workflow
    _run("analyze", "vhd", str(path))
    store = Store.open(path)
    vhd = store.result("vhd")
    assert len(vhd) == 2 * 4 and set(vhd.n) == {3}  # 2 layers x 4 heads, every example under both
    assert store.result_params("vhd") == {"with_condition": WITH_IMAGE, "without_condition": NO_IMAGE}
    make_app(store)  # what `headlab dash` serves
    data = BrowserData(store)
    diff = data.difference(Source(kind="stat", name="entropy"), "lm", WITH_IMAGE, NO_IMAGE)
    assert diff.shape == (2, 4) and np.isfinite(diff).all() and np.abs(diff).max() > 0
    view = data.pattern("cup-0", 0, 1, tower="vision", condition=WITH_IMAGE, query=None)
    assert view.rows.shape[0] == view.rows.shape[1]


def test_report_pope_keeps_the_same_condition_names(workflow):
    root, _, _, _ = workflow
    out = root / "pope"
    _run("report", "pope", "--out", str(out), "--n", "2", "--interventions", "none", "--vhd-images", "1")
    vhd_store = Store.open(out / "vhd_store")
    assert vhd_store.conditions() == [NO_IMAGE, WITH_IMAGE]
    assert vhd_store.tokens(0, condition=WITH_IMAGE).count("<image>") == IMAGE_TOKENS
    assert vhd_store.image(0) is not None
    info = vhd_store.example_info(0, condition=WITH_IMAGE)  # the question's label and the plain answer
    first = json.loads((out / "data" / "pope_random.json").read_text().splitlines()[0])
    assert info.label == first["label"] and info.answer is not None and info.answer.strip()
    _run("analyze", "vhd", str(out / "vhd_store"))


def test_vit_lines_with_only_an_image(tmp_path):
    images = tmp_path / "pictures"
    images.mkdir()
    made = scenes.make_scenes(3, seed=5)
    for scene in made:
        scenes.render(scene).save(images / scene.filename)
    data = tmp_path / "images.jsonl"
    lines = [{"image": s.filename} for s in made[:2]] + [{"id": 9, "image": made[2].filename, "label": "x"}]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "store"
    args = ("capture", "--model", "zoo:vit", "--data", str(data), "--images", str(images), "--out", str(out))
    assert "3 captured" in _run(*args)
    store = Store.open(out)
    assert store.committed() == {0, 1, 9} and set(store.examples().tower) == {"vision"}
    n = int(store.examples().n_tokens.iloc[0])
    assert store.pattern(9, 3, 2, tower="vision").shape == (n, n)  # the encoder's attention, every layer
    info = store.example_info(9)
    assert info.tokens is None and info.token_ids is None and info.prompt is None
    assert info.image == made[2].filename and info.label == "x" and store.image(0) is not None
    refused = runner.invoke(app, [*args, "--condition", NO_IMAGE])
    assert refused.exit_code == 2 and "a vision model has no text" in refused.output
    no_vhd = runner.invoke(app, ["analyze", "vhd", str(out)])
    assert no_vhd.exit_code == 2 and "Traceback" not in no_vhd.output
    assert "image: scene_" in _run("store", "info", str(out), "--example", "9")
    assert "'x' is not one" in _run("store", "info", str(out), "--example", "x", exit_code=2)


def test_a_condition_name_within_a_typo_of_a_known_one_is_refused():
    from headlab.conditions import parse_conditions
    from headlab.errors import InputError

    assert [c.name for c in parse_conditions(["with_image,no_image", "mine+vhr"])] == [
        WITH_IMAGE,
        NO_IMAGE,
        "mine+vhr",
    ]
    for typo in ("with-image", "no_images", "With_Image"):
        with pytest.raises(InputError, match="looks like"):
            parse_conditions([typo])
