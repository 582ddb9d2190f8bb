"""The head browser's figures and panels as plain functions of `BrowserData` (tested without a browser):
the layer x head heat map (one condition, A - B, or A | B | A - B side by side, the chosen head outlined),
the options a stored result was computed with, one head's attention for one example (the [query, key] map
with token labels, the query row as token heat, the image part over the picture), the head atlas, the
circuit view and the position-bias curves. Dataset text reaches the page as component children or figure
labels, which Dash and Plotly escape; nothing is rendered as raw HTML.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import html
from plotly.subplots import make_subplots

from headlab.dashboards.data import BrowserData, Source
from headlab.dashboards.views import message_figure, overlay_figure
from headlab.errors import HeadlabError, SelectionError

SINGLE, DIFF, SIDE = "single", "diff", "side"  # heat-map modes: A; A - B; A | B | A - B


def _matrices(data: BrowserData, src: Source, tower: str, mode: str, a: str | None, b: str | None) -> list:
    """The (title, [layer, head] matrix, diverging) panels of a heat-map mode: A; A - B; or A, B, A - B."""
    if mode == SINGLE:
        return [(a or "all conditions", data.matrix(src, tower, a), False)]
    if not a or not b:
        raise SelectionError("choose conditions A and B for the difference view")
    diff = (f"{a} − {b}", data.difference(src, tower, a, b), True)
    if mode == DIFF:
        return [diff]
    return [(a, data.matrix(src, tower, a), False), (b, data.matrix(src, tower, b), False), diff]


def _shared_range(matrices: list[np.ndarray]) -> tuple[float | None, float | None]:
    """(min, max) over the finite values of all `matrices` (one colour scale for A and B), or Nones."""
    finite = [z[np.isfinite(z)] for z in matrices]
    values = np.concatenate(finite) if finite else np.empty(0)
    return (float(values.min()), float(values.max())) if values.size else (None, None)


def heatmap_figure(
    data: BrowserData,
    source: str,
    tower: str,
    mode: str,
    cond_a: str | None,
    cond_b: str | None,
    head: list | tuple | None = None,
) -> go.Figure:
    """The layer x head heat map of `source` (an encoded Source): for condition A (SINGLE), A minus B
    (DIFF, a diverging scale around 0), or A, B and A - B side by side (SIDE, A and B on one scale); the
    chosen `head` (layer, head) outlined in every panel."""
    try:
        src = Source.decode(source)
        panels = _matrices(data, src, tower, mode, cond_a, cond_b)
    except HeadlabError as err:
        return message_figure(str(err))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _, _ in panels])
    zmin, zmax = _shared_range([z for _, z, diverging in panels if not diverging])
    for i, (_, z, diverging) in enumerate(panels, start=1):
        limit = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        colors = (
            dict(colorscale="RdBu", zmid=0.0, zmin=-limit, zmax=limit)
            if diverging
            else dict(colorscale="Viridis", zmin=zmin, zmax=zmax)
        )
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(z.shape[1])),
                y=list(range(z.shape[0])),
                hovertemplate="layer %{y} head %{x}: %{z:.4f}<extra></extra>",
                showscale=diverging or i == 1,
                colorbar={"x": 1.0 + 0.08 * (i - 1)} if len(panels) > 1 else None,
                **colors,
            ),
            row=1,
            col=i,
        )
        if head:
            fig.add_shape(
                type="rect",
                x0=head[1] - 0.5,
                x1=head[1] + 0.5,
                y0=head[0] - 0.5,
                y1=head[0] + 0.5,
                line={"color": "#00e5ff", "width": 3},
                row=1,
                col=i,
            )
    title = panels[0][0] if len(panels) == 1 else f"{cond_a} | {cond_b} | difference"
    fig.update_layout(title=f"{tower} — {src.label}: {title}", height=420, clickmode="event")
    fig.update_xaxes(dtick=1, title_text="head")
    fig.update_yaxes(dtick=1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return fig


def result_options(data: BrowserData, source: str | None) -> list:
    """What the heat map's stored result was computed with: each option its analysis declares
    (`analyses.registry`: what it takes, its default, its help) with the value saved beside the result.
    [] for a statistic; one line for a result that no analysis declares."""
    from headlab.analyses.registry import as_text, registered

    try:
        src = Source.decode(source or "")
    except HeadlabError:
        return []
    if src.kind != "result":
        return []
    entry = registered().get(src.name)
    if entry is None:
        return [html.P(f"{src.name}: no analysis declares this result, so it has no listed options")]
    try:
        params = data.store.result_params(src.name)
    except HeadlabError as err:
        return [html.P(f"{src.name}: options unreadable ({err})")]
    items = [
        html.Li(
            f"{key} = {as_text(params[key]) if key in params else 'not recorded'}: {option.describe()}, "
            f"default {as_text(option.default)}. {option.help}"
        )
        for key, option in entry.options.items()
    ]
    lead = f"{src.name}: {entry.description}" + ("" if items else " (no options)")
    return [html.P(lead), html.Ul(items)]


def _token_heat(labels: list[str], row: np.ndarray) -> list[html.Span]:
    """The query row as token spans whose background shows the attention weight (text stays text)."""
    top = float(row.max()) if row.size and row.max() > 0 else 1.0
    return [
        html.Span(
            label.split(":", 1)[-1] if ":" in label else label,
            title=f"{label}: {w:.4f}",
            style={
                "backgroundColor": f"rgba(220, 40, 40, {w / top:.3f})",
                "padding": "1px 2px",
                "margin": "1px",
                "display": "inline-block",
                "border": "1px solid #ddd",
            },
        )
        for label, w in zip(labels, row.tolist(), strict=True)
    ]


def _matrix_figure(view, title: str) -> go.Figure:
    """The [query, key] map with token labels on both axes (block ranges when block-averaged)."""
    ys = [
        view.axis[i // view.block] if view.block > 1 else view.labels[q] for i, q in enumerate(view.queries)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=view.rows,
            x=view.axis,
            y=ys,
            hovertemplate="query %{y} → key %{x}: %{z:.4f}<extra></extra>",
            colorscale="Viridis",
        )
    )
    fig.update_layout(title=title, xaxis_title="key", yaxis_title="query", height=520)
    fig.update_xaxes(type="category", tickangle=-60)
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def pattern_outputs(
    data: BrowserData,
    head: list | tuple | None,
    example: int | str | None,
    tower: str,
    condition: str | None,
    query: int | None,
) -> tuple[go.Figure, list, go.Figure, str]:
    """The chosen head's attention for the example: ([q, k] figure with token labels, token heat of the
    query row, the image part over the picture, status line)."""
    if not head:
        blank = message_figure("click a head on the heat map")
        return blank, [], blank, "click a head on the heat map to see its attention"
    if example in (None, "") or condition is None:
        blank = message_figure("open an example and pick condition A")
        return blank, [], blank, "open an example and pick condition A"
    layer, h = head
    try:
        example = data.example_id(example)
        view = data.pattern(example, layer, h, tower=tower, condition=condition, query=query)
    except HeadlabError as err:
        blank = message_figure(str(err))
        return blank, [], blank, f"layer {layer} head {h}: {err}"
    where = f"{tower} layer {layer} head {h}, example {example} ({condition})"
    matrix = _matrix_figure(view, where)
    if view.grid is None:
        grid = message_figure("no image part in this example")
    else:
        png = data.info(example, condition).thumbnail
        grid = overlay_figure(view.grid, png, f"query {view.query} → image patches")
    status = f"{where}, query {view.query}: {view.note}"
    prompt = html.Div(f"prompt: {view.prompt}", className="prompt")
    return matrix, [prompt, *_token_heat(view.labels, view.row)], grid, status


def atlas_figure(data: BrowserData) -> go.Figure | None:
    """The head atlas scatter (x, y coloured by role; click a point to open that head), or None."""
    frame = data.atlas()
    if frame is None:
        return None
    role = frame["role"].astype(str) if "role" in frame else np.full(len(frame), "head")
    fig = go.Figure()
    for name in sorted(set(role)):
        part = frame[role == name]
        fig.add_trace(
            go.Scatter(
                x=part.x,
                y=part.y,
                mode="markers",
                name=name,
                customdata=np.stack([part.layer, part["head"]], axis=1),
                hovertemplate="layer %{customdata[0]} head %{customdata[1]}<extra>%{fullData.name}</extra>",
            )
        )
    fig.update_layout(title="head atlas", height=380)
    return fig


def _head_labels(frame) -> list[str]:
    return [f"L{layer}H{head}" for layer, head in zip(frame.layer, frame["head"], strict=True)]


def circuit_figure(data: BrowserData) -> go.Figure | None:
    """Per-head circuit scores from the stored patching results (bars per direction / task) and, for a
    `circuit-overlap` result, both tasks' scores with the overlap coefficient and IoU in the title; None
    when the store holds none of them."""
    results = set(data.store.results())
    fig, title = go.Figure(), []
    for name in ("activation-patching", "attribution-patching"):
        if name not in results:
            continue
        frame = data.store.result(name)
        keys = [c for c in ("direction", "positions") if c in frame]
        for key, part in frame.groupby(keys) if keys else [((), frame)]:
            label = " ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            fig.add_trace(go.Bar(x=_head_labels(part), y=part.score, name=f"{name} {label}".strip()))
        title.append(name)
    if "circuit-overlap" in results:
        frame = data.store.result("circuit-overlap")
        task_a = str(frame.task_a.iloc[0]) if "task_a" in frame else "a"
        task_b = str(frame.task_b.iloc[0]) if "task_b" in frame else "b"
        for column, task in (("score_a", task_a), ("score_b", task_b)):
            fig.add_trace(go.Bar(x=_head_labels(frame), y=frame[column], name=f"overlap: {task}"))
        title.append(
            f"circuit overlap {task_a} vs {task_b}: coefficient {float(frame.overlap_coefficient.iloc[0]):.2f}, "
            f"IoU {float(frame.iou.iloc[0]):.2f}"
        )
    if not title:
        return None
    fig.update_layout(title="; ".join(title), barmode="group", height=380, yaxis_title="score")
    return fig


def position_figure(data: BrowserData) -> go.Figure | None:
    """Position-bias curves from a stored `slot-profile` result: each head's attention share per segment
    slot (one line per head), or None."""
    if "slot-profile" not in data.store.results():
        return None
    frame = data.store.result("slot-profile")
    slots = sorted((c for c in frame.columns if c.startswith("slot_")), key=lambda c: int(c.split("_")[1]))
    fig = go.Figure()
    for _, row in frame.iterrows():
        values = [row[c] for c in slots]
        keep = [(i, v) for i, v in enumerate(values) if v == v]  # NaN: a slot this k does not have
        fig.add_trace(
            go.Scatter(
                x=[i for i, _ in keep],
                y=[v for _, v in keep],
                mode="lines+markers",
                name=f"L{int(row.layer)}H{int(row['head'])}",
            )
        )
    fig.update_layout(
        title="position bias: attention share per segment slot",
        xaxis_title="slot",
        yaxis_title="share of segment attention",
        height=380,
    )
    return fig
