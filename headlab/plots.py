"""Plotly figures of records, stores and analysis results, for Jupyter (circuitsvis' conventions).

Every function returns a `plotly.graph_objects.Figure`: it renders inline in Jupyter and saves with
`fig.write_html(...)` / `fig.write_image(...)`.

- Attention patterns: the [query, key] matrix of one head, queries on y (top to bottom), keys on x, values
  in [0, 1]; both axes carry the example's tokens (positions when the tokens are unknown), the hover shows
  the query token, the key token and the weight. With several heads, one trace per head and a dropdown.
- Head maps: a layer x head heat map with categorical axes (y "L0", "L1", ...; x "H0", "H1", ...), one cell
  per head, the mean over examples (or rows) of a value; NaN where a head has none. A difference of two
  conditions uses a diverging colour scale centred on 0.
- Image attention: one query's attention to the patch grid, drawn over the stored image thumbnail.

Records and stores reach these through their `plot` accessors (`rec.plot`, `store.plot`); `heads` also
takes any result DataFrame with `layer` and `head` columns. This module imports plotly, so it is imported
only on first use (the accessors import it lazily; `headlab.plots` is on the package's lazy facade). It
reads records and stores through their public methods and never imports the probe or the store.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from headlab.errors import SelectionError

if TYPE_CHECKING:
    from headlab.probe.record import Record
    from headlab.store.store import Store

__all__ = [
    "RecordPlots",
    "StorePlots",
    "head_map",
    "head_matrix",
    "heads",
    "image_attention",
    "main_tower",
    "pattern",
    "select_stat",
]

ROLE_MASS = ("mass", "mass_last")  # stats whose absent role means no attention: 0 in a difference
MAX_PREFIX = 8  # prefix tokens a vision tower may put before its square patch grid (CLS, registers)


# ----- figures from arrays ------------------------------------------------------------------------------
def _labels(tokens: Sequence[str] | None, n: int) -> list[str]:
    """Display labels of n positions: the tokens when given (their count must be n), else "0", "1", ...
    HTML-escaped, since plotly reads tags in text ("<s>" would start a strike-through, not show a token)."""
    if tokens is None:
        return [str(i) for i in range(n)]
    if len(tokens) != n:
        raise SelectionError(f"got {len(tokens)} tokens for a pattern over {n} keys; give one per position")
    return [html.escape(str(t), quote=False) for t in tokens]


def _pattern_trace(probs: np.ndarray, queries: Sequence[int], labels: list[str], name: str) -> go.Heatmap:
    """A [q, k] heat map trace: x key positions, y query positions, hover with both tokens and the weight."""
    keys = list(range(probs.shape[1]))
    hover = [[[labels[q], labels[k]] for k in keys] for q in queries]  # [q, k, 2]
    return go.Heatmap(
        z=probs,
        x=keys,
        y=list(queries),
        customdata=hover,
        zmin=0.0,
        zmax=1.0,
        colorscale="Blues",
        name=name,
        hovertemplate="query %{y} %{customdata[0]} → key %{x} %{customdata[1]}: %{z:.4f}<extra>"
        + name
        + "</extra>",
    )


def pattern(
    probs: np.ndarray | Sequence[np.ndarray],
    queries: Sequence[int] | None = None,
    *,
    tokens: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
) -> go.Figure:
    """Attention pattern figure of one head (`probs` [q, k]) or several (a sequence of [q, k], one per name,
    chosen with a dropdown). queries: the example position of each row (default 0..q-1); tokens: one label
    per key position (default the positions), also used for the queries' tick labels."""
    mats = [np.asarray(probs, dtype=float)] if np.ndim(probs) == 2 else [np.asarray(p, float) for p in probs]
    names = list(names) if names is not None else [f"head {i}" for i in range(len(mats))]
    n_keys = mats[0].shape[1]
    queries = list(range(mats[0].shape[0])) if queries is None else [int(q) for q in queries]
    labels = _labels(tokens, n_keys)
    fig = go.Figure([_pattern_trace(m, queries, labels, name) for m, name in zip(mats, names, strict=True)])
    for i, trace in enumerate(fig.data):
        trace.visible = i == 0
    if len(mats) > 1:
        fig.update_layout(updatemenus=[_head_menu(names, title)])
    fig.update_layout(title=f"{title} {names[0]}".strip() if len(mats) > 1 else title)
    fig.update_xaxes(
        title="key", tickmode="array", tickvals=list(range(n_keys)), ticktext=labels, tickangle=-45
    )
    fig.update_yaxes(title="query", tickmode="array", tickvals=queries, ticktext=[labels[q] for q in queries])
    fig.update_xaxes(range=[-0.5, n_keys - 0.5])
    fig.update_yaxes(range=[max(queries) + 0.5, min(queries) - 0.5], scaleanchor="x", constrain="domain")
    fig.update_layout(
        width=min(22 * max(n_keys, 8) + 260, 1100), height=min(22 * max(len(queries), 8) + 260, 1000)
    )
    return fig


def _head_menu(names: list[str], title: str) -> dict:
    """A dropdown showing one trace (head) at a time."""
    buttons = [
        dict(
            label=name,
            method="update",
            args=[{"visible": [j == i for j in range(len(names))]}, {"title": f"{title} {name}".strip()}],
        )
        for i, name in enumerate(names)
    ]
    return dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.0, yanchor="bottom")


def head_map(z: np.ndarray, *, title: str = "", diverging: bool = False, value: str = "value") -> go.Figure:
    """A layer x head heat map of `z` [layer, head] with categorical axes (L0.. on y, H0.. on x); hover shows
    the head and its value. diverging: a red-blue scale centred on 0 (for differences)."""
    z = np.asarray(z, dtype=float)
    colors: dict = {"colorscale": "Viridis"}
    if diverging:
        limit = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        colors = {"colorscale": "RdBu", "zmid": 0.0, "zmin": -limit, "zmax": limit}
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"H{h}" for h in range(z.shape[1])],
            y=[f"L{layer}" for layer in range(z.shape[0])],
            hovertemplate="%{y} %{x}: %{z:.4f}<extra></extra>",
            colorbar={"title": value},
            **colors,
        )
    )
    fig.update_xaxes(type="category", title="head", side="top")
    fig.update_yaxes(type="category", title="layer", autorange="reversed")
    fig.update_layout(
        title=title, width=min(60 * z.shape[1] + 240, 1000), height=min(40 * z.shape[0] + 220, 900)
    )
    return fig


def head_matrix(frame: pd.DataFrame, value: str = "value") -> np.ndarray:
    """[layer, head] mean of `frame[value]` per (layer, head); NaN for heads without rows."""
    missing = [c for c in ("layer", "head", value) if c not in frame.columns]
    if missing:
        raise SelectionError(f"the frame has no column {missing}; its columns: {list(frame.columns)}")
    if not len(frame):
        raise SelectionError("the frame has no rows to plot")
    mean = frame.groupby(["layer", "head"])[value].mean()
    layers = mean.index.get_level_values(0).to_numpy(int)
    heads_ = mean.index.get_level_values(1).to_numpy(int)
    out = np.full((layers.max() + 1, heads_.max() + 1), np.nan)  # [layer, head]
    out[layers, heads_] = mean.to_numpy(float)
    return out


def heads(
    frame: pd.DataFrame,
    value: str = "value",
    *,
    tower: str | None = None,
    condition: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer x head heat map of an analysis result (or any frame with `layer`, `head` and `value` columns),
    averaging the rows of each head. tower / condition: keep those rows (needed when the frame has such a
    column holding several values, so that towers or conditions are never averaged together)."""
    frame = _only(_only(frame, "tower", tower), "condition", condition)
    if value in frame.columns and not pd.api.types.is_numeric_dtype(frame[value]):
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        raise SelectionError(f"column {value!r} is not numeric; numeric columns: {numeric}")
    return head_map(head_matrix(frame, value), title=value if title is None else title, value=value)


def _only(frame: pd.DataFrame, column: str, wanted: str | None) -> pd.DataFrame:
    """The rows of `frame` whose `column` is `wanted`; None: all rows, if the column holds at most one value."""
    if column not in frame.columns:
        return frame
    held = sorted(frame[column].dropna().unique())
    if wanted is None:
        if len(held) > 1:
            raise SelectionError(f"the frame holds several {column}s {held}; pass {column}=one of them")
        return frame
    if wanted not in held:
        raise SelectionError(f"{column} {wanted!r} is not in the frame; it holds {column}s {held}")
    return frame[frame[column] == wanted]


def image_attention(image, grid: np.ndarray, *, title: str = "", hover_label: str = "attention") -> go.Figure:
    """`grid` [rows, cols] (one query's attention to each patch) drawn over `image` (a PIL image or an
    [H, W, 3] array): the image stretched to its patch cells, the heat map half-transparent on top."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)  # [H, W, 3]
    height, width = pixels.shape[:2]
    rows, cols = grid.shape
    fig = go.Figure(go.Image(z=pixels, hoverinfo="skip"))
    # cell centres in the image's pixel coordinates, where pixel i spans i - 0.5 .. i + 0.5
    fig.add_trace(
        go.Heatmap(
            z=grid,
            x0=width / cols / 2 - 0.5,
            dx=width / cols,
            y0=height / rows / 2 - 0.5,
            dy=height / rows,
            customdata=[[[r, c] for c in range(cols)] for r in range(rows)],
            opacity=0.55,
            colorscale="Viridis",
            zmin=0.0,
            hovertemplate="patch row %{customdata[0]} col %{customdata[1]}: %{z:.4f}<extra>"
            + hover_label
            + "</extra>",
        )
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    fig.update_layout(title=title, width=420, height=420)
    return fig


# ----- records ------------------------------------------------------------------------------------------
class RecordPlots:
    """`rec.plot`: figures of what one `capture` block recorded."""

    def __init__(self, record: Record) -> None:
        self._rec = record

    def pattern(
        self,
        example: int = 0,
        *,
        layer: int,
        head: int | None = None,
        tokens: Sequence[str] | None = None,
        tower: str | None = None,
        step: int = 0,
    ) -> go.Figure:
        """The [query, key] pattern of `head` (None: every recorded head of the layer, with a dropdown) in
        `layer` for `example`, from the recorded rows (`patterns=`) or else compact attention (`compact=`).
        tokens: the example's tokens for the axes, e.g. `lm.tokenizer.convert_ids_to_tokens(ids)`; tower:
        default "lm", or the only tower recorded (a ViT's "vision")."""
        tower = tower or main_tower(self._rec.examples.tower)
        found = self._rows(example, layer, tower, step)
        if head is not None:
            if head not in found:
                raise SelectionError(
                    f"head {head} of {tower} layer {layer} was not recorded for example {example}; "
                    f"recorded heads: {sorted(found)}"
                )
            found = {head: found[head]}
        shown = sorted(found)
        queries = found[shown[0]][0]
        probs = [found[h][1] for h in shown]
        names = [f"L{layer} H{h}" for h in shown]
        title = f"{tower} example {example}"
        return pattern(probs, queries, tokens=tokens, names=names, title=title)

    def _rows(
        self, example: int, layer: int, tower: str, step: int
    ) -> dict[int, tuple[list[int], np.ndarray]]:
        """head -> (query positions, probs [q, k]) of the layer: recorded rows first, else compact attention."""
        rec = self._rec
        rows = [
            r for r in rec.patterns if (r.example, r.tower, r.step, r.layer) == (example, tower, step, layer)
        ]
        if rows:
            return {r.head: (list(r.queries), r.probs.float().cpu().numpy()) for r in rows}
        compact = [c for c in rec.compact if (c.example, c.tower, c.layer) == (example, tower, layer)]
        if compact and step == 0:
            c = compact[0]
            n = c.q.shape[1]
            return {h: (list(range(n)), c.rows(h).float().cpu().numpy()) for h in c.heads}
        held = sorted(
            {(r.example, r.tower, r.layer) for r in rec.patterns}
            | {(c.example, c.tower, c.layer) for c in rec.compact}
        )
        where = ", ".join(f"example {e} {t} layer {la}" for e, t, la in held) or "none"
        raise SelectionError(
            f"no attention was recorded for example {example}, {tower} layer {layer}, step {step}; recorded: "
            f"{where}. Select it with capture(..., patterns=Select(...)) or compact=Select(...)"
        )

    def heads(
        self, metric: str = "entropy", *, role: str | None = None, tower: str | None = None, step: int = 0
    ) -> go.Figure:
        """Layer x head heat map of a head statistic (`rec.head_stats`' `stat`, e.g. "entropy", "mass" with
        role="bos", "alpha" with role="pos:0"), the mean over the record's examples. tower: as in `pattern`."""
        tower = tower or main_tower(self._rec.examples.tower)
        frame = select_stat(self._rec.head_stats, metric, role, tower=tower, step=step)
        return head_map(head_matrix(frame), title=f"{tower} {_metric_name(metric, role)}", value=metric)


def main_tower(towers: Iterable[str]) -> str:
    """The tower a figure shows by default: "lm" when there is one (or nothing is held), else the first."""
    held = sorted(set(towers))
    return "lm" if "lm" in held or not held else held[0]


def _metric_name(metric: str, role: str | None) -> str:
    return f"{metric} ({role})" if role else metric


def select_stat(
    stats: pd.DataFrame, metric: str, role: str | None, *, tower: str | None = None, step: int | None = 0
) -> pd.DataFrame:
    """The rows of one statistic (and role) in a tidy head_stats frame, with clear errors naming what is held.
    A stat with roles (mass, alpha) needs `role`; one without (entropy) takes none."""
    if tower is not None:
        towers = sorted(stats.tower.unique())
        if tower not in towers:
            raise SelectionError(f"tower {tower!r} has no statistics; towers held: {towers}")
        stats = stats[stats.tower == tower]
    if step is not None and len(stats):
        steps = sorted(stats.step.unique())
        if step not in steps:
            raise SelectionError(f"step {step} has no statistics; steps held: {steps}")
        stats = stats[stats.step == step]
    held = sorted(stats.stat.unique())
    if metric not in held:
        raise SelectionError(f"metric {metric!r} is not recorded; recorded stats: {held}")
    rows = stats[stats.stat == metric]
    roles = sorted(r for r in rows.role.unique() if r)
    if role is None and roles:
        raise SelectionError(f"metric {metric!r} is per role: pass role=one of {roles}")
    if role is not None and role not in roles:
        raise SelectionError(f"role {role!r} has no {metric!r} values; roles held: {roles or 'none'}")
    return rows if role is None else rows[rows.role == role]


# ----- stores -------------------------------------------------------------------------------------------
class StorePlots:
    """`store.plot`: figures of a store's statistics, compact attention and images."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def heads(
        self,
        metric: str = "entropy",
        condition: str | tuple[str, str] | None = None,
        *,
        role: str | None = None,
        tower: str | None = None,
    ) -> go.Figure:
        """Layer x head heat map of a stored statistic's mean over examples (prefill, step 0) under
        `condition` (None: every condition), or with `condition=(a, b)` the difference a - b, where a role
        absent from a condition's mass statistics (no image tokens without the image) counts as 0.
        tower: default "lm", or the store's only tower (a ViT's "vision")."""
        tower = tower or main_tower(self._store.examples().tower)
        name = f"{tower} {_metric_name(metric, role)}"
        if isinstance(condition, tuple):
            za, zb = _pad_same(*self._difference(metric, role, tower, *condition))
            a, b = condition
            return head_map(za - zb, title=f"{name}: {a} − {b}", diverging=True, value=f"Δ {metric}")
        z = head_matrix(select_stat(self._stats(tower, condition), metric, role, step=0))
        return head_map(z, title=f"{name}: {condition or 'all conditions'}", value=metric)

    def _stats(self, tower: str, condition: str | None) -> pd.DataFrame:
        stats = self._store.head_stats(condition=condition, tower=tower)
        if not len(stats):
            raise SelectionError(f"no {tower} statistics under condition {condition!r}")
        return stats

    def _difference(
        self, metric: str, role: str | None, tower: str, a: str, b: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """[layer, head] means (prefill) under a and b. A mass on a role that one condition lacks is 0 at
        each of its heads; the role must be held under at least one of them."""
        stats = [self._stats(tower, c) for c in (a, b)]
        if metric not in ROLE_MASS or role is None:
            za, zb = (head_matrix(select_stat(s, metric, role, step=0)) for s in stats)
            return za, zb
        held = [((s.stat == metric) & (s.role == role) & (s.step == 0)).any() for s in stats]
        if not any(held):
            select_stat(stats[0], metric, role, step=0)  # raises, naming the roles held
        out = []
        for s, has in zip(stats, held, strict=True):
            if has:
                out.append(head_matrix(select_stat(s, metric, role, step=0)))
                continue
            heads_of_stat = s[(s.stat == metric) & (s.step == 0)]  # e.g. no image tokens without the image
            if not len(heads_of_stat):
                select_stat(s, metric, role, step=0)  # raises, naming the stats held
            out.append(head_matrix(heads_of_stat.assign(value=0.0)))
        return out[0], out[1]

    def pattern(
        self,
        example: int | str,
        layer: int,
        head: int,
        *,
        condition: str | None = None,
        tower: str | None = None,
    ) -> go.Figure:
        """The exact [query, key] pattern of one head for one example, rebuilt from stored compact attention
        (`store.pattern`), with the stored tokens on the axes (positions where none are stored). tower:
        default "lm", or the store's only tower."""
        tower = tower or main_tower(self._store.examples().tower)
        probs = self._store.pattern(example, layer, head, tower=tower, condition=condition)  # [q, k]
        tokens = self._store.tokens(example, condition=condition) if tower == "lm" else None
        if tokens is not None and len(tokens) != probs.shape[1]:
            tokens = None  # e.g. a prompt stored apart from what the tower saw: positions are still right
        title = f"{tower} example {example}" + (f" ({condition})" if condition else "")
        return pattern(probs, tokens=tokens, names=[f"L{layer} H{head}"], title=f"{title} L{layer} H{head}")

    def image_attention(
        self,
        example: int | str,
        layer: int,
        head: int,
        *,
        query: int | None = None,
        condition: str | None = None,
        tower: str | None = None,
    ) -> go.Figure:
        """One query's attention to the image patches, over the example's stored thumbnail. tower: "lm" (an
        LVLM's image tokens, the longest run of one repeated token id forming a square grid) or a vision
        tower (prefix tokens, then a square patch grid); default the vision tower when the example has one.
        query: a position, negative from the end (default: the last token for "lm", the first for vision)."""
        store = self._store
        image = store.image(example, condition=condition)
        if image is None:
            raise SelectionError(
                f"example {example!r} has no stored image (text-only, or stored without one)"
            )
        tower = tower or _default_tower(store, example, condition)
        probs = store.pattern(example, layer, head, tower=tower, condition=condition)  # [q, k]
        n = probs.shape[1]
        q = (n - 1 if tower == "lm" else 0) if query is None else int(query)
        if not -n <= q < n:
            raise SelectionError(f"query {q} is outside example {example!r}'s {n} tokens (0..{n - 1})")
        positions, shape = self._patches(example, condition, tower, n)
        grid = probs[q % n, positions].reshape(shape)  # [rows, cols]
        title = f"{tower} L{layer} H{head}, example {example}: query {q % n} → patches"
        return image_attention(image, grid, title=title, hover_label=f"L{layer} H{head}")

    def _patches(self, example, condition, tower: str, n: int) -> tuple[list[int], tuple[int, int]]:
        """Key positions of the patch grid (in row-major order) and the grid's (rows, cols)."""
        if tower != "lm":
            side = math.isqrt(n)
            prefix = n - side * side  # CLS, distillation and register tokens come first
            if side < 2 or prefix > MAX_PREFIX:
                raise SelectionError(
                    f"{tower} example {example!r} has {n} tokens: not a square patch grid after at most "
                    f"{MAX_PREFIX} prefix tokens"
                )
            return list(range(prefix, n)), (side, side)
        info = self._store.example_info(example, condition=condition)
        if info.token_ids is None:
            raise SelectionError(f"example {example!r} has no stored token ids: its image tokens are unknown")
        start, length = _longest_square_run(list(info.token_ids))
        if not length:
            raise SelectionError(f"example {example!r}'s tokens hold no square run of image tokens")
        side = math.isqrt(length)
        return list(range(start, start + length)), (side, side)


def _pad_same(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both [layer, head] matrices padded with NaN to their common shape."""
    shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))

    def pad(m: np.ndarray) -> np.ndarray:
        return np.pad(m, [(0, s - d) for s, d in zip(shape, m.shape, strict=True)], constant_values=np.nan)

    return pad(a), pad(b)


def _default_tower(store: Store, example, condition: str | None) -> str:
    """The example's vision tower when it has one (with compact attention or not), else "lm"."""
    frame = store.examples(condition=condition)
    towers = set(frame[frame.example == example].tower)
    vision = sorted(towers - {"lm"})
    return vision[0] if vision else "lm"


def _longest_square_run(ids: list[int]) -> tuple[int, int]:
    """(start, length) of the longest run of one repeated id whose length is a square >= 4; (0, 0) if none."""
    best, start = (0, 0), 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            length = i - start
            if length >= 4 and math.isqrt(length) ** 2 == length and length > best[1]:
                best = (start, length)
            start = i
    return best
