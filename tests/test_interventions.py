"""Interventions: the exact grouped redistribution equals explicit patterns; head ablation equals editing the
o_proj input by hand; VHR and VAR equal their explicit references on the zoo LLaVA, compose, work in
generate with a KV cache, and leave the model as it was."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import skip_unless_triton_runs_on_cpu

import headlab as hl
from headlab.datasets import scenes
from headlab.interventions import (
    AttentionCall,
    GroupEdit,
    HeadAblation,
    HeadScale,
    grouped_attention,
    head_outputs,
    intervene,
    mean_head_outputs,
    reference_attention,
)
from headlab.interventions.var import VAR, _VAREdit
from headlab.interventions.vhr import VHR, default_layers, select_heads, vhr_reference
from headlab.probe.context import BatchContext
from headlab.probe.roles import text_roles
from headlab.zoo import llava as llava_recipe


class _Move(GroupEdit):
    """Test edit: group 0 keeps `keep` of its mass; the freed mass goes to group 1 in proportion."""

    def __init__(self, g0, g1, keep):
        self.groups, self.keep = (g0, g1), keep

    def factors(self, mass, rest):
        m0, m1 = mass
        return [torch.full_like(m0, self.keep), 1 + (1 - self.keep) * m0 / m1.clamp(min=1e-30)], 1.0

    def reference(self, probs):
        g0, g1 = self.groups[0][:, :, None, :], self.groups[1][:, :, None, :]
        m0 = (probs * g0).sum(-1, keepdim=True)
        m1 = (probs * g1).sum(-1, keepdim=True)
        return torch.where(
            g0,
            probs * self.keep,
            torch.where(g1, probs + (1 - self.keep) * m0 * probs / m1.clamp(min=1e-30), probs),
        )


def _call(q, k, v, *, mask=None, causal=True, lengths=None):
    b, n = q.shape[0], k.shape[2]
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    roles = tuple(text_roles([1] * int(valid[i].sum())) for i in range(b))
    ctx = BatchContext(tower="lm", step=0, pass_id=1, examples=tuple(range(b)), roles=roles, key_valid=valid)
    keep = None if mask is None else mask[:, None, None, :]
    return AttentionCall(None, "lm", 0, q, k, v, keep, q.shape[-1] ** -0.5, causal, ctx)


def test_grouped_edit_hand_computed():
    # one query, three keys with scores 0 (uniform row 1/3 each); values 1, 2, 4.
    # group 0 = key 0 keeps half: 1/6; freed 1/6 goes to group 1 = key 1: 1/3 + 1/6 = 1/2; key 2 stays 1/3.
    # output = 1/6 * 1 + 1/2 * 2 + 1/3 * 4 = 2.5
    q = torch.zeros(1, 1, 1, 2)
    k = torch.zeros(1, 1, 3, 2)
    v = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 3, 1)
    call = _call(q, k, v, causal=False)
    edit = _Move(torch.tensor([[[1, 0, 0]]]).bool(), torch.tensor([[[0, 1, 0]]]).bool(), 0.5)
    assert grouped_attention(call, [edit]).item() == pytest.approx(2.5)
    assert reference_attention(call, [edit]).item() == pytest.approx(2.5)


@pytest.mark.parametrize("n_kv", [4, 2])
@pytest.mark.parametrize(  # both exact paths (one fused call with atom classes / rebuilt rows), two kernels
    "share,backend", [(0.0, "auto"), (1.0, "auto"), (0.0, "triton"), (1.0, "triton")]
)
def test_grouped_edits_compose_and_equal_the_explicit_reference(n_kv, share, backend, monkeypatch):
    if backend == "triton":
        skip_unless_triton_runs_on_cpu()
    monkeypatch.setenv("HEADLAB_ATTENTION", backend)
    monkeypatch.setattr("headlab.interventions.core._EXPLICIT_SHARE", share)
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 4, 9, 8
    q, k, v = (torch.randn(b, x, n, d, generator=g) for x in (h, n_kv, n_kv))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    call = _call(q, k, v, mask=valid)
    g0 = torch.zeros(b, h, n, dtype=torch.bool)
    g0[:, :, 3] = True
    g0[:, 1, 5] = True  # per-head groups
    g1 = torch.zeros(b, 1, n, dtype=torch.bool)
    g1[:, :, 6:] = True
    g2 = torch.zeros(b, 1, n, dtype=torch.bool)
    g2[:, :, 4] = True
    edits = [_Move(g0, g1, 0.3), _Move(g1 & ~g0, g2, 0.8)]
    fused, ref = grouped_attention(call, edits), reference_attention(call, edits)
    rows = valid[:, None, :, None].expand_as(fused)
    torch.testing.assert_close(fused[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused, grouped_attention(call, []), atol=1e-3)


@pytest.fixture(scope="module")
def zoo_lm():
    return hl.load("zoo:lm")


@pytest.fixture(scope="module")
def zoo_llava():
    return hl.load("zoo:llava")


def _text(lm):
    lm.tokenizer.padding_side = "left"
    return dict(
        lm.tokenizer(
            ["When Mary and John went to the store, John gave a drink to", "w4 w9 w2 w4 w9"],
            return_tensors="pt",
            padding=True,
        )
    )


def _scene_inputs(lm, questions=("apple", "car", "tree")):
    made = scenes.make_scenes(len(questions), prior=0.5, seed=3)
    lm.processor.tokenizer.padding_side = "left"
    prompts = [llava_recipe.conversation(scenes.question(o)) for o in questions]
    return dict(
        lm.processor(text=prompts, images=[scenes.render(s) for s in made], return_tensors="pt", padding=True)
    )


def _greedy_scores(lm, inputs, steps: int = 3):
    """The per-step logits of a greedy `generate` of exactly `steps` tokens (KV cache on)."""
    return lm.model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    ).scores


def _o_proj_edit(lm, layer, edit):
    """Edit the o_proj input of `layer` by hand (the independent oracle for head-level interventions)."""
    attn = lm.attention_modules["lm"][layer]
    d = lm.head_dim

    def hook(module, args):
        x = args[0].clone().view(*args[0].shape[:-1], -1, d)  # [b, q, h, d]
        return (edit(x).flatten(-2),)

    return attn.o_proj.register_forward_pre_hook(hook)


@torch.no_grad()
def test_head_scale_and_zero_ablation_equal_editing_o_proj_by_hand(zoo_lm):
    inputs = _text(zoo_lm)
    base = zoo_lm.model(**inputs).logits
    with intervene(zoo_lm, HeadScale(((1, 2),), factor=1.0)):
        torch.testing.assert_close(zoo_lm.model(**inputs).logits, base, atol=1e-5, rtol=0)
    with intervene(zoo_lm, HeadAblation(((1, 2), (0, 3)))):
        ablated = zoo_lm.model(**inputs).logits

    def zero(head):
        def edit(x):
            x[:, :, head] = 0
            return x

        return edit

    handles = [_o_proj_edit(zoo_lm, 1, zero(2)), _o_proj_edit(zoo_lm, 0, zero(3))]
    try:
        by_hand = zoo_lm.model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ablated, by_hand, atol=1e-4, rtol=1e-4)
    assert (ablated - base).abs().max() > 1.0
    with intervene(zoo_lm, HeadScale(((1, 2),), factor=3.0)):
        scaled = zoo_lm.model(**inputs).logits
    assert not torch.allclose(scaled, base, atol=1e-3)


@torch.no_grad()
def test_head_scales_fold_into_the_fused_call(zoo_lm, monkeypatch):
    """HeadScale alone: the factors go into the kernel's epilogue (spec.head_scale), same logits as the
    reference engine's explicit scaling; composed with a non-scaling patch they stay a transform."""
    import headlab.interventions.core as core
    import headlab.probe.call as call  # the unedited fused call (AttentionCall.plain) lives there

    specs, real = [], core.fused_attention
    for module in (core, call):
        monkeypatch.setattr(
            module, "fused_attention", lambda q, k, v, spec: specs.append(spec) or real(q, k, v, spec)
        )
    inputs = _text(zoo_lm)
    plan = HeadScale(((1, 2), (1, 0), (0, 3)), factor=2.5)
    with intervene(zoo_lm, plan):
        folded = zoo_lm.model(**inputs).logits
    assert {tuple(s.head_scale[0].tolist()) for s in specs} == {(1.0, 1.0, 1.0, 2.5), (2.5, 1.0, 2.5, 1.0)}
    with intervene(zoo_lm, plan, engine="reference"):
        torch.testing.assert_close(folded, zoo_lm.model(**inputs).logits, atol=1e-4, rtol=1e-4)
    specs.clear()
    with intervene(zoo_lm, plan, HeadAblation(((1, 1), (0, 0)))):
        zoo_lm.model(**inputs)
    assert specs and all(s.head_scale is None for s in specs)


@torch.no_grad()
def test_mean_and_resample_ablation(zoo_lm):
    inputs = _text(zoo_lm)
    base = zoo_lm.model(**inputs).logits
    own = head_outputs(zoo_lm, inputs, [(1, 2)])
    with intervene(zoo_lm, HeadAblation(((1, 2),), kind="resample", source=own)):  # itself: no change
        torch.testing.assert_close(zoo_lm.model(**inputs).logits, base, atol=1e-5, rtol=0)
    means = mean_head_outputs(zoo_lm, inputs, [(1, 2)])
    valid = inputs["attention_mask"].bool()
    z = own[(1, 2)]  # [b, n, d] at example positions
    lengths = valid.sum(-1)
    real = torch.arange(z.shape[1])[None] < lengths[:, None]
    torch.testing.assert_close(means[(1, 2)], z[real].mean(0))

    def to_mean(x):
        x[:, :, 2] = means[(1, 2)]
        return x

    with intervene(zoo_lm, HeadAblation(((1, 2),), kind="mean", means=means)):
        ablated = zoo_lm.model(**inputs).logits
    handle = _o_proj_edit(zoo_lm, 1, to_mean)
    try:
        by_hand = zoo_lm.model(**inputs).logits
    finally:
        handle.remove()
    torch.testing.assert_close(ablated[valid], by_hand[valid], atol=1e-4, rtol=1e-4)
    with (
        pytest.raises(hl.InputError, match="needs means="),
        intervene(zoo_lm, HeadAblation(((1, 2),), kind="mean")),
    ):
        pass
    with pytest.raises(hl.SelectionError, match="out of range"), intervene(zoo_lm, HeadScale(((5, 0),))):
        pass


def test_vhr_selection_rule_hand_computed():
    # heads' VHD 1, 2, 9, 3 and TA 1, 1, 1, 9: head 2's VHD is an outlier (9 > mean 3.75 + std 3.11) but its
    # TA is not -> kept; median of (1, 2, 9, 3) = 2.5 -> heads 2 and 3 selected.
    vhd, ta = torch.tensor([1.0, 2.0, 9.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 9.0])
    assert select_heads(vhd, ta).tolist() == [False, False, True, True]
    # now head 2 also has the outlying TA -> its VHD is zeroed; median of (1, 2, 0, 3) = 1.5 -> heads 1, 3.
    ta = torch.tensor([1.0, 1.0, 9.0, 1.0])
    assert select_heads(vhd, ta).tolist() == [False, True, False, True]
    assert default_layers(32) == (1, *range(18, 32))
    assert default_layers(2) == (0, 1)


@torch.no_grad()
@torch.no_grad()
def test_vhr_text_branch_switch_equals_its_reference(zoo_llava):
    inputs = _scene_inputs(zoo_llava)
    spec = VHR(scale_text_branch=False)
    with intervene(zoo_llava, spec) as runner:
        fused = zoo_llava.model(**inputs).logits[:, -1]
        selected = runner.patches[0].selected
    reference, ref_selected = vhr_reference(zoo_llava, inputs, spec)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(selected[layer], ref_selected[layer]) for layer in selected)


@torch.no_grad()
def test_vhr_equals_its_reference_and_is_frozen_for_generation(zoo_llava):
    inputs = _scene_inputs(zoo_llava)
    base = zoo_llava.model(**inputs).logits[:, -1]
    with intervene(zoo_llava, VHR()) as runner:
        fused = zoo_llava.model(**inputs).logits[:, -1]
        selected = runner.patches[0].selected
        generated = zoo_llava.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        scores = _greedy_scores(zoo_llava, inputs)
    frozen = tuple((layer, h) for layer, s in selected.items() for h in s[0].nonzero().flatten().tolist())
    one = {k: v[:1] for k, v in inputs.items()}
    with intervene(zoo_llava, HeadScale(frozen, factor=2.0)):  # example 0's heads, fixed at every step
        fixed = _greedy_scores(zoo_llava, one)
    for step_scores, fixed_scores in zip(scores, fixed, strict=True):
        torch.testing.assert_close(step_scores[0], fixed_scores[0], atol=1e-4, rtol=1e-4)
    reference, ref_selected = vhr_reference(zoo_llava, inputs, VHR())
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(selected[layer], ref_selected[layer]) for layer in selected)
    assert all(s.sum(-1).tolist() == [2, 2, 2] for s in selected.values())  # top half of 4 heads
    assert (fused - base).abs().max() > 0.1
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    with intervene(zoo_llava, VHR(alpha=1.0)):
        torch.testing.assert_close(zoo_llava.model(**inputs).logits[:, -1], base, atol=1e-5, rtol=0)
    with pytest.raises(hl.SelectionError, match="vision-language"), intervene(hl.load("zoo:lm"), VHR()):
        pass


def test_var_rule_hand_computed():
    # one row over keys [bos, img0 (visual sink), img1, img2, txt]: 0.3, 0.3, 0.1, 0.1, 0.2.
    # image mass 0.5 >= 0.2; visual-sink share 0.3 / 0.5 = 0.6 > rho 0.5 -> NOT selected (code rule).
    # with rho = 0.7 it is selected: sinks (bos, img0) keep p = 0.6: 0.18, 0.18; freed 0.4 * 0.6 = 0.24 goes
    # to img1, img2 in proportion (0.1 each of 0.2): 0.1 + 0.12 = 0.22 each; txt stays 0.2.
    probs = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.2]).view(1, 1, 1, 5)
    s_vis = torch.tensor([[[0, 1, 0, 0, 0]]]).bool()
    s_txt = torch.tensor([[[1, 0, 0, 0, 0]]]).bool()
    non_sink = torch.tensor([[[0, 0, 1, 1, 0]]]).bool()
    for rho, want in ((0.5, [0.3, 0.3, 0.1, 0.1, 0.2]), (0.7, [0.18, 0.18, 0.22, 0.22, 0.2])):
        edit = object.__new__(_VAREdit)
        edit.groups, edit.rows, edit.keep = (
            (s_vis, s_txt, non_sink),
            torch.ones(1, 1, 1, dtype=torch.bool),
            0.6,
        )
        edit.spec = VAR(rho=rho)
        torch.testing.assert_close(edit.reference(probs).flatten(), torch.tensor(want))
        masses = [(probs.flatten() * g.flatten()).sum().view(1, 1, 1) for g in edit.groups]
        factors, _ = edit.factors(masses, torch.tensor(0.2).view(1, 1, 1))
        by_factor = probs.flatten() * (
            factors[0].flatten() * s_vis.flatten()
            + factors[1].flatten() * s_txt.flatten()
            + factors[2].flatten() * non_sink.flatten()
            + 1.0 * ~(s_vis | s_txt | non_sink).flatten()
        )
        torch.testing.assert_close(by_factor, torch.tensor(want))


@torch.no_grad()
@pytest.mark.parametrize("share", [0.0, 1.0])
def test_var_fused_equals_reference_on_the_zoo_llava_and_in_generate(zoo_llava, share, monkeypatch):
    monkeypatch.setattr("headlab.interventions.core._EXPLICIT_SHARE", share)
    inputs = _scene_inputs(zoo_llava)
    base = zoo_llava.model(**inputs).logits[:, -1]
    # the tiny model has no massive activations (sink scores ~2.7 against tau = 20): with the paper's tau
    # VAR finds no sinks and changes nothing; tau = 2 finds BOS-like text sinks in both layers.
    with intervene(zoo_llava, VAR(layers=(0, 1))):
        torch.testing.assert_close(zoo_llava.model(**inputs).logits[:, -1], base, atol=1e-5, rtol=0)
    out = {}
    for engine in ("fused", "reference"):
        with intervene(zoo_llava, VAR(tau=2.0, layers=(0, 1)), engine=engine) as runner:
            out[engine] = zoo_llava.model(**inputs).logits[:, -1]
            assert all(s.any() for s in runner.patches[0].sinks[1])
    torch.testing.assert_close(out["fused"], out["reference"], atol=1e-4, rtol=1e-4)
    assert (out["fused"] - base).abs().max() > 0.1
    with intervene(zoo_llava, VAR(tau=2.0, layers=(0, 1), p=1.0)):  # sinks keep everything
        torch.testing.assert_close(zoo_llava.model(**inputs).logits[:, -1], base, atol=1e-4, rtol=0)
    scores = {}
    for engine in ("fused", "reference"):  # composed with VHR, in generate with a KV cache
        with intervene(zoo_llava, VHR(), VAR(tau=2.0, layers=(0, 1)), engine=engine):
            scores[engine] = _greedy_scores(zoo_llava, inputs)
    for a, b in zip(scores["fused"], scores["reference"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_var_through_the_triton_kernel_equals_reference(zoo_llava, monkeypatch):
    """The whole model with VAR's edits served by the Triton kernel (the interpreter on the CPU)."""
    skip_unless_triton_runs_on_cpu()
    monkeypatch.setattr("headlab.interventions.core._EXPLICIT_SHARE", 0.0)  # the atom-class kernel path
    inputs = _scene_inputs(zoo_llava)
    out = {}
    for engine, backend in (("fused", "triton"), ("reference", "auto")):
        monkeypatch.setenv("HEADLAB_ATTENTION", backend)
        with intervene(zoo_llava, VAR(tau=2.0, layers=(0, 1)), engine=engine):
            out[engine] = zoo_llava.model(**inputs).logits[:, -1]
    torch.testing.assert_close(out["fused"], out["reference"], atol=1e-4, rtol=1e-4)


def test_model_is_restored_after_an_exception(zoo_llava):
    inputs = _scene_inputs(zoo_llava, ("apple",))
    configs_before = zoo_llava.model.config._attn_implementation
    with torch.no_grad():
        base = zoo_llava.model(**inputs).logits
    with pytest.raises(RuntimeError, match="boom"), intervene(zoo_llava, VHR(), VAR(tau=2.0, layers=(0, 1))):
        zoo_llava.model(**inputs)
        raise RuntimeError("boom")
    assert zoo_llava.model.config._attn_implementation == configs_before
    for module in zoo_llava.attention_modules["lm"]:
        assert not hasattr(module, "_headlab_runner") and not hasattr(module, "_headlab_site")
    assert not zoo_llava.model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(zoo_llava.model(**inputs).logits, base)


@torch.no_grad()
def test_capture_inside_intervene_records_and_keeps_the_edit(zoo_lm):
    inputs = _text(zoo_lm)
    with intervene(zoo_lm, HeadScale(((1, 2),), factor=0.0)):
        ablated = zoo_lm.model(**inputs).logits
        with hl.capture(zoo_lm) as rec:
            again = zoo_lm.model(**inputs).logits
    torch.testing.assert_close(again, ablated, atol=1e-5, rtol=0)
    assert set(rec.head_stats.layer) == {0, 1}


def test_overhead_benchmark_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "interventions.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("VHR (lockstep)", "VAR", "ACT", "PINE (k = 4, fused)"):
        assert f"n=256 {name}" in done.stdout


@torch.no_grad()
@pytest.mark.parametrize("capture_outside", [False, True], ids=["capture-inside", "capture-outside"])
def test_capture_and_intervene_nest_both_ways_in_one_session(zoo_lm, capture_outside):
    """One session, whichever block is opened first: the edit is kept; statistics are those of the
    attention before the edits (equal to an unedited capture); head outputs are those after the edits (the
    ablated head's output is zero); the capture numbers its examples from 0; both blocks leave nothing."""
    inputs = _text(zoo_lm)
    edit = HeadScale(((1, 2),), factor=0.0)
    with hl.capture(zoo_lm, head_outputs=hl.Select(layers=[1])) as plain:
        zoo_lm.model(**inputs)
    with intervene(zoo_lm, edit):
        zoo_lm.model(**inputs)  # a pass before the capture opens: must not shift the capture's example ids
        ablated = zoo_lm.model(**inputs).logits
    blocks = [
        lambda: hl.capture(zoo_lm, head_outputs=hl.Select(layers=[1])),
        lambda: intervene(zoo_lm, edit),
    ]
    outer, inner = blocks if capture_outside else blocks[::-1]
    with outer() as a, inner() as b:
        assert a is not b and zoo_lm.model._headlab_session is not None
        logits = zoo_lm.model(**inputs).logits
    rec = a if capture_outside else b
    torch.testing.assert_close(logits, ablated, atol=1e-5, rtol=0)
    pd.testing.assert_frame_equal(rec.head_stats, plain.head_stats, atol=1e-5, rtol=1e-5)
    z, z_plain = rec.z(layer=1), plain.z(layer=1)
    assert torch.equal(z[..., 2, :], torch.zeros_like(z[..., 2, :])) and z_plain[..., 2, :].abs().max() > 0
    torch.testing.assert_close(z[..., [0, 1, 3], :], z_plain[..., [0, 1, 3], :], atol=1e-5, rtol=1e-5)
    assert sorted(set(rec.head_stats.example)) == [0, 1]
    assert not hasattr(zoo_lm.model, "_headlab_session") and not zoo_lm.model._forward_pre_hooks
    for module in zoo_lm.attention_modules["lm"]:
        assert not hasattr(module, "_headlab_session") and not hasattr(module, "_headlab_site")


@torch.no_grad()
def test_side_passes_are_not_recorded_by_an_open_capture(zoo_llava):
    """VHR's selection runs its own passes inside the session; a capture around it records only the real
    pass (its examples, its residuals), exactly as without VHR."""
    inputs = _scene_inputs(zoo_llava, ("apple", "dog"))
    with hl.capture(zoo_llava, stats=None, residuals=hl.Select(layers=[0])) as alone:
        zoo_llava.model(**inputs)
    with (
        hl.capture(zoo_llava, stats=None, residuals=hl.Select(layers=[0])) as rec,
        intervene(zoo_llava, VHR()),
    ):
        zoo_llava.model(**inputs)
    assert len(rec.residuals) == len(alone.residuals)
    assert sorted(set(rec.residuals.example)) == sorted(set(alone.residuals.example))
