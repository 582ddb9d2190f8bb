"""headlab.load on every fixture architecture, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def test_unsupported_architecture_lists_supported(tmp_path, model_dirs):
    src = json.loads((Path(model_dirs["gpt2"]) / "config.json").read_text())
    src["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(src))
    with pytest.raises(hl.UnsupportedModelError, match=r"supported: .*gpt2"):
        hl.load(tmp_path)
