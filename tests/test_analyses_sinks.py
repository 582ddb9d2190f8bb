"""Sink analyses: hand-computed alpha, Sink metric, hidden sinks, massive activations and VAR sinks on
small made-up tables; alpha read off explicit patterns of the zoo LM; the zoo LM's first-token sink found
through a Store, and the result saved and read back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import headlab as hl
from headlab.analyses import sinks
from headlab.datasets import synthetic
from headlab.probe.record import Record, ResidualRatios


def _alpha_frame(values: dict[tuple[int, int, int, int], float]) -> pd.DataFrame:
    """head_stats rows of stat alpha: {(example, layer, head, key position): alpha}."""
    rows = [
        dict(example=e, tower="lm", step=0, layer=layer, head=h, stat="alpha", role=f"pos:{k}", value=v)
        for (e, layer, h, k), v in values.items()
    ]
    return pd.DataFrame(rows)


def test_sink_scores_and_metric_by_hand():
    # 2 examples x 2 heads; head (0, 1) is a sink in both, head (0, 0) in example 1 only
    frame = _alpha_frame({(0, 0, 0, 0): 0.1, (1, 0, 0, 0): 0.6, (0, 0, 1, 0): 0.5, (1, 0, 1, 0): 0.7})
    scores = sinks.sink_scores(frame).set_index("head")
    assert scores.alpha.to_dict() == pytest.approx({0: 0.35, 1: 0.6})
    assert scores.sink_rate.to_dict() == {0: 0.5, 1: 1.0}
    assert scores.is_sink.to_dict() == {0: True, 1: True}
    assert sinks.sink_scores(frame, epsilon=0.4).is_sink.tolist() == [False, True]
    metric = sinks.sink_metric(frame)
    assert metric.percent == pytest.approx(75.0)  # example 0: 1 of 2 heads, example 1: 2 of 2
    assert (metric.n_heads, metric.n_examples) == (2, 2)


def test_hidden_sinks_absolute_and_relative():
    frame = _alpha_frame({(0, 0, 0, 0): 0.8, (0, 0, 0, 1): 0.05, (0, 0, 0, 2): 0.3, (0, 0, 1, 2): 0.12})
    hidden = sinks.hidden_sinks(frame)
    assert list(zip(hidden["head"], hidden.position, strict=True)) == [(0, 2), (1, 2)]  # never token 0
    assert sinks.hidden_sinks(frame, tau=0.2).position.tolist() == [2]
    with pytest.raises(hl.InputError, match="alpha only for the first token"):
        sinks.hidden_sinks(frame[frame.role == "pos:0"])


def test_missing_inputs_raise_headlab_errors():
    empty = pd.DataFrame(columns=["example", "tower", "step", "layer", "head", "stat", "role", "value"])
    with pytest.raises(hl.InputError, match=r"no alpha statistics: capture with Stats\(which="):
        sinks.sink_scores(empty)
    with pytest.raises(hl.InputError, match=r"residuals=hl\.Select"):
        sinks.massive_activations(Record())


def _residual_rows(x: np.ndarray, layer: int = 1) -> dict:
    """Residual rows of one example's states x [position, d_model], computed as the probe does."""
    a = np.abs(x)
    n = len(x)
    return {
        "example": np.zeros(n, dtype=int),
        "tower": np.full(n, "lm", dtype=object),
        "step": np.zeros(n, dtype=int),
        "layer": np.full(n, layer),
        "position": np.arange(n),
        "norm": np.linalg.norm(x, axis=-1),
        "rms": np.sqrt((x**2).mean(-1)),
        "max_abs": a.max(-1),
        "max_dim": a.argmax(-1),
        "median_abs": torch.from_numpy(a).median(-1).values.numpy(),
    }


def _record_with_states(x: np.ndarray) -> Record:
    rows = _residual_rows(x)
    ratios = torch.from_numpy(np.abs(x) / rows["rms"][:, None]).float()
    return Record(
        _residual_rows=[rows], residual_ratios=[ResidualRatios(0, "lm", 0, 1, tuple(range(len(x))), ratios)]
    )


def test_massive_activations_by_hand():
    x = np.full((3, 2001), 0.1)  # median |x| 0.1
    x[0, 7] = 500.0  # massive: > 100 and 5000x the median
    x[0, 9] = -150.0  # massive too, but not the token's largest
    x[1, 3] = 99.0  # not > 100
    x[2, 5] = 120.0
    x[2, :1200] = 0.5  # median 0.5: 120 < 1000 x 0.5
    x[2, 5] = 120.0
    frame = pd.DataFrame(_residual_rows(x))
    found = sinks.massive_activations(frame)  # top dimension per token only
    assert list(zip(found.position, found.dim, strict=True)) == [(0, 7)]
    assert found.value.iloc[0] == pytest.approx(500.0) and found.times_median.iloc[0] == pytest.approx(5000)
    every = sinks.massive_activations(_record_with_states(x))  # every dimension, from the ratios
    assert list(zip(every.position, every.dim, strict=True)) == [(0, 7), (0, 9)]
    assert every.value.tolist() == pytest.approx([500.0, 150.0], rel=1e-5)
    dims = sinks.sink_dimensions(every)
    assert sorted(dims.dim) == [7, 9] and dims.positions.iloc[0] == [0]


def test_visual_sinks_follow_var_phi():
    x = np.full((4, 4096), 1.0)
    x[1, 10] = 60.0  # phi = 60 / rms ~ 44
    x[2, 20] = 60.0  # a large value outside the sink dims
    x[3, 10], x[3, 20] = 60.0, 90.0  # sink dim 10 large (phi ~ 31), but dim 20 larger
    rec = _record_with_states(x)
    rms = np.sqrt((x**2).mean(-1))
    found = sinks.visual_sinks(rec, dims=[10], image_positions=[1, 2])
    assert found.position.tolist() == [1, 3]
    assert found.phi.tolist() == pytest.approx([60 / rms[1], 60 / rms[3]], rel=1e-5)
    assert found.is_image.tolist() == [True, False]
    # from stored rows only the top dimension is known: token 3 (top dim 20) is missed, a lower bound
    stored = sinks.visual_sinks(pd.DataFrame(_residual_rows(x)), dims=[10])
    assert stored.position.tolist() == [1] and stored.is_image.isna().all()
    with pytest.raises(hl.InputError, match="no sink dimensions"):
        sinks.visual_sinks(rec)


@pytest.fixture(scope="module")
def zoo_lm():
    return hl.load("zoo:lm")


def _prompts(lm):
    exs = synthetic.induction(4, seed=1) + synthetic.ioi(4, seed=1)
    lm.tokenizer.padding_side = "right"
    return lm.tokenizer([e.prompt for e in exs], return_tensors="pt", padding=True)


def test_alpha_matches_the_explicit_pattern(zoo_lm):
    inputs = _prompts(zoo_lm)
    with torch.no_grad(), hl.capture(zoo_lm, patterns=hl.Select(layers=[0], heads=[1])) as rec:
        zoo_lm.model(**inputs)
    # every query sees key 0, so alpha_0 = mean over the example's queries of A[i, 0]
    want = np.mean([rec.pattern(e, 0, 1).probs[:, 0].mean().item() for e in range(8)])
    got = sinks.sink_scores(rec).set_index(["layer", "head"]).alpha[0, 1]
    assert got == pytest.approx(want, abs=1e-5)


def test_zoo_lm_first_token_sink_through_a_store(zoo_lm, tmp_path):
    inputs = _prompts(zoo_lm)
    with torch.no_grad(), hl.capture(zoo_lm, residuals=hl.Select(queries=[0])) as rec:
        zoo_lm.model(**inputs)
    store = hl.Store.create(tmp_path / "store", zoo_lm)
    store.append(rec, examples=list(range(100, 108)))
    entry = sinks.ANALYSES["sinks"]
    options = entry.parse({})
    scores = entry.run(store, options)
    strongest = scores.loc[scores.alpha.idxmax()]
    assert (strongest.layer, strongest["head"]) == (0, 1) and strongest.alpha > 0.3
    assert strongest.is_sink and scores.n_examples.eq(8).all()
    hidden = sinks.hidden_sinks(store, c=5.0)
    lengths = store.examples().set_index("example").n_tokens
    want = 5.0 / (hidden.example.map(lengths) - hidden.position)
    np.testing.assert_allclose(hidden.threshold, want)
    assert (hidden.alpha > hidden.threshold).all() and (hidden.position > 0).all()
    metric = sinks.sink_metric(store)
    assert 0 < metric.percent < 100 and metric.n_heads == 8
    store.save_result("sinks", scores, options)
    pd.testing.assert_frame_equal(store.result("sinks"), scores)
    assert store.result_params("sinks") == options
    massive = sinks.ANALYSES["massive-activations"].run(store, {"threshold": 100.0, "ratio": 1000.0})
    assert len(massive) == 0  # a 2-layer toy: no massive activations
    store.save_result("massive-activations", massive)
    assert store.result("massive-activations").columns.tolist() == massive.columns.tolist()
