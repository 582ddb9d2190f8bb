"""The model-family registry (headlab.models): registration refuses duplicates, every adapter builds its
tiny random models and loads them, one lookup by config, model or model type (DEFAULT for any type without
an adapter), the SUPPORTED view, and what is discovered instead of declared (headlab.models.discovery)."""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ALL_ARCHS

import headlab as hl
from headlab import models
from headlab.models import discovery, matrix, registry
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
    ],
    ids=["name", "default-name", "model-type"],
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
    refused = [
        e.random_builder for e in matrix.entries() if not e.served and e.random_builder in RANDOM_BUILDERS
    ]
    assert sorted(declared + refused) == sorted(RANDOM_BUILDERS)
    assert all(adapter.random_builders for adapter in models.adapters())


@pytest.mark.parametrize("builder", ALL_ARCHS)
def test_every_adapter_builds_its_random_models_and_loads_them(tiny, builder):
    adapter = BUILT_BY[builder]
    lm = tiny(builder)
    assert lm.model_type in hl.SUPPORTED
    assert lm.model_type in adapter.model_types or (adapter is models.DEFAULT and not adapter.model_types)
    assert lm.adapter is adapter and lm.family is adapter.family
    for key in (lm.model, lm.model.config, lm, lm.model_type):  # one lookup, by anything that names it
        assert models.adapter_for(key) is adapter
    assert lm.model.config._attn_implementation == adapter.attention


def test_supported_is_a_read_only_view_of_the_adapters_and_the_tested_matrix():
    assert hl.SUPPORTED is models.SUPPORTED
    registered = {
        "clip_vision_model",
        "deit",
        "dinov2",
        "dinov2_with_registers",
        "gemma2",
        "llava",
        "siglip_vision_model",
        "vit",
    }
    assert registered | {"gpt2", "llama", "mistral", "qwen2", "gpt_neox", "phi3"} <= set(hl.SUPPORTED)
    declared = {t for adapter in models.adapters() for t in adapter.model_types}
    assert registered <= declared and set(hl.SUPPORTED) == declared | set(matrix.served_types())
    assert hl.SUPPORTED["aya_vision"] is models.DEFAULT_LVLM  # a served LVLM type without an adapter
    assert list(hl.SUPPORTED) == sorted(hl.SUPPORTED) and len(hl.SUPPORTED) == len(list(hl.SUPPORTED))
    assert hl.SUPPORTED["gemma2"].attention == "eager" and hl.SUPPORTED["deit"].prefix_tokens == 2
    assert hl.SUPPORTED["llava"].family is Family.LVLM and hl.SUPPORTED["gpt2"] is models.DEFAULT
    assert "bloom" not in hl.SUPPORTED and "swin" not in hl.SUPPORTED  # tested, and refused
    with pytest.raises(KeyError):
        hl.SUPPORTED["bloom"]
    with pytest.raises(TypeError):
        hl.SUPPORTED["bert"] = models.DEFAULT  # type: ignore[index]


def test_a_refused_type_cannot_be_registered_or_refused_twice(scratch_registry, monkeypatch):
    monkeypatch.setattr(registry, "_REFUSED", dict(registry._REFUSED))
    assert "shifted windows" in registry.refusal("swin") and registry.refusal("vit") is None

    def swin() -> ModelAdapter:
        return ModelAdapter(model_types=("swin",), family=Family.VIT)

    with pytest.raises(hl.HeadlabError, match="'swin' of adapter 'swin' is refused: its attention"):
        models.register(swin)
    for model_type in ("swin", "vit"):
        with pytest.raises(hl.HeadlabError, match="already refused or served"):
            registry.refuse(model_type, reason="no")


def test_a_registered_adapter_joins_supported(scratch_registry):
    @models.register
    def brandnew() -> ModelAdapter:
        return ModelAdapter(model_types=("brandnew",))

    assert hl.SUPPORTED["brandnew"] is brandnew


def test_types_without_an_adapter_get_the_default_and_a_model_type_is_needed():
    for model_type in ("gpt_neox", "phi3", "not_a_model_type"):
        assert models.adapter_for(model_type) is models.DEFAULT
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
    assert models.adapter_for(tiny("llava").model.config.vision_config) is models.DEFAULT
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


# ---------------------------------------------------------------------------------- what is discovered

ALL_ATTENTION_FUNCTIONS = {"sdpa": None}  # the name a routed attention module's forward looks up


class _RoutedAttention(torch.nn.Module):
    def forward(self, x):
        return ALL_ATTENTION_FUNCTIONS["sdpa"]


class _OwnAttention(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x @ x.mT, -1) @ x


class _SinkAttention(_RoutedAttention):
    def __init__(self) -> None:
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.zeros(4))


def _toy(*layers: torch.nn.Module | None, stacks: tuple[str, ...] = ("layers",)) -> torch.nn.Module:
    """A module tree `<stack>.<i>.self_attn` (None: a layer without attention) with a GPT-2-style config."""
    model = torch.nn.Module()
    for stack in stacks:
        blocks = torch.nn.ModuleList()
        for attention in layers:
            block = torch.nn.Module()
            if attention is not None:
                block.self_attn = copy.deepcopy(attention)  # one module per stack
            block.feed_forward = torch.nn.Linear(2, 2)
            blocks.append(block)
        model.add_module(stack, blocks)
    model.config = SimpleNamespace(model_type="toy", n_head=4, n_embd=64, n_positions=32, multi_query=True)
    return model


def test_head_shapes_are_read_under_every_config_name():
    gpt2 = SimpleNamespace(n_head=4, n_embd=64)
    assert discovery.head_shape(gpt2) == discovery.HeadShape(n_heads=4, n_kv_heads=4, head_dim=16, d_model=64)
    bigcode = SimpleNamespace(n_head=4, n_embd=64, multi_query=True)
    assert discovery.head_shape(bigcode).n_kv_heads == 1
    falcon_like = SimpleNamespace(num_heads=8, d_model=64, num_kv_heads=2, head_dim=32)
    assert discovery.head_shape(falcon_like) == discovery.HeadShape(
        n_heads=8, n_kv_heads=2, head_dim=32, d_model=64
    )
    own_dim = SimpleNamespace(num_attention_heads=4, hidden_size=64)
    assert discovery.head_shape(own_dim, SimpleNamespace(head_dim=8)).head_dim == 8
    with pytest.raises(hl.UnsupportedModelError, match="num_attention_heads / n_head"):
        discovery.head_shape(SimpleNamespace(model_type="odd", hidden_size=64))


def test_the_route_is_read_from_the_attention_code():
    import transformers as tf

    assert discovery.routes_through_interface(_RoutedAttention())
    assert not discovery.routes_through_interface(_OwnAttention())
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    assert discovery.routes_through_interface(llama.model.layers[0].self_attn)


def test_describe_discovers_a_toy_model_and_its_mlp_under_another_name():
    lm = hl.describe(_toy(_RoutedAttention(), _RoutedAttention()))
    assert lm.adapter is models.DEFAULT and lm.main.path == "layers"
    assert (lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim, lm.main.max_positions) == (2, 4, 1, 16, 32)
    assert (
        lm.main.mlp_attr == "feed_forward"
        and lm.mlp_module("lm", 1) is lm.layer_modules["lm"][1].feed_forward
    )
    assert lm.main.rotary_attr is None and lm.rotary_module() is None and not lm.main.sliding


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            _toy(_OwnAttention(), _OwnAttention()),
            r"'toy': its attention \(_OwnAttention, at layers\) never calls AttentionInterface",
        ),
        (_toy(_SinkAttention(), _SinkAttention()), "'toy': its attention adds learned attention sinks"),
        (_toy(None, _RoutedAttention()), r"attention sits only in decoder layers \[1\] of layers \(a hybrid"),
        (_toy(_RoutedAttention(), stacks=("low", "high")), "two stacks of lm attention layers"),
        (_toy(None, None), "found no attention layers"),
    ],
    ids=["eager-only", "sinks", "hybrid", "two-stacks", "no-attention"],
)
def test_what_headlab_cannot_serve_is_refused_saying_why(model, match):
    with pytest.raises(hl.UnsupportedModelError, match=match):
        hl.describe(model)


def test_windows_follow_the_module_then_the_layer_types():
    modules = [SimpleNamespace(sliding_window=4), SimpleNamespace()]
    mistral = SimpleNamespace(sliding_window=6)
    assert discovery.layer_windows(mistral, modules) == (4, 6)
    alternating = SimpleNamespace(sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    assert discovery.layer_windows(alternating, [object(), object()]) == (6, None)
    switched_off = SimpleNamespace(sliding_window=6, use_sliding_window=False)
    assert discovery.layer_windows(switched_off, [object()]) == (None,)
