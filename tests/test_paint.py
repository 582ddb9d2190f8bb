"""PAINT: the dual-stream selection equals a hand computation and a capture of the vision tower's CLS rows;
the score boost in every kernel backend equals a hand-computed case and the explicit oracle; on the zoo LLaVA
the fused intervention equals the reference engine and the one-example-at-a-time oracle, touches only the
last query row, composes with VHR and VAR in generate, and a batch answers as batch 1 does; PAI's CFG branch
equals an explicit two-pass reference; bad models and combinations are refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import headlab as hl
from headlab.cli import app
from headlab.datasets import scenes
from headlab.errors import InputError, SelectionError, UnsupportedModelError
from headlab.interventions import ACT, VAR, VHR, Patch, intervene
from headlab.interventions.core import edited_attention
from headlab.interventions.paint import (
    PAICFG,
    PAINT,
    default_layers,
    head_sensitivity,
    paint_reference,
    paint_tokens,
    refine,
    select_tokens,
)
from headlab.kernels.fused import fused_attention, pick_backend
from headlab.kernels.reference import naive_attention
from headlab.kernels.spec import FusedSpec, ScoreBoost
from headlab.probe.call import AttentionCall
from headlab.probe.context import BatchContext
from headlab.probe.roles import text_roles
from headlab.runs import answering
from headlab.zoo import llava as llava_recipe


@pytest.fixture(scope="module")
def zoo_llava():
    return hl.load("zoo:llava")


def _inputs(lm, questions=("apple", "car", "tree"), longer: int = 1):
    """A left-padded batch of scene questions; question `longer` gets extra words (so the others are padded)."""
    made = scenes.make_scenes(len(questions), prior=0.5, seed=3)
    lm.processor.tokenizer.padding_side = "left"
    prompts = [llava_recipe.conversation(scenes.question(o)) for o in questions]
    prompts[longer] = prompts[longer].replace("USER:", "USER: please")
    images = [scenes.render(s) for s in made]
    inputs = dict(lm.processor(text=prompts, images=images, return_tensors="pt", padding=True))
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) > 1  # really padded
    return inputs


def _row(inputs, b):
    keep = inputs["attention_mask"][b].bool()
    return {
        "input_ids": inputs["input_ids"][b][keep][None],
        "attention_mask": inputs["attention_mask"][b][keep][None],
        "pixel_values": inputs["pixel_values"][b : b + 1],
    }


def _greedy(lm, inputs, steps: int = 3):
    return lm.model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )


# ------------------------------------------------------------------------------------------- selection


def test_select_tokens_by_hand():
    first = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.9, 0.05, 0.4, 0.35])  # top floor(0.25 * 8) = 2: patches 4, 1
    penult = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 30.0])
    # numpy's linear quartiles: Q1 = 2 + 0.75 = 2.75, Q3 = 6 + 0.25 = 6.25; fence 6.25 + 1.5 * 3.5 = 11.5
    assert np.percentile(penult.numpy(), 25) == 2.75 and np.percentile(penult.numpy(), 75) == 6.25
    local, summary = select_tokens(first, penult, 0.25)
    assert local.nonzero().flatten().tolist() == [1, 4] and summary.nonzero().flatten().tolist() == [7]
    penult = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0, 1.0, 1.0, 1.0])  # patch 4 is a summary token: L := L \ S
    local, summary = select_tokens(first, penult, 0.25)
    assert local.nonzero().flatten().tolist() == [1] and summary.nonzero().flatten().tolist() == [4]


def test_default_layers_scale_the_codes_2_to_31():
    assert default_layers(32) == tuple(range(2, 32))
    assert default_layers(40) == tuple(range(2, 40)) and default_layers(2) == (0, 1)


@torch.no_grad()
def test_selection_in_the_pass_equals_a_capture_of_the_cls_rows(zoo_llava):
    inputs = _inputs(zoo_llava)
    with intervene(zoo_llava, PAINT()) as runner:
        zoo_llava.model(**inputs)
    in_pass = runner.patches[0].latest
    captured = paint_tokens(zoo_llava, inputs)
    assert len(in_pass) == len(captured) == 3
    for (l1, s1), (l2, s2) in zip(in_pass, captured, strict=True):
        assert l1.tolist() == l2.tolist() and s1.tolist() == s2.tolist()
        assert not set(l1.tolist()) & set(s1.tolist())
    assert any(len(s) for _, s in in_pass) and all(len(l) + len(s) > 0 for l, s in in_pass)  # noqa: E741


# ------------------------------------------------------------------------------------------- the kernel


def _hand_case():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])[None, None]  # [1, 1, 2, 2]
    k = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.5, 0.0]])[None, None]  # scores of both rows: 2, -1, 0.5
    v = torch.eye(3)[None, None]  # the output is the probabilities
    boost = ScoreBoost(coef=torch.tensor([0.5, 0.5, 0.0])[None, None], rows=torch.tensor([[False, True]]))
    return q, k, v, boost


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("backend", ["tiled", "reference", "flex", "auto"])
def test_boost_equals_a_hand_computed_case(backend):
    q, k, v, boost = _hand_case()
    # causal, bottom-right: row 0 sits at key 1 (sees keys 0, 1), row 1 at key 2 (sees all). Only row 1 is
    # boosted: 2 + 0.5 * 2 = 3, -1 + 0.5 * 1 = -0.5, 0.5 (coefficient 0).
    want = torch.tensor([[*_softmax([2.0, -1.0]), 0.0], _softmax([3.0, -0.5, 0.5])])
    att = fused_attention(
        q, k, v, FusedSpec(scale=1.0, causal=True, boost=boost, entropy=True), backend=backend
    )
    torch.testing.assert_close(att.out[0, 0].float(), want, atol=1e-6, rtol=0)
    entropy = -(want * want.clamp(min=1e-30).log()).sum(-1)
    torch.testing.assert_close(att.entropy[0, 0], entropy, atol=1e-5, rtol=0)
    oracle = naive_attention(q, k, v, scale=1.0, causal=True, boost=boost)
    torch.testing.assert_close(oracle.probs[0, 0], want, atol=1e-6, rtol=0)


def test_boost_is_routed_away_from_sdpa_and_triton():
    q, k, v, boost = _hand_case()
    spec = FusedSpec(scale=1.0, causal=True, boost=boost)
    assert pick_backend(q, spec) == "tiled"
    for backend in ("sdpa", "triton"):
        with pytest.raises(InputError, match="cannot apply a score boost"):
            fused_attention(q, k, v, spec, backend=backend)
    with pytest.raises(InputError, match="coef"):
        ScoreBoost(coef=torch.ones(3))


@pytest.mark.parametrize("backend", ["tiled", "flex"])
def test_boost_backends_equal_the_oracle(backend):
    torch.manual_seed(1)
    b, h, kv, n_q, n_k, d = 2, 4, 2, 5, 9, 8
    q, k, v = torch.randn(b, h, n_q, d), torch.randn(b, kv, n_k, d), torch.randn(b, kv, n_k, d)
    mask = torch.ones(b, 1, n_q, n_k, dtype=torch.bool)
    mask[0, ..., :2] = False  # left padding of row 0
    mask &= torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
    rows = torch.zeros(b, n_q, dtype=torch.bool)
    rows[0, -1] = rows[1, 2] = rows[1, 4] = True
    boost = ScoreBoost(coef=torch.rand(b, h, n_k), rows=rows)
    key_class = torch.randint(0, 3, (b, 1, n_k))
    spec = FusedSpec(
        scale=d**-0.5,
        mask=mask,
        boost=boost,
        key_class=key_class,
        n_classes=3,
        class_outputs=True,
        entropy=True,
    )
    got = fused_attention(q, k, v, spec, backend=backend)
    ref = naive_attention(q, k, v, mask=mask, scale=d**-0.5, boost=boost)
    torch.testing.assert_close(got.out.float(), ref.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lse, ref.lse, atol=1e-5, rtol=1e-5)
    onehot = torch.nn.functional.one_hot(key_class[:, 0], 3).float()[:, None]  # [b, 1, k, 3]
    torch.testing.assert_close(got.class_mass, ref.probs @ onehot, atol=1e-5, rtol=1e-5)
    p = ref.probs
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
    torch.testing.assert_close(got.entropy, entropy, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- the zoo LLaVA


@torch.no_grad()
def test_paint_fused_equals_the_reference_and_the_oracle(zoo_llava):
    inputs = _inputs(zoo_llava)
    base = zoo_llava.model(**inputs).logits
    out = {}
    for engine in ("fused", "reference"):
        with intervene(zoo_llava, PAINT(), engine=engine):
            out[engine] = zoo_llava.model(**inputs).logits
    torch.testing.assert_close(out["fused"], out["reference"], atol=1e-4, rtol=1e-4)
    oracle = paint_reference(zoo_llava, inputs)  # one example at a time, the sets from a capture
    torch.testing.assert_close(out["fused"][:, -1], oracle, atol=1e-4, rtol=1e-4)
    # only the last query row is boosted: every earlier position is the plain model's
    torch.testing.assert_close(out["fused"][:, :-1], base[:, :-1], atol=1e-5, rtol=0)
    assert (out["fused"][:, -1] - base[:, -1]).abs().max() > 0.05
    with intervene(zoo_llava, PAINT(alpha=0.0, beta=0.0)):  # no boost: the plain model
        torch.testing.assert_close(zoo_llava.model(**inputs).logits, base, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(
    "plan",
    [
        lambda: [PAINT(alpha=0.9)],
        lambda: [PAINT(), VHR()],
        lambda: [VHR(), PAINT(), VAR(tau=2.0, layers=(0, 1))],
        lambda: [PAINT(head_sensitivity=True)],
        lambda: [PAINT(), PAICFG()],
        lambda: [
            PAINT(),
            ACT(heads=[(layer, h) for layer in (0, 1) for h in range(4)], layers=(0, 1), tau=0.05),
        ],
    ],
    ids=["paint", "paint+vhr", "vhr+paint+var", "head-sensitivity", "paint+cfg", "paint+act"],
)
def test_paint_in_generate_fused_equals_reference_and_batch_one(zoo_llava, plan):
    inputs = _inputs(zoo_llava)
    got = {}
    for engine in ("fused", "reference"):
        with intervene(zoo_llava, *plan(), engine=engine):
            got[engine] = _greedy(zoo_llava, inputs)
    for a, b in zip(got["fused"].scores, got["reference"].scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for b in range(3):  # each row of the batch as that example alone
        with intervene(zoo_llava, *plan()):
            one = _greedy(zoo_llava, _row(inputs, b))
        assert one.sequences[0, -3:].tolist() == got["fused"].sequences[b, -3:].tolist()
        for x, y in zip(got["fused"].scores, one.scores, strict=True):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=1e-4)


def test_head_sensitivity_is_image_mass_over_its_head_mean():
    torch.manual_seed(2)
    b, h, n, d = 2, 3, 6, 4
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    valid = torch.ones(b, n, dtype=torch.bool)
    roles = tuple(text_roles([1] * n) for _ in range(b))
    ctx = BatchContext(tower="lm", step=0, pass_id=1, examples=(0, 1), roles=roles, key_valid=valid)
    call = AttentionCall(None, "lm", 0, q, k, v, None, d**-0.5, True, ctx)
    image = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    last = torch.tensor([n - 1, n - 1])
    probs = naive_attention(q, k, v, scale=d**-0.5, causal=True).probs[:, :, -1]  # [b, h, k]
    mass = (probs * image[:, None]).sum(-1)
    torch.testing.assert_close(head_sensitivity(call, last, image), mass / mass.mean(-1, keepdim=True))


# ------------------------------------------------------------------------------------------- PAI's CFG


def test_refine_by_hand():
    img = torch.tensor([0.6, 0.3, 0.05, 0.05]).log()
    txt = torch.tensor([0.25, 0.25, 0.25, 0.25]).log()
    got = refine(img, txt, 1.1, 0.1)  # plausible: logp >= log(0.6) + log(0.1) = log(0.06)
    want = [1.1 * (math.log(p) - math.log(0.25)) + math.log(0.25) for p in (0.6, 0.3)]
    torch.testing.assert_close(got[:2], torch.tensor(want))
    assert got[2:].eq(float("-inf")).all()


@torch.no_grad()
def test_paicfg_equals_an_explicit_two_pass_reference(zoo_llava):
    inputs = _inputs(zoo_llava)
    steps = 3
    with intervene(zoo_llava, PAICFG()):  # (no min_new_tokens: its processor would mask the EOS score)
        got = zoo_llava.model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    steps = len(got.scores)
    for b in range(3):
        one = _row(inputs, b)
        ids = one["input_ids"]
        text = ids[ids != zoo_llava.image_token_id][None]
        for step in range(steps):
            if step and int(got.sequences[b, -steps + step - 1]) == zoo_llava.tokenizer.eos_token_id:
                break
            img = zoo_llava.model(input_ids=ids, pixel_values=one["pixel_values"]).logits[0, -1]
            txt = zoo_llava.model(input_ids=text).logits[0, -1]
            li, lt = img.log_softmax(-1), txt.log_softmax(-1)
            want = 1.1 * (li - lt) + lt
            want = want.masked_fill(li < li.max() + math.log(0.1), float("-inf"))
            torch.testing.assert_close(got.scores[step][b], want, atol=1e-4, rtol=1e-4)
            token = want.argmax()[None, None]
            assert int(token) == int(got.sequences[b, -steps + step])
            ids, text = torch.cat([ids, token], 1), torch.cat([text, token], 1)


# ------------------------------------------------------------------------------------------- refusals


def test_paint_refuses_towers_without_cls_and_bad_combinations(zoo_llava, tmp_path):
    from headlab.zoo.random_models import build_random

    paligemma = hl.load(str(build_random("paligemma", tmp_path / "paligemma")))
    with pytest.raises(UnsupportedModelError, match="no CLS token"):
        PAINT().bind(paligemma)
    with pytest.raises(SelectionError, match="out of range"):
        PAINT(layers=(5,)).bind(zoo_llava)
    inputs = _inputs(zoo_llava)
    with pytest.raises(SelectionError, match="do not compose"), intervene(zoo_llava, PAINT(), PAINT()):
        zoo_llava.model(**inputs)

    class _Replace(Patch):
        def replace(self, call):
            return call.plain[0]

    class _Boost(Patch):
        def score_boost(self, call):
            return ScoreBoost(coef=torch.zeros(1, 1, call.k.shape[2]))

    q = torch.randn(1, 2, 3, 4)
    ctx = BatchContext(
        tower="lm",
        step=0,
        pass_id=1,
        examples=(0,),
        roles=(text_roles([1] * 3),),
        key_valid=torch.ones(1, 3).bool(),
    )
    call = AttentionCall(None, "lm", 0, q, q, q, None, 0.5, True, ctx)
    with pytest.raises(SelectionError, match="PINE"):
        edited_attention(call, [_Replace(), _Boost()], "fused")


# ------------------------------------------------------------------------------------------- reports


def test_paint_condition_batched_answers_equal_batch_one(tmp_path):
    notes = answering.condition_interventions("paint", 32)
    assert isinstance(notes[0][0], PAINT) and "2..31" in notes[1]
    assert hl.conditions.parse_condition("with_image+paint").intervention == "paint"
    runs = {}
    for batch in (1, 8):
        out = tmp_path / f"batch{batch}"
        args = ["report", "pope", "--out", str(out), "--n", "8", "--vhd-images", "0"]
        result = CliRunner().invoke(app, [*args, "--interventions", "none,paint", "--batch-size", str(batch)])
        assert result.exit_code == 0, result.output
        lines = (out / "answers.jsonl").read_text().splitlines()
        runs[batch] = {
            (a["condition"], a["split"], a["question_id"]): a["answer"]
            for a in map(json.loads, lines)
            if "answer" in a
        }
    assert len(runs[1]) == 2 * 3 * 8 and runs[8] == runs[1]


def test_paint_condition_in_the_chair_report_and_a_capture(tmp_path):
    out = tmp_path / "chair"
    args = ["report", "chair", "--out", str(out), "--n", "4", "--interventions", "none,paint"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"none", "paint"}
    demo = tmp_path / "demo"
    assert CliRunner().invoke(app, ["demo", "--out", str(demo)]).exit_code == 0
    data = tmp_path / "questions.jsonl"
    line = {
        "id": "q",
        "image": scenes.make_scenes(1)[0].filename,
        "prompt": "USER: <image>\nIs there a car? ASSISTANT:",
    }
    data.write_text(json.dumps(line) + "\n")
    store = tmp_path / "store"
    capture = ["capture", "--model", "zoo:llava", "--data", str(data), "--out", str(store)]
    result = CliRunner().invoke(
        app, [*capture, "--images", str(demo), "--condition", "with_image,with_image+paint"]
    )
    assert result.exit_code == 0, result.output
    assert hl.Store.open(store).conditions() == ["with_image", "with_image+paint"]
