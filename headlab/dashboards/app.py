"""The Dash head browser over one store: `make_app(path)` builds it, `serve(path)` runs it.

Layout: a layer x head heat map of any stored statistic or numeric result column (for one condition, or
condition A minus condition B); clicking a head shows its attention for the example whose id is typed in
(full [query, key] map for short examples, the chosen query's row as token-level heat over the tokens,
and the image part on the patch grid for LVLMs and ViTs); an atlas scatter when the store has an "atlas"
result. Under the heat map of a stored result, the options its analysis declares, with the values the
result was computed with (`result_options`). The callbacks are plain functions (`heatmap_figure`, `pattern_outputs`, ...) taking a
`BrowserData`, so they are tested without a browser. All dataset text reaches the page as component
children or figure labels, which Dash and Plotly escape; nothing is rendered as raw HTML.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from headlab.dashboards.data import BrowserData, Source, TokenLayout, layout_from_model
from headlab.errors import HeadlabError
from headlab.store import Store

DIFF, SINGLE = "diff", "single"


def _message_figure(text: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(xaxis_visible=False, yaxis_visible=False, height=300)
    return fig


def heatmap_figure(
    data: BrowserData, source: str, tower: str, mode: str, cond_a: str | None, cond_b: str | None
) -> go.Figure:
    """The layer x head heat map of `source` (an encoded Source) for condition A, or A minus B."""
    try:
        src = Source.decode(source)
        if mode == DIFF:
            if not cond_a or not cond_b:
                return _message_figure("choose conditions A and B for the difference view")
            z, title = data.difference(src, tower, cond_a, cond_b), f"{src.label}: {cond_a} − {cond_b}"
        else:
            z, title = data.matrix(src, tower, cond_a), f"{src.label}: {cond_a or 'all conditions'}"
    except HeadlabError as err:
        return _message_figure(str(err))
    limit = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    colors = dict(colorscale="RdBu", zmid=0.0, zmin=-limit, zmax=limit) if mode == DIFF else {}
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(z.shape[1])),
            y=list(range(z.shape[0])),
            hovertemplate="layer %{y} head %{x}: %{z:.4f}<extra></extra>",
            **colors,
        )
    )
    fig.update_layout(
        title=f"{tower} — {title}", xaxis_title="head", yaxis_title="layer", height=420, clickmode="event"
    )
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
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


def clicked_head(click: dict | None) -> tuple[int, int] | None:
    """(layer, head) of a heat-map or atlas click, or None."""
    if not click or not click.get("points"):
        return None
    point = click["points"][0]
    if "customdata" in point and point["customdata"] is not None:
        layer, head = point["customdata"][:2]
        return int(layer), int(head)
    return int(point["y"]), int(point["x"])


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


def pattern_outputs(
    data: BrowserData,
    click: dict | None,
    example: int | str | None,
    tower: str,
    condition: str | None,
    query: int | None,
) -> tuple[go.Figure, list, go.Figure, str]:
    """The pattern view of the clicked head: ([q, k] figure, token heat, patch-grid figure, status)."""
    head = clicked_head(click)
    if head is None:
        blank = _message_figure("click a head on the heat map")
        return blank, [], blank, "click a head on the heat map to see its attention"
    if example in (None, "") or condition is None:
        blank = _message_figure("type an example id and pick condition A")
        return blank, [], blank, "type an example id and pick condition A"
    layer, h = head
    try:
        view = data.pattern(data.example_id(example), layer, h, tower=tower, condition=condition, query=query)
    except HeadlabError as err:
        blank = _message_figure(str(err))
        return blank, [], blank, f"layer {layer} head {h}: {err}"
    labels = view.labels
    matrix = go.Figure(
        go.Heatmap(
            z=view.rows,
            x=list(range(len(labels))),
            y=view.queries,
            customdata=[[labels[k] for k in range(len(labels))] for _ in view.queries],
            hovertemplate="query %{y} → key %{customdata}: %{z:.4f}<extra></extra>",
            colorscale="Viridis",
        )
    )
    matrix.update_layout(
        title=f"{tower} L{layer} H{h}, example {example} ({condition})",
        xaxis_title="key",
        yaxis_title="query",
        yaxis_autorange="reversed",
        height=420,
    )
    row = view.rows[view.queries.index(view.query)]
    if view.grid is None:
        grid = _message_figure("no image part in this example")
    else:
        grid = go.Figure(
            go.Heatmap(
                z=view.grid, colorscale="Viridis", hovertemplate="row %{y} col %{x}: %{z:.4f}<extra></extra>"
            )
        )
        grid.update_layout(
            title=f"query {view.query} → image patches", yaxis_autorange="reversed", height=320, width=360
        )
    status = (
        f"{tower} layer {layer} head {h}, example {example} ({condition}), query {view.query}: {view.note}"
    )
    return (
        matrix,
        [html.Div(f"prompt: {view.prompt}", className="prompt"), *_token_heat(labels, row)],
        grid,
        status,
    )


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


def _dropdown(id_: str, options: list, value, **kwargs) -> html.Div:
    return html.Div(
        [
            html.Label(id_.replace("-", " ")),
            dcc.Dropdown(id=id_, options=options, value=value, clearable=False, **kwargs),
        ],
        style={"minWidth": "220px", "flex": "1"},
    )


def _default_source(sources: list[Source]) -> str | None:
    """Entropy when stored (a readable first view), else the first source."""
    preferred = [s for s in sources if s.kind == "stat" and s.name == "entropy"]
    return (preferred or sources)[0].encode() if sources else None


def message_page(title: str, text: str) -> html.Div:
    """A page that only explains something (an empty store), in place of the browser."""
    return html.Div([html.H2(title), html.P(text, id="message")], style={"fontFamily": "sans-serif"})


def build_layout(data: BrowserData) -> html.Div:
    """The browser page for `data`, or a message page when the store holds no examples."""
    root = str(data.store.root)
    if data.empty:
        return message_page(
            "headlab: empty store",
            f"{root} holds no examples yet; capture some with `headlab capture --out {root} ...`.",
        )
    sources = data.sources()
    conditions, towers = data.conditions(), data.towers()
    count, low, high = data.example_ids()
    options = [{"label": s.label, "value": s.encode()} for s in sources]
    controls = html.Div(
        [
            _dropdown("source", options, _default_source(sources)),
            _dropdown("tower", towers, "lm" if "lm" in towers else towers[0]),
            _dropdown(
                "mode", [{"label": "condition A", "value": SINGLE}, {"label": "A − B", "value": DIFF}], SINGLE
            ),
            _dropdown("condition-a", conditions, conditions[0]),
            _dropdown("condition-b", conditions, conditions[-1]),
        ],
        style={"display": "flex", "gap": "12px", "flexWrap": "wrap"},
    )
    pattern_controls = html.Div(
        [
            html.Label(f"example id ({count} stored, {low}..{high}) "),
            # text, not a number field: string-id stores ("COCO_val2014_000000000042") are typed as stored
            dcc.Input(id="example", type="text", value=str(low), debounce=True),
            html.Label(" query position (empty = last) "),
            dcc.Input(id="query", type="number", value=None, step=1, debounce=True),
        ]
    )
    atlas = atlas_figure(data)
    extra = [
        dcc.Graph(id=name, figure=fig)
        for name, fig in (("circuits", circuit_figure(data)), ("position", position_figure(data)))
        if fig is not None
    ]
    return html.Div(
        [
            html.H2("headlab head browser"),
            html.P(f"{root}: {count} examples, conditions {', '.join(conditions)}", id="store-info"),
            controls,
            dcc.Graph(id="heatmap"),
            html.Div(id="result-options"),
            *([dcc.Graph(id="atlas", figure=atlas)] if atlas is not None else []),
            *extra,
            pattern_controls,
            html.P(id="status"),
            html.Div(id="tokens", style={"lineHeight": "1.8", "fontFamily": "monospace"}),
            html.Div(
                [dcc.Graph(id="pattern", style={"flex": "2"}), dcc.Graph(id="grid", style={"flex": "1"})],
                style={"display": "flex"},
            ),
        ],
        style={"fontFamily": "sans-serif", "margin": "12px"},
    )


def _register(app: Dash, data: BrowserData, has_atlas: bool) -> None:
    """Wire the plain callback functions to the page's components."""
    app.callback(
        Output("heatmap", "figure"),
        Input("source", "value"),
        Input("tower", "value"),
        Input("mode", "value"),
        Input("condition-a", "value"),
        Input("condition-b", "value"),
    )(lambda *args: heatmap_figure(data, *args))
    app.callback(Output("result-options", "children"), Input("source", "value"))(
        lambda source: result_options(data, source)
    )
    clicks = [Input("heatmap", "clickData"), *([Input("atlas", "clickData")] if has_atlas else [])]

    def pattern(*args):
        from dash import ctx

        heat_click, *rest = args
        atlas_click = rest.pop(0) if has_atlas else None
        click = atlas_click if has_atlas and ctx.triggered_id == "atlas" else heat_click
        return pattern_outputs(data, click, *rest)

    app.callback(
        Output("pattern", "figure"),
        Output("tokens", "children"),
        Output("grid", "figure"),
        Output("status", "children"),
        *clicks,
        Input("example", "value"),
        Input("tower", "value"),
        Input("condition-a", "value"),
        Input("query", "value"),
    )(pattern)


def make_app(store: str | Path | Store, layout: TokenLayout | None = None) -> Dash:
    """The Dash app over `store` (a path or an open Store); raises StoreError for a path that is not one.

    layout: the model's token layout (see `load_layout`); without it tokens are shown as positions."""
    opened = store if isinstance(store, Store) else Store.open(store)
    data = BrowserData(opened, layout)
    app = Dash(__name__, title="headlab head browser")
    app.layout = build_layout(data)
    if not data.empty:
        _register(app, data, data.atlas() is not None)
    return app


def load_layout(store: Store) -> tuple[TokenLayout | None, str]:
    """The token layout of the store's model when it loads (and matches), else None; with a note."""
    from headlab.analyses.registry import store_model

    try:
        return layout_from_model(store_model(store)), "tokens from the store's model"
    except HeadlabError as err:
        return None, f"the store's model did not load ({err}); tokens are shown as positions"


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8050, model: bool = True) -> None:
    """Open the store at `path`, load its model's tokenizer (unless model=False) and serve the browser."""
    store = Store.open(path)
    layout, note = load_layout(store) if model else (None, "tokens are shown as positions")
    print(f"headlab dash: {note}; serving {store.root} on http://{host}:{port}")
    make_app(store, layout).run(host=host, port=port, debug=False)
