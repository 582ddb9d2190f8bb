"""headlab.load on every fixture architecture, and its errors."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
from conftest import ALL_ARCHS, inputs_for, logits_of

import headlab as hl


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_load_and_forward(tiny, name):
    lm = tiny(name)
    assert not lm.model.training
    assert lm.n_layers == 2 and lm.n_heads == 4 and lm.head_dim * lm.n_heads == lm.main.d_model
    with torch.no_grad():
        out = logits_of(lm, inputs_for(lm))
    assert torch.isfinite(out).all()


def test_families_and_towers(tiny):
    assert tiny("gpt2").family is hl.Family.LLM
    llama = tiny("llama")
    assert (llama.n_heads, llama.n_kv_heads) == (4, 2)  # grouped-query attention
    llava = tiny("llava")
    assert llava.family is hl.Family.LVLM
    assert [t.name for t in llava.towers] == ["vision", "lm"]
    assert llava.tower("vision").grid == (4, 4) and not llava.tower("vision").causal
    assert llava.image_token_id == llava.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert "input_ids ==" in llava.image_tokens
    vit = tiny("vit")
    assert vit.family is hl.Family.VIT and vit.main.prefix_tokens == 1 and vit.main.grid == (4, 4)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(hl.ModelLoadError, match="does not exist"):
        hl.load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(hl.ModelLoadError, match=r"config\.json"):
        hl.load(tmp_path)


@pytest.mark.parametrize("repo_id", ["someone/not-a-real-model-xyz", "gpt2"])
def test_offline_hub_id_says_why_and_what_to_do(monkeypatch, tmp_path, repo_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(hl.ModelLoadError) as err:
        hl.load(repo_id)
    message = str(err.value)
    assert "HF_HUB_OFFLINE is set" in message and f"hf download {repo_id}" in message
    assert "does not exist" not in message  # a bare id like 'gpt2' is a hub id, not a missing path


def test_unreachable_hub_fails_at_once_and_names_the_host(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(hl.ModelLoadError, match=r"cannot connect to 127\.0\.0\.1:9"):
        hl.load("org/tiny")


def test_offline_hub_id_loads_from_the_hub_cache(monkeypatch, tmp_path, model_dirs):
    """A model downloaded earlier (hub cache layout: refs/main -> snapshots/<commit>/) loads offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny-gpt2"
    commit = "0" * 40
    shutil.copytree(model_dirs["gpt2"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    lm = hl.load("org/tiny-gpt2")
    assert lm.model_type == "gpt2" and lm.source == str(repo / "snapshots" / commit)


@pytest.mark.parametrize(
    ("model_type", "match"),
    [
        ("t5", "'t5': transformers has no AutoModelForCausalLM class for it, so it is not a causal language"),
        ("bloom", r"'bloom': its modeling code \(BloomForCausalLM, .*\) never calls AttentionInterface"),
        ("falcon", "only eagerly or through its own SDPA call .* so headlab cannot see inside it"),
    ],
)
def test_what_cannot_be_served_is_refused_before_any_weight_is_read(tmp_path, model_type, match):
    """The class tells: no weights file is needed to refuse (an unreadable one would be a ModelLoadError)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(hl.UnsupportedModelError, match=match):
        hl.load(tmp_path)


def test_a_causal_lm_without_an_adapter_loads_by_discovery(tmp_path):
    from headlab.zoo.random_models import build_random

    lm = hl.load(build_random("gpt_neox", tmp_path / "neox"))
    assert lm.adapter is hl.models.DEFAULT and lm.model_type == "gpt_neox"
    assert lm.main.path == "gpt_neox.layers" and (lm.n_layers, lm.n_heads, lm.head_dim) == (2, 4, 16)
    assert (
        lm.model.config._attn_implementation == "sdpa" and lm.rotary_module() is lm.model.gpt_neox.rotary_emb
    )


def test_a_class_without_sdpa_loads_eagerly(model_dirs):
    """Gemma 2 has an adapter saying so; the class's own flag (no SDPA support) says the same."""
    from headlab.loading import _attention_to_load, model_class

    config = hl.load(model_dirs["gemma2"]).model.config
    cls = model_class(config, hl.models.DEFAULT)
    if cls._supports_sdpa:
        pytest.skip(
            "Gemma 2's class declares SDPA support in this transformers release (dropped by 5.23, since SDPA "
            "cannot soft-cap), so this release has no SDPA-less class here to load eagerly"
        )
    assert _attention_to_load(cls, hl.models.DEFAULT, None) == "eager"
    assert _attention_to_load(cls, hl.models.DEFAULT, "sdpa") == "sdpa"  # the caller's choice stands
