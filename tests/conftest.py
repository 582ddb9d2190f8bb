"""Shared fixtures: tiny random-weight models of the real architecture classes, built once per session,
saved with a local tokenizer/processor and loaded back through `headlab.load` (no network)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

if (
    not torch.cuda.is_available()
):  # the Triton kernel runs under the interpreter on the CPU (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import headlab as hl
from headlab.loading import language_model_output
from headlab.zoo.random_lvlms import LVLM_BUILDERS
from headlab.zoo.random_models import RANDOM_BUILDERS, build_random

LLMS = ("gpt2", "llama", "qwen2", "mistral", "gemma2")
# the hand-written tiny models every probe test runs on; the LVLM matrix's own (tests/test_matrix_lvlm.py)
ALL_ARCHS = tuple(name for name in RANDOM_BUILDERS if name not in LVLM_BUILDERS)
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Is there a cat in the image? Yes."]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {name: str(build_random(name, root / name)) for name in ALL_ARCHS}


@pytest.fixture(scope="session")
def tiny(model_dirs):
    cache: dict[str, hl.LoadedModel] = {}

    def get(name: str) -> hl.LoadedModel:
        if name not in cache:
            cache[name] = hl.load(model_dirs[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_lm_long(tmp_path_factory):
    """An untrained model of the zoo's lm-long recipe (4 layers, 4 query / 2 KV heads) with its tokenizer."""
    from headlab.zoo import lm_long

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_lm_long") / "model"
    tok = lm_long.tokenizer_for()
    lm_long.build_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return hl.load(str(path))


def images(n: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def inputs_for(lm: hl.LoadedModel, *, padding_side: str = "right", batch: int = 2) -> dict[str, torch.Tensor]:
    """A padded batch of real inputs for any fixture family."""
    if lm.family is hl.Family.VIT:
        return dict(lm.processor(images(batch), return_tensors="pt"))
    if lm.family is hl.Family.LVLM:
        lm.processor.tokenizer.padding_side = padding_side
        texts = [f"USER: <image>\n{p} ASSISTANT:" for p in PROMPTS[:batch]]
        return dict(lm.processor(images=images(batch), text=texts, return_tensors="pt", padding=True))
    lm.tokenizer.padding_side = padding_side
    return dict(lm.tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True))


def logits_of(lm: hl.LoadedModel, inputs) -> torch.Tensor:
    out = lm.model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


TRITON_ON_CPU_SKIP = (
    "the Triton kernel runs on CPU tensors only under the interpreter, which conftest turns on when the "
    "machine has no CUDA device; on a CUDA machine the `gpu` tests in test_kernels_fused.py cover it"
)


def skip_unless_triton_runs_on_cpu() -> None:
    """Skip a test that drives the Triton kernel with CPU tensors when the interpreter is off."""
    from headlab.kernels.triton_attention import available

    if not available(torch.device("cpu")):
        pytest.skip(TRITON_ON_CPU_SKIP)


STAT_KEYS = ["example", "tower", "step", "layer", "head", "stat", "role"]


def assert_same_stats(got: pd.DataFrame, want: pd.DataFrame, *, atol: float, rtol: float = 0.0) -> None:
    """Two `head_stats` frames hold the same rows (one to one on every key, none missing) and values."""
    merged = got.merge(want, on=STAT_KEYS, suffixes=("_got", "_want"), validate="one_to_one")
    assert len(merged) == len(got) == len(want) > 0
    torch.testing.assert_close(
        torch.tensor(merged.value_got.values), torch.tensor(merged.value_want.values), atol=atol, rtol=rtol
    )


def assert_close_at_real_tokens(got: torch.Tensor, want: torch.Tensor, inputs, tol: float = 1e-5) -> None:
    """Float32 closeness at real tokens. Padding rows see no key: transformers' eager attention (Gemma 2's
    default) fills them with a uniform row, SDPA-style masks with zeros; neither reaches a real token."""
    real = inputs.get("attention_mask", torch.ones(got.shape[:2])).bool()
    torch.testing.assert_close(got[real], want[real], atol=tol, rtol=tol)


def eager_attentions(lm: hl.LoadedModel, inputs) -> tuple[torch.Tensor, ...]:
    """Every layer's [batch, head, q, k] pattern from HF eager attention (the independent oracle)."""
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():  # BLIP-2's and InstructBLIP's are in their language model's output
            return language_model_output(lm.model(**inputs, output_attentions=True)).attentions
    finally:
        lm.model.set_attn_implementation(before)


def chromium_driver():
    """A headless Chromium (Debian's chromium + chromium-driver) driven by selenium; skips without them."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs chromium and chromedriver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)
