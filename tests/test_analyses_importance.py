"""Head importance (headlab.analyses.importance): Michel et al.'s gates leave the model unchanged and their
gradients match finite differences; on the zoo LM the induction circuit (previous-token heads L0H0, L0H2
and induction head L1H0) ranks at the top by zero ablation and gradient importance; ViT partial pruning's
fused edit equals the explicit-pattern reference, and local and global pruning differ."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

import headlab as hl
from headlab.analyses import importance as imp
from headlab.analyses import pruning
from headlab.store import Store

CIRCUIT = {(0, 0), (0, 2), (1, 0)}  # the zoo LM's previous-token heads and induction head


@pytest.fixture(scope="module")
def zoo_lm():
    return hl.load("zoo:lm")


@pytest.fixture(scope="module")
def zoo_vit():
    return hl.load("zoo:vit")


@pytest.fixture(scope="module")
def induction(zoo_lm):
    return imp.task_data(zoo_lm, "induction", n=32, seed=0)


def _auc(frame, column: str) -> float:
    truth = [(r.layer, r.head) in CIRCUIT for r in frame[["layer", "head"]].itertuples(index=False)]
    return roc_auc_score(truth, frame[column])


def _top(frame, k: int) -> set:
    best = frame.sort_values("rank").head(k)
    return set(zip(best["layer"], best["head"], strict=True))


def test_gates_at_one_leave_logits_unchanged_and_a_zero_gate_is_zero_ablation(zoo_lm, induction):
    x = induction.rows(0, 4).inputs
    with torch.no_grad():
        with hl.intervene(zoo_lm, hl.HeadScale(((0, 0),), 1.0)):
            plain = zoo_lm.model(**x).logits
        with hl.intervene(zoo_lm, imp.HeadGates()):
            gated = zoo_lm.model(**x).logits
        values = torch.ones(2, 4)
        values[1, 0] = 0.0
        with hl.intervene(zoo_lm, imp.HeadGates(values)):
            closed = zoo_lm.model(**x).logits
        with hl.intervene(zoo_lm, hl.HeadAblation(((1, 0),), "zero")):
            ablated = zoo_lm.model(**x).logits
    torch.testing.assert_close(gated, plain, rtol=0, atol=0)
    torch.testing.assert_close(closed, ablated, rtol=1e-6, atol=1e-5)


def test_gate_gradients_match_finite_differences(zoo_lm, induction):
    data = induction.rows(0, 6)

    def loss(values):
        with hl.intervene(zoo_lm, imp.HeadGates(values)):
            return imp.example_losses(data, zoo_lm.model(**data.inputs).logits.float()).sum()

    values = torch.ones(2, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(values), values)
    token_grads, real = imp.token_gate_gradients(zoo_lm, data)  # [L, b, h, q]
    torch.testing.assert_close(token_grads.sum((1, 3)), grad, rtol=1e-4, atol=1e-5)
    eps = 1e-2
    with torch.no_grad():
        for layer, head in [(0, 0), (0, 3), (1, 0), (1, 2)]:
            bump = torch.zeros(2, 4)
            bump[layer, head] = eps
            fd = (loss(1 + bump) - loss(1 - bump)) / (2 * eps)
            assert float(fd) == pytest.approx(float(grad[layer, head]), rel=2e-2, abs=2e-3)
    assert int(real.sum()) == int(data.inputs["attention_mask"].sum())


def test_variants_are_ordered_and_layers_normalised(zoo_lm, induction):
    data = induction.rows(0, 12)
    raw = {
        v: imp.gradient_importance(zoo_lm, data, variant=v, batch_size=4).raw.to_numpy() for v in imp.VARIANTS
    }
    assert (raw["token"] >= raw["example"] - 1e-9).all()  # triangle inequality, head by head
    assert (raw["example"] >= raw["batch"] - 1e-9).all()
    frame = imp.gradient_importance(zoo_lm, data)
    norms = frame.groupby("layer").importance.apply(lambda s: float((s**2).sum() ** 0.5))
    assert norms.to_numpy() == pytest.approx([1.0, 1.0])


def test_induction_circuit_ranks_top_by_ablation_and_gradient(zoo_lm, induction):
    zero = imp.ablation_importance(zoo_lm, induction, kind="zero")
    grad = imp.gradient_importance(zoo_lm, induction, variant="token")
    aucs = {"zero_loss": _auc(zero, "loss_increase"), "zero_acc": _auc(zero, "acc_drop")}
    aucs["gradient"] = _auc(grad, "importance")
    print("ROC AUC vs the induction circuit:", aucs)
    assert _top(zero, 3) == CIRCUIT
    assert aucs["zero_loss"] == 1.0
    assert _top(grad, 1) == {(1, 0)}  # the induction head leads
    assert _top(grad, 4) >= CIRCUIT  # |dL/dxi| also flags L0H3, whose removal LOWERS the loss
    assert aucs["gradient"] >= 0.8
    l0h3 = grad.query("layer == 0 and head == 3").first_order_loss_increase.item()
    assert l0h3 < 0 and zero.query("layer == 0 and head == 3").loss_increase.item() < 0


def test_mean_and_resample_ablation(zoo_lm):
    data = imp.task_data(zoo_lm, "ioi", n=8, seed=0)
    reference = imp.task_data(zoo_lm, "ioi", n=8, seed=1)
    heads = [(0, 1), (1, 0)]
    for kind in ("mean", "resample"):
        frame = imp.ablation_importance(zoo_lm, data, kind=kind, heads=heads, reference=reference)
        assert list(zip(frame["layer"], frame["head"], strict=True)) == heads
        assert frame.logit_shift.gt(0).all()
    with pytest.raises(hl.InputError, match="resample ablation needs corrupted prompts"):
        imp.ablation_importance(zoo_lm, imp.task_data(zoo_lm, "induction", n=2), kind="resample")
    with pytest.raises(hl.InputError, match="reference set"):
        imp.ablation_importance(zoo_lm, data, kind="mean")
    with pytest.raises(hl.SelectionError, match="no task named"):
        imp.task_data(zoo_lm, "nope")


def test_grid_removal_by_hand(zoo_vit):
    removed = pruning.grid_removal(zoo_vit, 65, "local", 1.0)
    assert not removed[0].any() and not removed[:, 0].any()  # CLS is exempt
    assert removed[1].nonzero().flatten().tolist() == [1, 2, 9]  # patch (0,0): itself, (0,1), (1,0)
    glob = pruning.grid_removal(zoo_vit, 65, "global", 1.0)
    assert (removed ^ glob)[1:, 1:].all() and not (removed & glob).any()
    with pytest.raises(hl.SelectionError, match="native image size"):
        pruning.grid_removal(zoo_vit, 50, "local", 1.0)


@pytest.mark.parametrize("part", pruning.PARTS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_partial_pruning_fused_equals_reference(zoo_vit, part, renormalize):
    x = imp.task_data(zoo_vit, n=3, seed=1).inputs
    out = []
    with torch.no_grad():
        for reference in (False, True):
            spec = pruning.PartialPruning(1, 1, part, 1.5, renormalize, reference)
            with hl.intervene(zoo_vit, spec):
                out.append(zoo_vit.model(**x).logits)
        plain = zoo_vit.model(**x).logits
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-4)
    assert (out[0] - plain).abs().max() > 1e-3  # the edit does something


def test_vit_partial_pruning_local_and_global_differ(zoo_vit):
    data = imp.task_data(zoo_vit, n=16, seed=0)
    frame = pruning.partial_pruning(zoo_vit, data, heads=[(0, 0), (1, 1)], radius=2.0, batch_size=16)
    print(frame[["layer", "head", "part", "loss_increase", "logit_shift", "removed_mass"]])
    for _, group in frame.groupby(["layer", "head"]):
        by = group.set_index("part")
        assert by.logit_shift["local"] != pytest.approx(by.logit_shift["global"], rel=0.1)
        assert by.removed_mass["local"] + by.removed_mass["global"] <= 1 + 1e-5
        assert by.removed_mass["head"] == 1.0
    lm_like = imp.TaskData("lm", {}, torch.zeros(1))
    with pytest.raises(hl.UnsupportedModelError, match="ViT"):
        pruning.partial_pruning(zoo_vit, lm_like)


def test_analyses_entries_run_on_a_store(zoo_lm, tmp_path):
    store = Store.create(tmp_path / "s", zoo_lm)
    entry = imp.ANALYSES["importance-gradient"]
    options = entry.parse({})
    frame = entry.run(store, {**options, "n": 8})
    assert {"layer", "head", "importance", "rank"} <= set(frame.columns) and len(frame) == 8
    assert set(imp.ANALYSES) == {"importance-gradient", "importance-ablation"}
    assert set(pruning.ANALYSES) == {"vit-partial-pruning"}
