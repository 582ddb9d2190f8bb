"""Position bias: per-head slot profiles over segments, attended-distance profiles (text and ViT), and the
model-level lost-in-the-middle curve and judge flip rate (methods/llm.md §1.5, §7; lvlm.md §6).

Store-based (pure functions of a Store, a Record or a head_stats frame; see sinks.stat_frame):
- `slot_profiles`: from the mass per segment role ("segment_0" .. "segment_{k-1}", caller-given segments,
  see probe/roles.py). For one example, p_s = m_s / sum_s' m_s' is the head's attention over slots, read at
  the last token by default (stat "mass_last"; the detector spec's query t), with m_s the mass on segment s.
  With per_token=True, m_s is first divided by the segment's length (Hsieh et al. / PINE's length-
  normalised importance; needs the spans in the example meta). The profile b(s) = mean over examples of
  p_s, per head and number of segments k. Summaries: primacy = b(0), recency = b(k-1) (shares of the slot
  mass; x k gives §7.3's multiple of uniform), u_depth = (b(0) + b(k-1)) / 2 - min_{0<s<k-1} b(s) (NaN
  for k < 3), kl_uniform = KL(b || uniform) = sum_s b(s) log(k b(s)) in nats, gold = mean p_gold over the
  examples whose meta carries `gold` (and gold_lift = gold - 1/k), segment_mass = mean sum_s m_s (sink heads
  put little mass on any slot: read their profiles with care). §7.3 asks for prompts whose document order
  is permuted at random, so that content does not follow the slot: that is the caller's data.
- `distance_profile`: the mean attended distance per head (stat "distance": E_j[i - j] over the keys, then
  averaged over the captured queries and the examples) and its RMS. Token units; for uniform causal
  attention over all queries of a T-token example it is (T - 1) / 4.
- `vit_attention_distance`: the ViT paper's mean attention distance: per patch query, sum over patch keys of
  A[i, j] ||g_i - g_j|| on the patch grid (not renormalised over patches, so mass on CLS adds 0), averaged
  over patch queries and images; in patches, or pixels with patch_size. It lies in [0, grid diagonal].

Model-running (they load nothing themselves; pass a LoadedModel): `lost_in_the_middle` and
`judge_position_bias` wrap runs.pine_eval's `multi_doc_accuracy` and `judge_bias`, plain and with PINE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from headlab.analyses.registry import Analysis, Option, tower_option
from headlab.analyses.sinks import HEAD, Source, example_frame, stat_frame
from headlab.errors import InputError, SelectionError
from headlab.loading import LoadedModel
from headlab.store import Store

SEGMENT = "segment_"
METHODS = ("plain", "pine")


# ------------------------------------------------------------------------------------------ slot profiles


def slot_masses(
    source: Source,
    *,
    stat: str = "mass_last",
    tower: str = "lm",
    per_token: bool = False,
) -> pd.DataFrame:
    """Per (example, head): the mass m_s on every segment and the slot shares p_s = m_s / sum m.

    Columns: condition, example, tower, layer, head, k, slot, mass, share."""
    if stat not in ("mass", "mass_last"):
        raise SelectionError(f"slot profiles read 'mass' or 'mass_last', got {stat!r}")
    frame = stat_frame(source, stat, tower=tower)
    frame = frame[frame.role.str.startswith(SEGMENT)]
    if not len(frame):
        raise InputError(
            f"this source has no {stat!r} on segment roles for tower {tower!r}: capture with "
            "Stats(which=(..., 'mass')) and roles that name the segments "
            "(text_roles(ids, segments=[(start, end), ...]))"
        )
    frame = frame.assign(slot=frame.role.str.removeprefix(SEGMENT).astype(int))
    frame = frame[frame.step == 0] if "step" in frame else frame
    if per_token:
        frame = frame.assign(value=frame.value / _segment_lengths(source, frame))
    example = ["condition", "example", "tower", "layer", "head"]
    total = frame.groupby(example).value.transform("sum")
    k = frame.groupby(example).slot.transform("max") + 1
    out = frame.assign(k=k, mass=frame.value, share=frame.value / total.where(total > 0))
    return out[[*example, "k", "slot", "mass", "share"]].reset_index(drop=True)


def _segment_lengths(source: Source, frame: pd.DataFrame) -> np.ndarray:
    """The length of each row's segment, from the example meta `spans` ([[start, end), ...])."""
    ex = example_frame(source)
    spans = {(c, e): m.get("spans") for c, e, m in zip(ex.condition, ex.example, ex.meta, strict=True)}
    lengths = []
    for c, e, s in zip(frame.condition, frame.example, frame.slot, strict=True):
        span = spans.get((c, e))
        if not span or s >= len(span):
            raise InputError(
                f"per_token slot profiles need the segment spans: store them in the example meta as "
                f"'spans' (example {e} has none); or use per_token=False"
            )
        lengths.append(span[s][1] - span[s][0])
    return np.asarray(lengths, dtype=float)


def _golds(source: Source, gold: Mapping[int, int] | None) -> dict[tuple[str, int], int]:
    if gold is not None:
        return {("default", e): int(g) for e, g in gold.items()}  # example ids as stored: int or str
    ex = example_frame(source)
    return {
        (c, e): int(m["gold"])
        for c, e, m in zip(ex.condition, ex.example, ex.meta, strict=True)
        if isinstance(m, dict) and "gold" in m
    }


def slot_profiles(
    source: Source,
    *,
    stat: str = "mass_last",
    tower: str = "lm",
    per_token: bool = False,
    gold: Mapping[int, int] | None = None,
) -> pd.DataFrame:
    """Per head and number of segments k: the slot profile b(s) (columns slot_0 ..) and its summaries
    (see the module docstring). gold: example id -> gold slot (default: the example meta's `gold`; a
    mapping applies to condition "default").

    Columns: condition, tower, layer, head, k, n_examples, segment_mass, primacy, recency, u_depth,
    kl_uniform, gold, gold_lift, slot_0 .. slot_{k-1}."""
    masses = slot_masses(source, stat=stat, tower=tower, per_token=per_token)
    golds = _golds(source, gold)
    is_gold = [
        golds.get((c, e)) == s for c, e, s in zip(masses.condition, masses.example, masses.slot, strict=True)
    ]
    masses = masses.assign(gold_share=masses.share.where(is_gold))
    keys = [*HEAD, "k"]
    profile = masses.pivot_table(index=keys, columns="slot", values="share", aggfunc="mean")
    rows = []
    for key, b in profile.iterrows():
        k = key[-1]
        b = b.reindex(range(k)).fillna(0.0).to_numpy()
        middle = b[1:-1]
        positive = b[b > 0]
        rows.append(
            (
                *key,
                float(b[0]),
                float(b[-1]),
                float((b[0] + b[-1]) / 2 - middle.min()) if len(middle) else math.nan,
                float((positive * np.log(k * positive)).sum()),
                *b,
            )
        )
    width = int(masses.k.max())
    slots = [f"slot_{s}" for s in range(width)]
    summary = pd.DataFrame(
        [r + (math.nan,) * (len(keys) + 4 + width - len(r)) for r in rows],
        columns=[*keys, "primacy", "recency", "u_depth", "kl_uniform", *slots],
    )
    per_example = masses.groupby([*keys, "example"]).agg(total=("mass", "sum"), gold=("gold_share", "max"))
    agg = per_example.groupby(keys).agg(
        n_examples=("total", "size"), segment_mass=("total", "mean"), gold=("gold", "mean")
    )
    out = summary.merge(agg.reset_index(), on=keys)
    out = out.assign(gold_lift=out.gold - 1 / out.k)
    first = [*keys, "n_examples", "segment_mass", "primacy", "recency", "u_depth", "kl_uniform", "gold"]
    return out[[*first, "gold_lift", *slots]]


# ------------------------------------------------------------------------------------ distance profiles


def _mean_distance(source: Source, tower: str, hint: str) -> pd.DataFrame:
    frame = stat_frame(source, ("distance", "distance_rms"), tower=tower)
    frame = frame[frame.step == 0] if "step" in frame else frame
    if not len(frame):
        raise InputError(
            f"this source has no 'distance' statistics for tower {tower!r}: capture {hint} with "
            "Stats(which=(..., 'distance'))"
        )
    wide = frame.pivot_table(index=[*HEAD, "example"], columns="stat", values="value").reset_index()
    return (
        wide.groupby(HEAD)
        .agg(
            distance=("distance", "mean"),
            distance_rms=("distance_rms", "mean"),
            n_examples=("example", "size"),
        )
        .reset_index()
    )


def distance_profile(source: Source, *, tower: str = "lm") -> pd.DataFrame:
    """Per head: the mean attended distance in tokens (E[i - j], averaged over queries and examples) and
    its RMS. Columns: condition, tower, layer, head, distance, distance_rms, n_examples."""
    return _mean_distance(source, tower, "the text tower")


def vit_attention_distance(
    source: Source, *, tower: str = "vision", patch_size: int | None = None
) -> pd.DataFrame:
    """Per head: the ViT paper's mean attention distance in patches (and pixels when patch_size is given).
    Columns: condition, tower, layer, head, distance, distance_rms, n_examples (, distance_px)."""
    out = _mean_distance(source, tower, "a vision tower (ViT, or an LVLM's vision encoder)")
    return out if patch_size is None else out.assign(distance_px=out.distance * patch_size)


# ---------------------------------------------------------------------------- model-level (runs the model)


def lost_in_the_middle(
    lm: LoadedModel,
    *,
    n: int = 50,
    k: int = 4,
    seed: int = 10_000,
    methods: Sequence[str] = METHODS,
) -> pd.DataFrame:
    """Accuracy by gold position on synthetic multi-document QA (pine_eval.multi_doc_accuracy), plain and with
    PINE. Columns: method, gold (0-based slot), accuracy, n, k."""
    from headlab.runs.pine_eval import multi_doc_accuracy

    rows = []
    for method in _checked_methods(methods):
        acc = multi_doc_accuracy(lm, n, k=k, seed=seed, pine=method == "pine")
        rows += [(method, gold, value, n, k) for gold, value in acc.items()]
    return pd.DataFrame(rows, columns=["method", "gold", "accuracy", "n", "k"])


def position_curve_summary(curve: pd.DataFrame) -> pd.DataFrame:
    """§7.1's summaries of an accuracy-by-gold-position curve (a `lost_in_the_middle` frame), per method:
    spread = max - min, u_depth = mean(first, last) - min(middle) (NaN for k < 3), std over positions."""
    rows = []
    for method, group in curve.groupby("method", sort=False):
        acc = group.sort_values("gold").accuracy.to_numpy()
        middle = acc[1:-1]
        rows.append(
            (
                method,
                float(acc.max() - acc.min()),
                float((acc[0] + acc[-1]) / 2 - middle.min()) if len(middle) else math.nan,
                float(acc.std()),
            )
        )
    return pd.DataFrame(rows, columns=["method", "spread", "u_depth", "std"])


def judge_position_bias(
    lm: LoadedModel,
    *,
    n: int = 100,
    seed: int = 10_000,
    swap: str = "blocks",
    methods: Sequence[str] = METHODS,
) -> pd.DataFrame:
    """The pairwise-judge flip rate (pine_eval.judge_bias: verdict changes when the options swap), plain and
    with PINE. Columns: method, swap, flip_rate, accuracy, margin_shift, n."""
    from headlab.runs.pine_eval import judge_bias

    rows = []
    for method in _checked_methods(methods):
        bias = judge_bias(lm, n, seed=seed, pine=method == "pine", swap=swap)
        rows.append((method, swap, bias.flip_rate, bias.accuracy, bias.margin_shift, bias.n))
    return pd.DataFrame(rows, columns=["method", "swap", "flip_rate", "accuracy", "margin_shift", "n"])


def _checked_methods(methods: Iterable[str]) -> list[str]:
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SelectionError(f"unknown methods {bad}; choose from {METHODS}")
    return methods


# --------------------------------------------------------------------------------------------- registry


def _run_slots(store: Store, options: dict) -> pd.DataFrame:
    return slot_profiles(store, stat=options["stat"], tower=options["tower"], per_token=options["per_token"])


def _run_distance(store: Store, options: dict) -> pd.DataFrame:
    return distance_profile(store, tower=options["tower"])


def _run_vit(store: Store, options: dict) -> pd.DataFrame:
    return vit_attention_distance(store, tower=options["tower"], patch_size=options["patch_size"])


ANALYSES: dict[str, Analysis] = {
    "slot-profile": Analysis(
        name="slot-profile",
        description="per-head attention over segments: primacy, recency, U-depth, KL to uniform, gold tracking",
        run=_run_slots,
        options={
            "stat": Option(
                type=str,
                default="mass_last",
                choices=("mass_last", "mass"),
                help="the last token's attention (mass_last) or the mean over queries (mass)",
            ),
            "tower": tower_option("the tower whose heads are profiled", "lm"),
            "per_token": Option(
                type=bool, default=False, help="divide each segment's mass by its length (needs meta 'spans')"
            ),
        },
    ),
    "distance-profile": Analysis(
        name="distance-profile",
        description="per-head mean attended distance in tokens (and its RMS)",
        run=_run_distance,
        options={"tower": tower_option("the text tower", "lm")},
    ),
    "vit-distance": Analysis(
        name="vit-distance",
        description="per-head ViT mean attention distance over the patch grid (patches, or pixels)",
        run=_run_vit,
        options={
            "tower": tower_option("the vision tower", "vision"),
            "patch_size": Option(
                type=int,
                default=None,
                optional=True,
                ge=1,
                help="pixels per patch, to also report the distance in pixels",
            ),
        },
    ),
}
