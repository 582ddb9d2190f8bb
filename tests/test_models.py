"""The model-family registry (headlab.models): registration refuses duplicates, every adapter builds its
tiny random models and loads them, one lookup by config, model or model type, and the SUPPORTED view."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ALL_ARCHS

import headlab as hl
from headlab import models
from headlab.models import registry
from headlab.models.adapter import Family, ModelAdapter
from headlab.zoo.random_models import RANDOM_BUILDERS

ADAPTERS = {adapter.name: adapter for adapter in models.adapters()}
BUILT_BY = {builder: adapter for adapter in models.adapters() for builder in adapter.random_builders}


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations inside a test do not outlive it."""
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))
    monkeypatch.setattr(registry, "_BY_MODEL_TYPE", dict(registry._BY_MODEL_TYPE))


def test_register_names_the_adapter_after_its_function_and_lookup_finds_it(scratch_registry):
    @models.register
    def tinyfam() -> ModelAdapter:
        return ModelAdapter(model_types=("tinyfam",), family=Family.VIT, prefix_tokens=3)

    assert isinstance(tinyfam, ModelAdapter) and tinyfam.name == "tinyfam"
    assert models.adapter_for("tinyfam") is tinyfam and models.SUPPORTED["tinyfam"] is tinyfam
    assert tinyfam in models.adapters()


@pytest.mark.parametrize(
    ("name", "model_type", "match"),
    [
        ("llava", "brand_new", "named 'llava' is already registered"),
        ("default", "brand_new", "named 'default' is already registered"),
        ("newfam", "gemma2", "'gemma2' of adapter 'newfam' is already served by 'gemma2'"),
        ("newfam", "llama", "'llama' of adapter 'newfam' is already served by 'default'"),
    ],
    ids=["name", "default-name", "model-type", "generic-model-type"],
)
def test_register_refuses_duplicates_and_leaves_the_registry_as_it_was(
    scratch_registry, name, model_type, match
):
    before = dict(models.SUPPORTED)

    def declare() -> ModelAdapter:
        return ModelAdapter(model_types=(model_type,))

    declare.__name__ = name
    with pytest.raises(hl.HeadlabError, match=match):
        models.register(declare)
    assert dict(models.SUPPORTED) == before


def test_register_refuses_an_adapter_without_model_types_or_with_a_foreign_name(scratch_registry):
    def empty() -> ModelAdapter:
        return ModelAdapter()

    def named() -> ModelAdapter:
        return ModelAdapter(name="other", model_types=("named",))

    with pytest.raises(hl.HeadlabError, match="declares no model_types"):
        models.register(empty)
    with pytest.raises(hl.HeadlabError, match="leave its name unset"):
        models.register(named)


def test_every_random_builder_belongs_to_exactly_one_adapter():
    declared = [b for adapter in models.adapters() for b in adapter.random_builders]
    assert sorted(declared) == sorted(RANDOM_BUILDERS)
    assert all(adapter.random_builders for adapter in models.adapters())


@pytest.mark.parametrize("builder", ALL_ARCHS)
def test_every_adapter_builds_its_random_models_and_loads_them(tiny, builder):
    adapter = BUILT_BY[builder]
    lm = tiny(builder)
    assert lm.model_type in adapter.model_types and lm.model_type in hl.SUPPORTED
    assert lm.adapter is adapter and lm.family is adapter.family
    for key in (lm.model, lm.model.config, lm, lm.model_type):  # one lookup, by anything that names it
        assert models.adapter_for(key) is adapter
    assert lm.model.config._attn_implementation == adapter.attention


def test_supported_is_a_read_only_view_of_the_ten_architectures():
    assert hl.SUPPORTED is models.SUPPORTED
    assert sorted(hl.SUPPORTED) == [
        "clip_vision_model",
        "deit",
        "dinov2",
        "gemma2",
        "gpt2",
        "llama",
        "llava",
        "mistral",
        "qwen2",
        "vit",
    ]
    assert hl.SUPPORTED["gemma2"].attention == "eager" and hl.SUPPORTED["deit"].prefix_tokens == 2
    assert hl.SUPPORTED["llava"].family is Family.LVLM and hl.SUPPORTED["gpt2"] is models.DEFAULT
    with pytest.raises(TypeError):
        hl.SUPPORTED["bert"] = models.DEFAULT  # type: ignore[index]


def test_unknown_architectures_are_refused_with_the_supported_list():
    with pytest.raises(hl.UnsupportedModelError, match=r"'bert' yet; supported: \[.*'gpt2'.*'vit'\]"):
        models.adapter_for("bert")
    with pytest.raises(hl.UnsupportedModelError, match="no config with a model_type"):
        models.adapter_for(object())


def test_what_the_adapters_expose_on_the_loaded_model(tiny):
    llama, gpt2, llava = tiny("llama"), tiny("gpt2"), tiny("llava")
    assert llama.rotary_module() is llama.model.model.rotary_emb
    assert gpt2.rotary_module() is None  # learned absolute positions
    assert llama.mlp_module("lm", 1) is llama.layer_modules["lm"][1].mlp
    assert gpt2.mlp_module("lm", 0) is gpt2.layer_modules["lm"][0].mlp
    assert llava.tokens_per_image == 16 == llava.model.config.image_seq_length
    assert llama.tokens_per_image is None and llama.image_token_id is None
    # the LLaVA vision tower takes its CLS prefix from its own family's adapter (CLIP)
    assert llava.tower("vision").prefix_tokens == ADAPTERS["clip_vision"].prefix_tokens == 1


def test_an_lvlm_vision_tower_of_an_unregistered_family_keeps_one_cls(tiny, scratch_registry):
    del registry._BY_MODEL_TYPE["clip_vision_model"]
    with pytest.raises(hl.UnsupportedModelError):
        models.adapter_for(tiny("llava").model.config.vision_config)
    assert hl.describe(tiny("llava").model).tower("vision").prefix_tokens == 1


def test_the_llava_prompt_template_lives_in_its_adapter():
    from headlab.models.llava import CAPTION_PROMPT, conversation
    from headlab.zoo import llava as recipe

    assert conversation("Is there a cat?") == "USER: <image>\nIs there a cat? ASSISTANT:"
    assert recipe.conversation is conversation and recipe.CAPTION_PROMPT == CAPTION_PROMPT
    assert ADAPTERS["llava"].caption_prompt == CAPTION_PROMPT
    with pytest.raises(hl.UnsupportedModelError, match="no prompt template"):
        models.DEFAULT.prompt("Is there a cat?")


def test_importing_the_registry_imports_no_model_code():
    code = (
        "import sys, headlab.models as m; m.adapter_for('llava'); dict(m.SUPPORTED)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'model code imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
