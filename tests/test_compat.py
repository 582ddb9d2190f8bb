"""The transformers compatibility layer and start-up cost: what differs between releases is read in one
place (headlab.compat), and importing headlab or asking the CLI for help does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from headlab import compat


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_hands_the_cache_to_forward_under_this_releases_keyword(tiny, cache):
    """Whatever keyword this transformers release uses, compat finds the cache of every decode step and how
    many tokens it holds (a static cache: its filled slots, not its size)."""
    lm = tiny("llama")
    seen: list[tuple[str | None, int]] = []

    def pre_hook(module, args, kwargs):
        name = next((k for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
        seen.append((name, compat.past_length(kwargs)))

    handle = lm.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        inputs = lm.tokenizer(["The quick brown fox"], return_tensors="pt")
        with torch.no_grad():
            lm.model.generate(
                **inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation=cache
            )
    finally:
        handle.remove()
    n_prompt = inputs["input_ids"].shape[1]
    assert [past for _, past in seen] == [0, n_prompt, n_prompt + 1]
    assert {name for name, past in seen if past} == {compat.CACHE_KWARG}


def test_cache_of_and_with_cache_round_trip(tiny):
    lm = tiny("llama")
    ids = lm.tokenizer(["The quick brown fox"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cache = compat.cache_of(lm.model(input_ids=ids[:, :2], use_cache=True))
        assert cache is not None and cache.get_seq_length() == 2
        out = lm.model(input_ids=ids[:, 2:], **compat.with_cache(cache), use_cache=True)
    assert compat.cache_of(out).get_seq_length() == ids.shape[1]
    assert compat.past_length({}) == 0 and compat.cache_from_kwargs({"past_key_values": None}) is None


@pytest.mark.parametrize(
    "code",
    [
        "import headlab",
        "import headlab, headlab.zoo; headlab.zoo.ZOO; headlab.zoo.card('lm')",
        "from headlab.cli import app; import sys; sys.argv = ['headlab', '--help']\ntry:\n    app()\nexcept SystemExit:\n    pass",
    ],
    ids=["import", "zoo-list", "cli-help"],
)
def test_start_up_does_not_import_torch(code):
    check = f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_lazy_facade_resolves_every_public_name():
    import headlab as hl

    for name in hl.__all__:
        assert getattr(hl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hl.nope
