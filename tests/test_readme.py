"""The README's Python examples run as written (with the hub id swapped for a local tiny model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


_ZOO_LLAVA_INPUTS = (
    "import headlab as hl\nfrom headlab.datasets import scenes\n"
    "lm = hl.load('zoo:llava')\n"
    "inputs = lm.processor(text=['USER: <image>\\nIs there an apple in the image? ASSISTANT:'], "
    "images=[scenes.render(scenes.make_scenes(1)[0])], return_tensors='pt')\n"
)


def test_quick_start_runs(model_dirs):
    code = _blocks()[0].replace('hl.load("gpt2")', f"hl.load({model_dirs['gpt2']!r})")
    code = (
        code.replace("layers=[5]", "layers=[1]").replace("layer=5", "layer=1").replace("layer=3", "layer=1")
    )
    scope: dict = {}
    exec(compile(code, "README quick start", "exec"), scope)  # layer numbers fitted to the 2-layer model
    rec = scope["rec"]
    assert len(rec.head_stats) > 0 and rec.pattern(0, layer=1, head=1).probs.shape[0] == 1
    assert rec.z(layer=1).shape[0] == 1 and len(rec.residuals) == 2


def test_store_example_runs(model_dirs, tmp_path, monkeypatch):
    block = next(b for b in _blocks() if "hl.Store.create" in b)
    monkeypatch.chdir(tmp_path)
    setup = (
        "import torch\nimport headlab as hl\n"
        f"lm = hl.load({model_dirs['gpt2']!r})\n"
        "inputs = lm.tokenizer(['a b c', 'd e f g'], return_tensors='pt', padding=True)\n"
    )
    scope: dict = {}
    exec(
        compile(
            setup
            + block.replace("layer=3, head=5", "layer=1, head=2")
            .replace("layer=3,", "layer=1,")
            .replace("layers=[10, 11]", "layers=[0, 1]"),
            "README store example",
            "exec",
        ),
        scope,
    )
    assert scope["store"].committed("with_image") == {101, 102}


def test_intervention_and_zoo_examples_run():
    block = next(b for b in _blocks() if "hl.intervene" in b)
    scope: dict = {}
    exec(compile(_ZOO_LLAVA_INPUTS + block, "README interventions example", "exec"), scope)
    assert scope["out"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    zoo = next(b for b in _blocks() if 'hl.load("zoo:lm")' in b)
    exec(compile(zoo, "README zoo example", "exec"), {})


def test_paint_example_runs():
    block = next(b for b in _blocks() if "hl.PAICFG(" in b)
    scope: dict = {}
    exec(compile(_ZOO_LLAVA_INPUTS + block, "README PAINT example", "exec"), scope)
    assert scope["out"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    assert len(scope["local"]) > 0


def test_cca_example_runs():
    block = next(b for b in _blocks() if 'hl.load("zoo:llava-cca")' in b)
    scope: dict = {}
    exec(compile(block, "README CCA example", "exec"), scope)
    assert scope["out"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    assert not scope["lm"].model.training


def test_long_context_roles_example_runs():
    block = next(b for b in _blocks() if 'hl.load("zoo:lm-long")' in b)
    scope: dict = {}
    exec(compile(block, "README long-context roles example", "exec"), scope)
    assert scope["scores"].is_retrieval.any() and len(scope["top"]) == 2
    assert scope["razor"].razor_retrieval.any()


def test_snapkv_example_runs():
    block = next(b for b in _blocks() if "K.snapkv_heads" in b)
    scope: dict = {}
    exec(compile(block, "README SnapKV example", "exec"), scope)
    assert scope["keep"].shape[-1] == len(scope["ids"]) and scope["frame"].hit_rate.between(0, 1).all()


def test_analysis_example_runs(tmp_path):
    block = next(b for b in _blocks() if "run_analysis" in b)
    setup = (
        "import torch\nimport headlab as hl\n"
        "lm = hl.load('zoo:lm')\n"
        f"store = hl.Store.create({str(tmp_path / 'store')!r}, lm)\n"
        "with torch.no_grad(), hl.capture(lm) as rec:\n"
        "    lm.model(**lm.tokenizer(['w1 w2 w3 w1 w2 w3'], return_tensors='pt'))\n"
        "store.append(rec)\n"
    )
    scope: dict = {}
    exec(compile(setup + block, "README analyses example", "exec"), scope)
    assert len(scope["frame"]) == 8 and scope["store"].results() == ["sinks"]


def test_fused_attention_example_runs():
    block = next(b for b in _blocks() if "fused_attention(q, k, v, spec)" in b)
    scope: dict = {}
    exec(compile(block, "README fused attention", "exec"), scope)
    assert scope["att"].entropy.shape == (1, 8, 64)
