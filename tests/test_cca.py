"""CCA (Concentric Causal Attention): the reference builders against hand-computed rings, positions and
masks; the batched layout against the reference; headlab's fused attention under `intervene` against HF
eager attention fed the same positions and mask; cached generation against no-cache recomputes; the
training path (gradients); the model restored on exit; bad inputs; the shipped `llava-cca`."""

from __future__ import annotations

import pytest
import torch

import headlab as hl
from headlab.datasets import scenes
from headlab.errors import InputError, UnsupportedModelError
from headlab.interventions.cca import CCA, additive, cca_layout, cca_mask, cca_positions, n_rings, ring_index
from headlab.interventions.core import intervene
from headlab.zoo import llava as recipe
from headlab.zoo import registry
from headlab.zoo.random_models import build_random
from headlab.zoo.training import pad_batch

IMG = 9  # an image token id for the pure builders


# ------------------------------------------------------------------------------ hand-computed reference


def test_rings_of_a_4x4_grid_by_hand():
    assert ring_index(4, 4).tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert n_rings(4, 4) == 2


def test_rings_of_llava_1_5_grid():
    rings = ring_index(24, 24)
    assert n_rings(24, 24) == 12 and int(rings.max()) == 11
    counts = torch.bincount(rings).tolist()
    assert counts == [4 * (23 - 2 * r) for r in range(12)]  # 92 on the border ... 4 in the centre


def test_rings_of_odd_and_rectangular_grids():
    assert ring_index(3, 3).tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert ring_index(2, 4).tolist() == [0] * 8
    assert ring_index(3, 5).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_positions_and_mask_of_a_4x4_image_by_hand():
    ids = [1] + [IMG] * 16 + [2]  # text | 4 x 4 image | text
    # p0 = 1: ring-0 cells -> 1, ring-1 cells (5, 6, 9, 10) -> 2; the text after continues from 1 + 2 = 3
    assert cca_positions(ids, IMG).tolist() == [0, 1, 1, 1, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 1, 1, 1, 3]
    ring0 = "111111001100111110"  # sees the text before and every ring-0 image token, no ring-1 one
    ring1 = "111111111111111110"  # sees the text before and every image token
    rows = ["100000000000000000"]
    rows += [ring1 if cell in (5, 6, 9, 10) else ring0 for cell in range(16)]
    rows += ["111111111111111111"]  # the text after sees everything before it
    want = torch.tensor([[c == "1" for c in row] for row in rows])
    assert torch.equal(cca_mask(ids, IMG), want)


def test_positions_with_text_before_and_after_and_two_images():
    ids = [5, 6, IMG, IMG, IMG, IMG, 7, IMG, IMG, IMG, IMG, 8]  # two 2 x 2 images (one ring each)
    assert cca_positions(ids, IMG, tokens_per_image=4).tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 5]
    assert torch.equal(cca_positions(ids, IMG), cca_positions(ids, IMG, tokens_per_image=4))  # runs
    mask = cca_mask(ids, IMG, tokens_per_image=4)
    assert mask[3, 5] and mask[8, 3] and not mask[3, 8]  # within an image both ways; across, causal


# --------------------------------------------------------------------------------- batched vs reference


def _padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_layout_matches_the_reference(side):
    rows = [
        [1, 2] + [IMG] * 16 + [3, 4, 5],
        [1] + [IMG] * 16 + [3],
        [1, 3, 3] + [IMG] * 16 + [IMG] * 16 + [4],  # two images in a row
    ]
    ids, mask = _padded(rows, side)
    layout = cca_layout(ids, mask, IMG, tokens_per_image=16)
    for b, row in enumerate(rows):
        real = mask[b].bool()
        assert torch.equal(layout.positions[b, real], cca_positions(row, IMG, tokens_per_image=16))
        assert torch.equal(layout.keep[b, 0][real][:, real], cca_mask(row, IMG, tokens_per_image=16))
        assert not layout.keep[b, 0][~real].any() and not layout.keep[b, 0][:, ~real].any()
    assert layout.shift.tolist() == [2 - 16, 2 - 16, 2 * (2 - 16)]


# ---------------------------------------------------------------------------------------- the zoo LLaVA


@pytest.fixture(scope="module")
def zoo_llava():
    return hl.load("zoo:llava")


def _batch(lm, questions, *, side="right", n_scenes=None):
    tok = lm.processor.tokenizer
    rows = [recipe.encode(tok, recipe.conversation(scenes.question(q)))[0] for q in questions]
    batch = pad_batch(rows, rows, tok.pad_token_id)
    batch.pop("labels")
    if side == "left":
        ids, mask = _padded(rows, "left")
        ids[mask == 0] = tok.pad_token_id
        batch = {"input_ids": ids, "attention_mask": mask}
    batch["pixel_values"] = recipe.pixels(lm.processor, scenes.make_scenes(len(rows), seed=11))
    return batch


QUESTIONS = ["apple", "banana", "a cup and a plate"]


def _reference_inputs(lm, batch):
    """Positions [b, n] and additive 4-D mask from the per-example reference builders."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    b, n = ids.shape
    positions = torch.zeros(b, n, dtype=torch.long)
    keep = torch.zeros(b, 1, n, n, dtype=torch.bool)
    for i in range(b):
        cols = mask[i].nonzero().flatten()
        row = ids[i, cols].tolist()
        positions[i, cols] = cca_positions(row, lm.image_token_id)
        keep[i, 0, cols[:, None], cols[None, :]] = cca_mask(row, lm.image_token_id)
    return positions, additive(keep, torch.float32)


def _eager_logits(lm, batch, positions, mask4d):
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return lm.model(
                input_ids=batch["input_ids"],
                pixel_values=batch["pixel_values"],
                attention_mask=mask4d,
                position_ids=positions,
            ).logits
    finally:
        lm.model.set_attn_implementation(before)


@pytest.mark.parametrize("backend", ["auto", "flex", "tiled", "reference"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_fused_cca_matches_hf_eager_with_the_reference_positions_and_mask(
    zoo_llava, monkeypatch, backend, side
):
    lm = zoo_llava
    if backend != "auto":
        monkeypatch.setenv("HEADLAB_ATTENTION", backend)
    batch = _batch(lm, QUESTIONS, side=side)
    want = _eager_logits(lm, batch, *_reference_inputs(lm, batch))
    with torch.no_grad(), intervene(lm, CCA()):
        got = lm.model(**batch).logits
    with torch.no_grad():
        plain = lm.model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)
    assert (got[real] - plain[real]).abs().max() > 1e-2  # CCA changed the computation


def test_reference_engine_matches_too(zoo_llava):
    lm = zoo_llava
    batch = _batch(lm, QUESTIONS)
    want = _eager_logits(lm, batch, *_reference_inputs(lm, batch))
    with torch.no_grad(), intervene(lm, CCA(), engine="reference"):
        got = lm.model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)


def test_capture_inside_cca_sees_the_image_roles_and_the_cca_mask(zoo_llava):
    lm = zoo_llava
    batch = _batch(lm, QUESTIONS[:1])
    with (
        torch.no_grad(),
        intervene(lm, CCA()),
        hl.capture(lm, patterns=hl.Select(layers=(0,), heads=(0,))) as rec,
    ):
        lm.model(**batch)
    probs = rec.pattern(0, 0, 0).probs  # [q, k] of example 0
    ids = batch["input_ids"][0].tolist()
    keep = cca_mask(ids, lm.image_token_id)
    assert (probs[~keep] == 0).all() and (probs[keep] > 0).all()


def _greedy_no_cache(run, batch, steps, eos):
    """Greedy tokens and raw logits, recomputing the whole sequence every step (no KV cache); the end of
    sequence token is barred, as generate's min_new_tokens does."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = []
    for _ in range(steps):
        with torch.no_grad():
            out = run(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], use_cache=False)
        last = out.logits[:, -1]
        logits.append(last)
        nxt = last.clone().index_fill_(-1, torch.tensor([eos]), float("-inf")).argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, torch.stack(logits, 1)


@pytest.mark.parametrize("how", ["intervene", "applied"])
def test_cached_generation_equals_no_cache_recompute(zoo_llava, how):
    lm = zoo_llava
    batch = _batch(lm, ["a cup", "a tree and a car"], side="left")
    block = intervene(lm, CCA()) if how == "intervene" else CCA().applied(lm.model)
    steps = 4
    with block, torch.no_grad():
        gen = lm.model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        want_ids, want_logits = _greedy_no_cache(lm.model, batch, steps, lm.processor.tokenizer.eos_token_id)
    assert torch.equal(gen.sequences, want_ids)
    torch.testing.assert_close(torch.stack(gen.logits, 1), want_logits, atol=2e-5, rtol=2e-5)


def test_decode_positions_continue_after_the_rings(zoo_llava):
    lm = zoo_llava
    batch = _batch(lm, ["a cup", "a tree and a car"], side="left")
    seen = []
    rotary = lm.rotary_module("lm")  # sees the position ids the language model rotates with
    hook = rotary.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[1] if len(a) > 1 else k["position_ids"]).clone()), with_kwargs=True
    )
    try:
        with CCA().applied(lm.model), torch.no_grad():
            lm.model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    real = batch["attention_mask"].sum(1)
    n_image = recipe.N_IMAGE_TOKENS
    # cache_length - n_image + n_rings, counting real tokens only
    assert seen[0][:, -1].tolist() == (real - 1 - n_image + 2).tolist()  # the prompt's last token
    assert seen[1][:, 0].tolist() == (real - n_image + 2).tolist()
    assert seen[2][:, 0].tolist() == (real + 1 - n_image + 2).tolist()


def test_model_is_restored_after_the_block_and_after_an_error(zoo_llava):
    lm = zoo_llava
    batch = _batch(lm, QUESTIONS)
    language_model = lm.model.model.language_model
    impl = lm.model.config._attn_implementation
    with torch.no_grad():
        before = lm.model(**batch).logits
        with intervene(lm, CCA()):
            lm.model(**batch)
            assert not language_model._forward_pre_hooks  # the per-pass hand-over is gone after each pass
        with pytest.raises(RuntimeError, match="boom"), CCA().applied(lm.model):
            raise RuntimeError("boom")
        with pytest.raises(InputError), intervene(lm, CCA()):
            lm.model(input_ids=batch["input_ids"][:, :5], attention_mask=batch["attention_mask"][:, :5])
        with pytest.raises(RuntimeError), intervene(lm, CCA()):  # fails in the vision tower, CCA armed
            lm.model(**{**batch, "pixel_values": batch["pixel_values"][:, :1]})
        assert not language_model._forward_pre_hooks  # the pass's hand-over was removed all the same
        after = lm.model(**batch).logits
    assert torch.equal(before, after)
    assert lm.model.config._attn_implementation == impl
    assert not lm.model._forward_pre_hooks and not lm.model._forward_hooks
    assert not language_model._forward_pre_hooks and not language_model._forward_hooks


def test_training_path_has_gradients_and_matches_explicit_inputs(zoo_llava):
    lm = zoo_llava
    model = lm.model
    batch = _batch(lm, QUESTIONS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    positions, mask4d = _reference_inputs(lm, batch)
    model.train()
    try:
        with CCA().applied(model):
            out = model(**batch, labels=labels)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        explicit = model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=mask4d,
            position_ids=positions,
            labels=labels,
        )
        torch.testing.assert_close(out.loss, explicit.loss)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_headlab_errors(zoo_llava):
    with pytest.raises(InputError, match="has none"):
        cca_layout(torch.tensor([[1, 2, 3]]), None, IMG)
    with pytest.raises(InputError, match="not a square grid"):
        cca_positions([1] + [IMG] * 15 + [2], IMG)
    with pytest.raises(InputError, match="holds 12 tokens"):
        cca_positions([1] + [IMG] * 16, IMG, grid=(3, 4))
    with pytest.raises(InputError, match="whole number of images"):
        cca_positions([1] + [IMG] * 20, IMG, tokens_per_image=16)
    with pytest.raises(InputError, match="positive integers"):
        CCA(grid=(0, 4))
    assert (
        cca_positions([1] + [IMG] * 12 + [2], IMG, grid=(3, 4)).tolist()[-1] == 1 + 2
    )  # rectangular: 2 rings
    lm = zoo_llava
    text_only = lm.processor.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
    with pytest.raises(InputError, match="has none"), torch.no_grad(), intervene(lm, CCA()):
        lm.model(**text_only)
    with pytest.raises(InputError, match="not filled under CCA"), torch.no_grad():
        out = lm.model(**_batch(lm, ["apple"]), use_cache=True)
        with CCA().applied(lm.model):
            lm.model(input_ids=torch.tensor([[5]]), past_key_values=out.past_key_values)


def test_models_cca_cannot_serve_are_refused(tmp_path):
    qwen = hl.load(build_random("qwen2_vl", tmp_path / "qwen2_vl"))
    with pytest.raises(UnsupportedModelError, match="M-RoPE"), intervene(qwen, CCA()):
        pass
    with pytest.raises(UnsupportedModelError, match="M-RoPE"), CCA().applied(qwen.model):
        pass
    with pytest.raises(UnsupportedModelError, match="llm model"), intervene(hl.load("zoo:lm"), CCA()):
        pass


# ------------------------------------------------------------------------------------ the shipped model


def test_shipped_llava_cca_card_and_evaluation_reproduce():
    info = hl.zoo.card("llava-cca")
    assert info["cca"] is True and info["training"]["steps"] == hl.zoo.card("llava")["training"]["steps"]
    assert info["seed"] == hl.zoo.card("llava")["seed"]
    lm = hl.load("zoo:llava-cca")
    subset = info["evaluation"]["subset"]
    with intervene(lm, CCA()):
        fresh = recipe.evaluate_llava(lm.model, lm.processor, n_images=subset["n_images"])
    for split in ("random", "popular", "adversarial"):
        for key, value in fresh[split].items():
            assert subset[split][key] == pytest.approx(value, abs=1e-9), (split, key)
    assert fresh["random"]["accuracy"] > 0.75  # it learned the task under CCA (chance: 0.5)
    assert registry.entry("llava-cca").cca and not registry.entry("llava").cca


def test_flex_backend_skips_the_masked_blocks_of_a_llava_1_5_sized_cca_mask():
    from headlab.kernels.flex import _block_mask
    from headlab.kernels.spec import FusedSpec

    ids = torch.tensor([[1] * 35 + [IMG] * 576 + [2] * 40])  # LLaVA-1.5: 24 x 24 image tokens
    keep = cca_layout(ids, None, IMG).keep
    n = ids.shape[1]
    blocks = _block_mask(FusedSpec(scale=1.0, mask=keep), 1, 1, n, n, torch.device("cpu"))
    total = blocks.kv_num_blocks.shape[-1] * -(-n // blocks.BLOCK_SIZE[1])
    visited = int(blocks.kv_num_blocks.sum() + blocks.full_kv_num_blocks.sum())
    assert visited < total  # fully masked blocks (above the diagonal outside the image block) are skipped
