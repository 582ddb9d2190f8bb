"""The browser's example and head views as plain functions of `BrowserData`: the example table, one
example's header (prompt, label, answers, image), a head's top / bottom examples with deciles, the scatter
of every head on two sources coloured by a third, and a patch grid drawn over the example's picture.

Every example link is an `html.Button` with the pattern-matching id {"type": OPEN, "index": id,
"where": its list}: the app
turns a click into the example view. Dataset text reaches the page as component children or figure labels
(escaped by React and Plotly); images are the stored PNG thumbnails as data: URIs (no network).
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import html

from headlab.dashboards.data import BrowserData, Source
from headlab.errors import HeadlabError

OPEN = "open-example"  # the pattern-matching id type of every link that opens an example
PAGE_SIZE = 10
TOP = 5  # top and bottom examples listed per head
CELL = {"border": "1px solid #ddd", "padding": "3px 6px", "verticalAlign": "top", "textAlign": "left"}


def thumbnail_uri(png: bytes | None) -> str | None:
    """A stored PNG thumbnail as a data: URI (None stays None)."""
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _text(value: object) -> str:
    """A label or answer as shown: strings as they are, other JSON values as JSON, None as "-"."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def _short(text: str | None, limit: int = 90) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def open_button(example: int | str, text: str, where: str) -> html.Button:
    """A link-styled button that opens `example` in the example view; `where` (the list it sits in) keeps
    the ids unique when one example is listed twice on the page."""
    return html.Button(
        text,
        id={"type": OPEN, "index": example, "where": where},
        n_clicks=0,
        className="open-example",
        style={"border": "none", "background": "none", "color": "#1f5fbf", "cursor": "pointer", "padding": 0},
    )


def _thumbnail(png: bytes | None, height: int = 48) -> html.Img | str:
    uri = thumbnail_uri(png)
    return "" if uri is None else html.Img(src=uri, style={"height": f"{height}px"}, className="thumb")


def example_table(data: BrowserData, page: int | None, text: str | None) -> tuple[html.Table, str]:
    """One page (1-based, PAGE_SIZE rows) of the examples whose id or prompt contains `text`: id (opens the
    example), prompt, label, the model's answer per condition and the image thumbnail; and a page note."""
    ids = data.example_list(text or "")
    pages = max(1, -(-len(ids) // PAGE_SIZE))
    page = min(max(int(page or 1), 1), pages)
    conditions = data.conditions()
    head = ["id", "prompt", "label", *(f"answer [{c}]" for c in conditions), "image"]
    body = []
    for example in ids[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]:
        infos = {c: data.info(example, c) for c in data.conditions_of(example)}
        first = next(iter(infos.values()))
        thumb = next((i.thumbnail for i in infos.values() if i.thumbnail is not None), None)
        cells = [
            open_button(example, str(example), "table"),
            _short(first.prompt),
            _text(first.label),
            *(_text(infos[c].answer) if c in infos else "not stored" for c in conditions),
            _thumbnail(thumb),
        ]
        body.append(html.Tr([html.Td(c, style=CELL) for c in cells]))
    table = html.Table(
        [html.Thead(html.Tr([html.Th(h, style=CELL) for h in head])), html.Tbody(body)],
        style={"borderCollapse": "collapse", "fontSize": "13px"},
    )
    return table, f"page {page} of {pages} ({len(ids)} examples{' matching' if text else ''})"


def example_header(data: BrowserData, example: int | str | None) -> list:
    """The example view's header: per stored condition its prompt, label and answer; and its image."""
    if example in (None, ""):
        return [html.P("open an example from the table, or type its id")]
    try:
        example = data.example_id(example)
    except HeadlabError as err:
        return [html.P(str(err))]
    conditions = data.conditions_of(example)
    if not conditions:
        return [html.P(f"example {example!r} is not stored")]
    rows = []
    thumb = None
    for c in conditions:
        info = data.info(example, c)
        thumb = thumb or info.thumbnail
        rows.append(
            html.Tr(
                [
                    html.Td(c, style=CELL),
                    html.Td(info.prompt or "-", style={**CELL, "whiteSpace": "pre-wrap"}),
                    html.Td(_text(info.label), style=CELL),
                    html.Td(_text(info.answer), style=CELL),
                ]
            )
        )
    head = html.Tr([html.Th(h, style=CELL) for h in ("condition", "prompt", "label", "answer")])
    table = html.Table([html.Thead(head), html.Tbody(rows)], style={"borderCollapse": "collapse"})
    return [
        html.H4(f"example {example}"),
        html.Div([table, _thumbnail(thumb, 160)], style={"display": "flex", "gap": "16px"}),
    ]


def top_examples(
    data: BrowserData, source: str | None, tower: str, condition: str | None, head: list | None
) -> list:
    """A head's examples ranked by the heat map's statistic under `condition`: the TOP highest, the TOP
    lowest, and one example per decile (the one nearest the decile's median, as HeadVis samples each
    interval); each opens the example view."""
    if not head or condition is None:
        return [html.P("click a head to list its top and bottom examples")]
    layer, h = head
    try:
        src = Source.decode(source or "")
        values = data.per_example(src, tower, condition, layer, h).sort_values(ascending=False)
    except HeadlabError as err:
        return [html.P(f"top examples: {err}")]
    title = f"{tower} L{layer}H{h}: examples by {src.label} ({condition}, {len(values)} examples)"
    lists = [
        ("top", values.head(TOP)),
        ("bottom", values.tail(TOP).iloc[::-1]),
        ("deciles (10 = highest)", decile_examples(values)),
    ]
    return [
        html.H4(title),
        html.Div(
            [
                html.Div([html.B(name), _ranked(data, part, condition, name.split()[0])], style={"flex": "1"})
                for name, part in lists
            ],
            style={"display": "flex", "gap": "16px"},
        ),
    ]


def decile_examples(values) -> object:
    """One example per decile of `values` (a Series example -> value), labelled 1..10 (10 = highest): the
    example whose value is nearest its decile's median. Fewer than 10 examples: one per example."""
    ranks = values.rank(method="first", pct=True)
    decile = np.minimum(np.ceil(ranks.to_numpy() * 10), 10).astype(int)
    picked = {}
    for d in sorted(set(decile.tolist()), reverse=True):
        part = values[decile == d]
        nearest = (part - part.median()).abs().idxmin()
        picked[(d, nearest)] = part[nearest]
    return pd.Series({example: value for (_, example), value in picked.items()}, dtype=float).rename_axis(
        None
    )


def _ranked(data: BrowserData, values, condition: str, where: str) -> html.Ol:
    items = []
    for example, value in values.items():
        info = data.info(example, condition)
        items.append(
            html.Li(
                [
                    open_button(example, str(example), where),
                    f" {value:.4f} ",
                    html.Span(_short(info.prompt, 60), style={"color": "#555"}),
                    " ",
                    _thumbnail(info.thumbnail, 28),
                ]
            )
        )
    return html.Ol(items, style={"paddingLeft": "20px", "fontSize": "13px"})


def scatter_figure(
    data: BrowserData, x: str | None, y: str | None, color: str | None, tower: str, condition: str | None
) -> go.Figure:
    """Every head of `tower` as a point at (x, y), two sources' values under `condition`, coloured by a
    third; heads missing either value are left out. Click a point to open that head."""
    try:
        sx, sy = Source.decode(x or ""), Source.decode(y or "")
        mx, my = data.matrix(sx, tower, condition), data.matrix(sy, tower, condition)
        sc = Source.decode(color) if color else None
        mc = data.matrix(sc, tower, condition) if sc else None
    except HeadlabError as err:
        return message_figure(str(err))
    shape = tuple(max(a, b) for a, b in zip(mx.shape, my.shape, strict=True))
    vx, vy = _flat(mx, shape), _flat(my, shape)
    layers, heads = np.indices(shape)  # [layer, head]
    lay, hd = layers.ravel(), heads.ravel()
    vc = _flat(mc, shape) if mc is not None else None
    keep = np.isfinite(vx) & np.isfinite(vy)
    marker = {"size": 9}
    if vc is not None:
        marker |= {
            "color": vc[keep],
            "colorscale": "Viridis",
            "showscale": True,
            "colorbar": {"title": sc.label},
        }
    fig = go.Figure(
        go.Scatter(
            x=vx[keep],
            y=vy[keep],
            mode="markers",
            marker=marker,
            customdata=np.stack([lay[keep], hd[keep]], axis=1),
            hovertemplate="L%{customdata[0]}H%{customdata[1]}: (%{x:.4f}, %{y:.4f})<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"{tower} heads ({condition or 'all conditions'})",
        xaxis_title=sx.label,
        yaxis_title=sy.label,
        height=420,
        clickmode="event",
    )
    return fig


def _flat(matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A [layer, head] matrix padded with NaN to `shape` (cut where larger), raveled."""
    out = np.full(shape, np.nan)
    r, c = min(shape[0], matrix.shape[0]), min(shape[1], matrix.shape[1])
    out[:r, :c] = matrix[:r, :c]
    return out.ravel()


def overlay_figure(grid: np.ndarray, png: bytes | None, title: str) -> go.Figure:
    """The patch grid [rows, cols] as a semi-transparent heat map over the example's picture (stretched to
    the grid), or alone when no thumbnail is stored."""
    rows, cols = grid.shape
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            colorscale="Inferno",
            opacity=0.55 if png is not None else 1.0,
            hovertemplate="row %{y} col %{x}: %{z:.4f}<extra></extra>",
        )
    )
    if png is not None:
        fig.add_layout_image(
            source=thumbnail_uri(png),
            xref="x",
            yref="y",
            x=-0.5,
            y=-0.5,
            sizex=cols,
            sizey=rows,
            sizing="stretch",
            layer="below",
        )
    fig.update_layout(title=title, height=360, width=400, plot_bgcolor="white")
    fig.update_xaxes(range=[-0.5, cols - 0.5], showgrid=False, zeroline=False)
    fig.update_yaxes(range=[rows - 0.5, -0.5], showgrid=False, zeroline=False, scaleanchor="x")
    return fig


def message_figure(text: str) -> go.Figure:
    """A figure that only shows `text` (an explanation in place of a plot)."""
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(xaxis_visible=False, yaxis_visible=False, height=300)
    return fig
