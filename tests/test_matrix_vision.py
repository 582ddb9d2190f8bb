"""The vision rows of the coverage matrix (headlab.models.matrix.VISION): every served vision tower's tiny
random model (2 layers, width 32, 4 heads, 32-pixel images in 8-pixel patches), built from its real config
class, saved with save_pretrained and loaded back with `hl.load`, is served as declared.

Served types: its adapter and the tower (prefix tokens, registers, the 4 x 4 grid) as declared, patterns
equal HF eager attention, outputs unchanged by capture, statistics equal the reference engine, the roles
(cls / register / patch counts) and grid of every captured example, the store round trip rebuilds eager's
patterns, head scaling / ablation. BEiT's relative position bias (random, non-zero in the tiny model) is
added to the scores everywhere. Refused types (Swin's windowed stages): a clear
UnsupportedModelError saying why, both when loaded and when described.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import assert_same_stats, eager_attentions

import headlab as hl
from headlab import models
from headlab.models import matrix
from headlab.models.matrix import Route
from headlab.probe.roles import grid_roles
from headlab.store import Store
from headlab.zoo.random_models import IMAGE_SIZE, PATCH_SIZE, build_random

ENTRIES = matrix.entries(hl.Family.VIT)
SERVED = [e for e in ENTRIES if e.served]
REFUSED = [e for e in ENTRIES if not e.served]
GRID = (IMAGE_SIZE // PATCH_SIZE,) * 2  # 4 x 4 patches
VISION = hl.Select(tower="vision")
# per served type: (CLS-like tokens, registers) before the grid
PREFIX = {
    "vit": (1, 0),
    "deit": (2, 0),  # CLS, distillation
    "dinov2": (1, 0),
    "dinov2_with_registers": (1, 4),
    "clip_vision_model": (1, 0),
    "siglip_vision_model": (0, 0),  # no CLS token
    "vit_msn": (1, 0),
    "ijepa": (0, 0),  # no CLS token
    "beit": (1, 0),
}
REASONS = {Route.WINDOWED: "shifted windows"}


def _ids(entries):
    return [e.model_type for e in entries]


def _save_refused(model_type: str, path: Path) -> Path:
    """Tiny random Swin (two stages of 2 x 2 windows), saved."""
    assert model_type == "swin"
    config = tf.SwinConfig(
        embed_dim=16, depths=[2, 2], num_heads=[2, 4], image_size=IMAGE_SIZE, patch_size=4, window_size=4
    )
    tf.SwinModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """model type -> `hl.load` of its tiny random model (built and loaded once per module)."""
    root, cache = tmp_path_factory.mktemp("matrix_vision"), {}

    def get(entry) -> hl.LoadedModel:
        if entry.model_type not in cache:
            cache[entry.model_type] = hl.load(build_random(entry.random_builder, root / entry.model_type))
        return cache[entry.model_type]

    return get


def _inputs() -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    }


def _outputs(lm, inputs) -> torch.Tensor:
    """Logits of a classifier, else the last hidden state."""
    with torch.no_grad():
        return lm.model(**inputs)[0]


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_served_by_its_adapter_with_the_declared_tower(loaded, entry):
    lm = loaded(entry)
    cls_like, registers = PREFIX[entry.model_type]
    assert lm.model_type == entry.model_type and entry.model_type in hl.SUPPORTED
    assert lm.adapter is models.adapter_for(entry.model_type) and lm.family is hl.Family.VIT
    assert lm.towers == (lm.main,) and lm.main.name == "vision" and not lm.main.causal
    assert (lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim) == (2, 4, 4, 8)
    assert lm.main.grid == GRID
    assert (lm.main.prefix_tokens, lm.main.register_tokens) == (cls_like + registers, registers)


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_patterns_equal_eager_outputs_are_unchanged_and_roles_are_right(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs()
    plain, eager = _outputs(lm, inputs), eager_attentions(lm, inputs)
    n_tokens = lm.main.prefix_tokens + GRID[0] * GRID[1]
    assert eager[0].shape == (2, lm.n_heads, n_tokens, n_tokens)
    with torch.no_grad(), hl.capture(lm, stats=None, patterns=VISION) as rec:
        during = lm.model(**inputs)[0]
    torch.testing.assert_close(during, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(_outputs(lm, inputs), plain)
    assert len(rec.patterns) == 2 * lm.n_layers * lm.n_heads  # examples x layers x heads
    for rows in rec.patterns:
        want = eager[rows.layer][rows.example, rows.head]
        torch.testing.assert_close(rows.probs, want[list(rows.queries)], atol=1e-5, rtol=1e-5)
    cls_like, registers = PREFIX[entry.model_type]
    logged = rec.examples
    assert list(logged.tower) == ["vision"] * 2 and list(logged.n_tokens) == [n_tokens] * 2
    assert all(set(present.split(",")) == set(entry.token_roles) for present in logged.roles)
    roles = grid_roles(lm.main.prefix_tokens, lm.main.grid, n_tokens, registers=lm.main.register_tokens)
    assert (roles.grid, roles.grid_start) == (GRID, cls_like + registers)
    counts = {name: len(roles.positions(name)) for name in roles.present()}
    wanted = {"cls": cls_like, "register": registers, "patch": GRID[0] * GRID[1]}
    assert counts == {name: n for name, n in wanted.items() if n}


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_statistics_equal_the_reference_engine(loaded, entry):
    lm = loaded(entry)
    with torch.no_grad(), hl.capture(lm) as fused, hl.capture(lm, engine="reference") as ref:
        lm.model(**_inputs())
    assert_same_stats(fused.head_stats, ref.head_stats, atol=2e-4, rtol=1e-4)
    mass = fused.head_stats[fused.head_stats.stat == "mass"]
    assert set(mass.role) == set(entry.token_roles) and set(mass.tower) == {"vision"}


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_store_round_trip_rebuilds_eager_patterns(loaded, entry, tmp_path):
    lm = loaded(entry)
    inputs = _inputs()
    if not entry.compact:  # a score bias compact attention does not keep: refused, and the rows are stored
        refused = pytest.raises(hl.SelectionError, match="bias")
        with torch.no_grad(), refused, hl.capture(lm, compact=VISION):
            lm.model(**inputs)
    with torch.no_grad(), hl.capture(lm, **{"compact" if entry.compact else "patterns": VISION}) as rec:
        lm.model(**inputs)
    store = Store.create(tmp_path / "store", lm)
    store.append(rec, examples=["a", "b"])
    back = Store.open(tmp_path / "store", lm)
    assert back.committed() == {"a", "b"} and len(back.head_stats()) == len(rec.head_stats)
    eager, head = eager_attentions(lm, inputs), lm.n_heads - 1
    for example, b in (("a", 0), ("b", 1)):
        for layer in range(lm.n_layers):
            got = torch.from_numpy(back.pattern(example, layer, head, tower="vision"))
            torch.testing.assert_close(got, eager[layer][b, head], atol=1e-5, rtol=0)


@pytest.mark.parametrize("entry", SERVED, ids=_ids(SERVED))
def test_head_scaling_and_ablation(loaded, entry):
    lm = loaded(entry)
    inputs = _inputs()
    plain = _outputs(lm, inputs)
    head = [(lm.n_layers - 1, 0)]
    with hl.intervene(lm, hl.HeadScale(heads=head, factor=1.0, tower="vision")):
        same = _outputs(lm, inputs)
    with hl.intervene(lm, hl.HeadAblation(heads=head, tower="vision")):
        ablated = _outputs(lm, inputs)
    with hl.intervene(lm, hl.HeadAblation(heads=head, tower="vision"), engine="reference"):
        reference = _outputs(lm, inputs)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ablated, reference, atol=1e-5, rtol=1e-5)
    assert (ablated - plain).abs().max() > 1e-4


@pytest.mark.parametrize("entry", REFUSED, ids=_ids(REFUSED))
def test_refused_with_the_reason(entry, tmp_path):
    assert entry.model_type not in hl.SUPPORTED
    path = _save_refused(entry.model_type, tmp_path / entry.model_type)
    with pytest.raises(hl.UnsupportedModelError, match=REASONS[entry.route]) as err:
        hl.load(path)
    assert str(err.value).startswith(f"headlab cannot serve {entry.model_type!r}: ")
    model = tf.AutoModel.from_pretrained(path)
    with pytest.raises(hl.UnsupportedModelError, match=REASONS[entry.route]):
        hl.describe(model)


def test_enough_vision_types_are_served():
    assert len(SERVED) >= 7 and {e.model_type for e in SERVED} <= set(hl.SUPPORTED)


def test_the_grid_roles_of_registers_and_of_a_tower_without_cls():
    roles = grid_roles(5, GRID, registers=4)
    assert roles.positions("cls") == [0] and roles.positions("register") == [1, 2, 3, 4]
    assert roles.positions("patch") == list(range(5, 21)) and roles.grid_start == 5
    siglip = grid_roles(0, GRID)
    assert siglip.present() == ("patch",) and siglip.grid_start == 0 and len(siglip) == 16
    assert grid_roles(1, GRID).names == ("cls", "patch")  # without registers, the roles are as before
    with pytest.raises(hl.InputError, match="register tokens do not fit"):
        grid_roles(1, GRID, registers=2)


def test_every_vision_entry_is_listed_once_and_served_ones_are_registered():
    assert len(set(_ids(ENTRIES))) == len(ENTRIES) and set(PREFIX) == set(_ids(SERVED))
    assert {e.route for e in REFUSED} == {Route.WINDOWED}
    assert all(models.adapter_for(e.model_type).family is hl.Family.VIT for e in SERVED)
