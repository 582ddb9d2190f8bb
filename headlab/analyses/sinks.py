"""Attention sinks: first-token sink heads (Gu et al.), hidden sinks (ACT), massive activations (Sun et al.)
and visual sink tokens (VAR), as pure functions of what a capture stored.

Sources: every function takes a `Store`, a `Record` or an already-read tidy frame (the store's
head_stats / residuals columns). A Record has no condition; its rows get condition "default".

Definitions (methods/llm.md §3, methods/lvlm.md §2.1):
- alpha^{l,h}_k (Gu et al.; ACT's received-attention score): the column sum of key k divided by the number
  of real queries that can see it; with causal attention over an example of T tokens and 0-indexed k that
  is sum_{i>=k} A[i, k] / (T - k). The probe reduces it per example (stat "alpha", role "pos:K", for the
  first `Stats.first_k` keys and flagged tokens). T is each example's own real length (no truncation to
  Gu et al.'s T = 64 here: fix T through the prompts you capture, since the metric falls as T grows;
  `sink_metric` reports the lengths it saw). Position 0 is the example's first real token, BOS or not.
- Sink^eps (Gu et al.): the share of heads whose alpha_0 exceeds eps = 0.3, computed per example and
  averaged over the examples (their "averaged over the probe sequences"), reported x100 as they do.
- hidden sinks (ACT): keys k > 0 with alpha_k > tau = 0.1 (ACT's absolute threshold; or the relative
  tau_k = c / (T - k) of the detector spec, c ~ 5). ACT's code drops the first element of the sink set,
  normally token 0; here every flagged key after position 0 is kept, also when token 0 is no sink.
- massive activation (Sun et al.): a scalar of the residual stream with |x| > 100 and |x| >= 1000 x the
  median |x| of its hidden state. Sink dimensions are the dimensions that carry them.
- visual sink (VAR): a token whose state entering layer l has phi = max_{d in D_sink} |x_d| / RMS(x) > 20.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from headlab.analyses.registry import Analysis, Option, tower_option
from headlab.errors import InputError
from headlab.probe.record import Record
from headlab.store import Store

EPSILON = 0.3  # Gu et al.'s sink threshold on alpha_0
HIDDEN_TAU = 0.1  # ACT's THRES
MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0  # Sun et al.
VAR_TAU = 20.0  # VAR's phi threshold

Source = Store | Record | pd.DataFrame
HEAD = ["condition", "tower", "layer", "head"]


# ------------------------------------------------------------------------------------------ reading sources


def stat_frame(source: Source, stat: str | Iterable[str], *, tower: str | None = None) -> pd.DataFrame:
    """The head_stats rows of `stat` (a name or names) from a Store, a Record or a frame, with a condition
    column; empty if none."""
    names = [stat] if isinstance(stat, str) else list(stat)
    if isinstance(source, Store):
        frame = source.head_stats(stat=names, tower=tower)
    else:
        frame = source.head_stats if isinstance(source, Record) else source
        if len(frame):
            keep = frame.stat.isin(names)
            if tower is not None:
                keep &= frame.tower == tower
            frame = frame[keep]
    if not len(frame):
        return pd.DataFrame(columns=[*HEAD, "example", "stat", "role", "value"])
    if "condition" not in frame:
        frame = frame.assign(condition="default")
    return frame.astype({"layer": int, "head": int, "value": float})  # example ids: int or str, as stored


def example_frame(source: Source) -> pd.DataFrame:
    """The examples table (example, condition, tower, n_tokens, meta as dict) of a Store or Record."""
    if isinstance(source, Store):
        ex = source.examples()
        return ex.assign(meta=[json.loads(m) if isinstance(m, str) else {} for m in ex.meta])
    if isinstance(source, Record):
        return source.examples.assign(condition="default", meta=[{}] * len(source.examples))
    return pd.DataFrame(columns=["example", "condition", "tower", "n_tokens", "meta"])


def residual_frame(source: Source) -> pd.DataFrame:
    frame = (
        source.residuals()
        if isinstance(source, Store)
        else (source.residuals if isinstance(source, Record) else source)
    )
    if not len(frame):
        raise InputError(
            "no residual-stream rows: capture them with capture(..., residuals=hl.Select()) "
            "(every position of every layer, or the positions you want to test)"
        )
    return frame if "condition" in frame else frame.assign(condition="default")


def _alpha(source: Source, tower: str | None) -> pd.DataFrame:
    frame = stat_frame(source, "alpha", tower=tower)
    if not len(frame):
        raise InputError(
            "this source has no alpha statistics: capture with Stats(which=(..., 'alpha')) "
            "(the default Stats() includes it)"
        )
    frame = frame[frame.step == 0] if "step" in frame else frame
    return frame.assign(position=frame.role.str.removeprefix("pos:").astype(int))


# ------------------------------------------------------------------------------------- first-token sinks


def sink_scores(source: Source, *, epsilon: float = EPSILON, tower: str | None = None) -> pd.DataFrame:
    """Per head: alpha_0 (Gu et al.'s received attention of the first token) averaged over the examples,
    `sink_rate` (the share of examples with alpha_0 > epsilon) and `is_sink` (mean alpha_0 > epsilon).

    Columns: condition, tower, layer, head, alpha, alpha_std, sink_rate, is_sink, n_examples."""
    first = _alpha(source, tower)
    first = first[first.position == 0]
    grouped = first.assign(above=first.value > epsilon).groupby(HEAD)
    out = grouped.agg(
        alpha=("value", "mean"),
        alpha_std=("value", "std"),
        sink_rate=("above", "mean"),
        n_examples=("example", "nunique"),
    ).reset_index()
    return out.assign(is_sink=out.alpha > epsilon)


@dataclass(frozen=True)
class SinkMetric:
    """Gu et al.'s Sink^eps_1 (percent of heads with alpha_0 > eps, averaged over examples)."""

    percent: float
    epsilon: float
    n_heads: int
    n_examples: int
    tokens: tuple[int, int]  # (min, max) example length T seen


def sink_metric(source: Source, *, epsilon: float = EPSILON, tower: str | None = None) -> SinkMetric:
    """Sink^eps_1 = 100 x mean over examples of (1 / (L H)) sum_{l,h} 1[alpha^{l,h}_0 > eps]."""
    first = _alpha(source, tower)
    first = first[first.position == 0]
    per_example = (first.value > epsilon).groupby([first.condition, first.example]).mean()
    ex = example_frame(source)
    lengths = ex.n_tokens.astype(int) if len(ex) else pd.Series([0])
    return SinkMetric(
        percent=100 * float(per_example.mean()),
        epsilon=epsilon,
        n_heads=int(first.groupby(["tower", "layer", "head"]).ngroups),
        n_examples=len(per_example),
        tokens=(int(lengths.min()), int(lengths.max())),
    )


def hidden_sinks(
    source: Source, *, tau: float = HIDDEN_TAU, c: float | None = None, tower: str | None = None
) -> pd.DataFrame:
    """ACT's hidden sinks: per (example, head) the keys k > 0 whose alpha_k exceeds tau (or, with `c`, the
    relative c / (T - k), T the example's length). Only keys whose alpha was captured can be tested: the
    first `Stats.first_k` and the flagged ones (`TokenRoles.with_flagged`).

    Columns: condition, example, tower, layer, head, position, alpha, threshold (one row per flagged key)."""
    alpha = _alpha(source, tower)
    later = alpha[alpha.position > 0]
    if not len(later):
        raise InputError(
            "this source has alpha only for the first token: capture with Stats(first_k=K) with K > 1 or "
            "flag candidate tokens (TokenRoles.with_flagged) to look for hidden sinks"
        )
    if c is None:
        threshold = pd.Series(tau, index=later.index)
    else:
        ex = example_frame(source)[["example", "condition", "tower", "n_tokens"]]
        merged = later.merge(ex, on=["example", "condition", "tower"], how="left")
        if merged.n_tokens.isna().any():
            raise InputError("relative thresholds need each example's length (the examples table)")
        threshold = pd.Series(
            c / (merged.n_tokens.to_numpy() - merged.position.to_numpy()), index=later.index
        )
    later = later.assign(alpha=later.value, threshold=threshold)
    hits = later[later.alpha > later.threshold]
    cols = ["condition", "example", "tower", "layer", "head", "position", "alpha", "threshold"]
    return hits[cols].sort_values(cols[:6]).reset_index(drop=True)


# ------------------------------------------------------------------------------------ massive activations


def massive_activations(
    source: Source, *, threshold: float = MASSIVE_ABS, ratio: float = MASSIVE_RATIO
) -> pd.DataFrame:
    """Residual-stream scalars with |x| > threshold and |x| >= ratio x median |x| of their hidden state.

    From a Store (or a residual frame) only the largest |x| of each token is known (max_abs, max_dim), so at
    most one massive dimension per token is found; from a Record with residual ratios every dimension is
    tested (|x_d| = ratio_d x RMS). `layer` is the layer the state enters (its input).

    Columns: condition, example, tower, step, layer, position, dim, value (|x|), median_abs, times_median."""
    rows = residual_frame(source)
    if isinstance(source, Record) and source.residual_ratios:
        found = _massive_all_dims(source, rows, threshold, ratio)
    else:
        found = rows.assign(dim=rows.max_dim.astype(int), value=rows.max_abs.astype(float))
        found = found[(found.value > threshold) & (found.value >= ratio * found.median_abs)]
    found = found.assign(times_median=found.value / found.median_abs.where(found.median_abs > 0))
    cols = ["condition", "example", "tower", "step", "layer", "position", "dim", "value", "median_abs"]
    return found[[*cols, "times_median"]].sort_values(cols[:7]).reset_index(drop=True)


def _massive_all_dims(rec: Record, rows: pd.DataFrame, threshold: float, ratio: float) -> pd.DataFrame:
    rms = rows.set_index(["example", "tower", "step", "layer", "position"]).rms
    found = []
    for rr in rec.residual_ratios:
        ratios = rr.ratios.float().numpy()  # [position, d_model] = |x_d| / RMS(x)
        scale = rms.loc[[(rr.example, rr.tower, rr.step, rr.layer, p) for p in rr.positions]].to_numpy()
        absx = ratios * scale[:, None]
        median = np.median(absx, axis=-1)  # torch's median (the stored one) is the lower middle value
        p_idx, d_idx = np.nonzero((absx > threshold) & (absx >= ratio * median[:, None]))
        for p, d in zip(p_idx, d_idx, strict=True):
            found.append((rr.example, rr.tower, rr.step, rr.layer, rr.positions[p], d, absx[p, d], median[p]))
    cols = ["example", "tower", "step", "layer", "position", "dim", "value", "median_abs"]
    return pd.DataFrame(found, columns=cols).assign(condition="default")


def sink_dimensions(massive: pd.DataFrame) -> pd.DataFrame:
    """The dimensions that carry massive activations (a `massive_activations` frame), most frequent first.

    Columns: tower, dim, n_tokens (flagged scalars), n_layers, max_value, positions (sorted distinct)."""
    if not len(massive):
        return pd.DataFrame(columns=["tower", "dim", "n_tokens", "n_layers", "max_value", "positions"])
    out = (
        massive.groupby(["tower", "dim"])
        .agg(
            n_tokens=("value", "size"),
            n_layers=("layer", "nunique"),
            max_value=("value", "max"),
            positions=("position", lambda p: sorted(set(int(x) for x in p))),
        )
        .reset_index()
    )
    return out.sort_values(["n_tokens", "max_value"], ascending=False).reset_index(drop=True)


# -------------------------------------------------------------------------------------------- visual sinks


def visual_sinks(
    source: Record | pd.DataFrame | Store,
    *,
    dims: Iterable[int] | None = None,
    tau: float = VAR_TAU,
    image_positions: Mapping[int, Iterable[int]] | Iterable[int] | None = None,
    tower: str = "lm",
) -> pd.DataFrame:
    """VAR's sink tokens: phi(x) = max_{d in D_sink} |x_d| / RMS(x) > tau for the state entering each
    captured layer (VAR uses layers 2 .. L-1 of the prefill; filter `layer` for that).

    Needs residuals captured on the language model (`capture(..., residuals=hl.Select())`). Exact from a
    Record (its residual ratios hold |x_d| / RMS per dimension; RMS without VAR's 1e-6, a negligible
    difference). From a Store only the top dimension of each token is kept, so a token counts only when its
    largest dimension is a sink dimension: every token found is a sink, but a sink whose largest |x| lies
    outside D_sink is missed (a lower bound). dims: D_sink (VAR: {1415, 2533} for LLaMA-2-7B); default: the
    dimensions carrying massive activations in the same source. image_positions: the image tokens I (one
    list for all examples, or per example id), to mark `is_image` (VAR's visual sinks are sinks inside I).

    Columns: condition, example, tower, layer, position, phi, dim, is_image."""
    if dims is None:
        dims = sink_dimensions(massive_activations(source)).dim.tolist()
        if not dims:
            raise InputError(
                "no sink dimensions: this source shows no massive activation; pass dims=... (VAR's D_sink, "
                "e.g. {1415, 2533} for LLaMA-2-7B, the dims with outlier |x| on BOS)"
            )
    dims = sorted(int(d) for d in dims)
    if isinstance(source, Record) and source.residual_ratios:
        rows = []
        for rr in source.residual_ratios:
            if rr.tower != tower or rr.step != 0:
                continue
            sub = rr.ratios.float().numpy()[:, dims]  # [position, sink dim]
            for p, pos in enumerate(rr.positions):
                best = int(sub[p].argmax())
                rows.append(("default", rr.example, tower, rr.layer, pos, float(sub[p, best]), dims[best]))
        found = pd.DataFrame(
            rows, columns=["condition", "example", "tower", "layer", "position", "phi", "dim"]
        )
    else:
        res = residual_frame(source)
        res = res[(res.tower == tower) & (res.step == 0) & res.max_dim.isin(dims)]
        found = res.assign(phi=res.max_abs / res.rms, dim=res.max_dim.astype(int))
    found = found[found.phi > tau]
    return found.assign(is_image=_is_image(found, image_positions))[
        ["condition", "example", "tower", "layer", "position", "phi", "dim", "is_image"]
    ].reset_index(drop=True)


def _is_image(found: pd.DataFrame, image_positions) -> pd.Series:
    if image_positions is None:
        return pd.Series(pd.NA, index=found.index, dtype="boolean")
    if isinstance(image_positions, Mapping):
        sets = {e: set(map(int, p)) for e, p in image_positions.items()}  # example ids as stored: int or str
        return pd.Series(
            [int(p) in sets.get(e, set()) for e, p in zip(found.example, found.position, strict=True)],
            index=found.index,
            dtype="boolean",
        )
    shared = set(map(int, image_positions))
    return found.position.astype(int).isin(shared).astype("boolean")


# --------------------------------------------------------------------------------------------- registry


def _run_sinks(store: Store, options: dict) -> pd.DataFrame:
    return sink_scores(store, epsilon=options["epsilon"], tower=options["tower"])


def _run_hidden(store: Store, options: dict) -> pd.DataFrame:
    return hidden_sinks(store, tau=options["tau"], c=options["c"], tower=options["tower"])


def _run_massive(store: Store, options: dict) -> pd.DataFrame:
    return massive_activations(store, threshold=options["threshold"], ratio=options["ratio"])


ANALYSES: dict[str, Analysis] = {
    "sinks": Analysis(
        name="sinks",
        description="per-head first-token sink score (Gu et al.'s alpha_0, mean over examples) and sink flag",
        run=_run_sinks,
        options={
            "epsilon": Option(
                type=float,
                default=EPSILON,
                gt=0,
                le=1,
                help="a head is a sink when its mean alpha_0 (a share of attention) exceeds this (Gu et al.: 0.3)",
            ),
            "tower": tower_option("only this tower (default: every tower with alpha statistics)"),
        },
    ),
    "hidden-sinks": Analysis(
        name="hidden-sinks",
        description="ACT's hidden sinks: keys after the first with received attention alpha_k > tau",
        run=_run_hidden,
        options={
            "tau": Option(
                type=float, default=HIDDEN_TAU, gt=0, le=1, help="absolute alpha threshold (ACT: 0.1)"
            ),
            "c": Option(
                type=float,
                default=None,
                optional=True,
                gt=0,
                help="relative threshold c / (T - k) instead of tau (detector spec: c ~ 5)",
            ),
            "tower": tower_option("only this tower (default: every tower with alpha statistics)"),
        },
    ),
    "massive-activations": Analysis(
        name="massive-activations",
        description="residual scalars with |x| > 100 and >= 1000x the median |x| (Sun et al.)",
        run=_run_massive,
        options={
            "threshold": Option(
                type=float,
                default=MASSIVE_ABS,
                ge=0,
                help="absolute |x| threshold (Sun et al.: 100; 0: the ratio alone decides)",
            ),
            "ratio": Option(
                type=float,
                default=MASSIVE_RATIO,
                ge=0,
                help="minimum multiple of the state's median |x| (Sun et al.: 1000; 0: the threshold alone)",
            ),
        },
    ),
}
