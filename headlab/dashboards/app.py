"""The Dash head browser over one store: `make_app(path)` builds it, `serve(path)` runs it.

The page, top to bottom: the controls (source: any stored statistic and role or numeric result column;
tower; mode: condition A, A - B, or A | B | A - B side by side; conditions A and B); the layer x head heat
map beside a scatter of every head on two sources coloured by a third (click a cell or a point to choose
that head: it is outlined in the heat map); the options of a stored result; the atlas, circuit and
position views when their results are stored; the chosen head's top and bottom examples and one per
decile; the example table (id, prompt, label, answer per condition, thumbnail; filter and pages); and the
example view: its prompt, label, answers and image, the head's attention as token heat, the [query, key]
map with token labels, and the image part over the picture. Every example id on the page opens the
example view. The state (controls, head, example, query) is kept in the URL (`state.py`), so a link
reopens the view. The figures and panels are plain functions of `BrowserData` (`figures.py`,
`views.py`); this module lays them out and wires them.
"""

from __future__ import annotations

from pathlib import Path

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from headlab.conditions import NO_IMAGE, WITH_IMAGE
from headlab.dashboards import state as url_state
from headlab.dashboards.data import BrowserData, Source, TokenLayout, layout_from_model
from headlab.dashboards.figures import (
    DIFF,
    SIDE,
    SINGLE,
    atlas_figure,
    circuit_figure,
    heatmap_figure,
    pattern_outputs,
    position_figure,
    result_options,
)
from headlab.dashboards.views import OPEN, example_header, example_table, scatter_figure, top_examples
from headlab.errors import HeadlabError
from headlab.store import Store

__all__ = [
    "build_layout",
    "circuit_figure",
    "heatmap_figure",
    "load_layout",
    "make_app",
    "pattern_outputs",
    "position_figure",
    "result_options",
    "serve",
]

# the controls the URL holds, as (ViewState field, component id, property)
CONTROLS = (
    ("source", "source", "value"),
    ("tower", "tower", "value"),
    ("mode", "mode", "value"),
    ("a", "condition-a", "value"),
    ("b", "condition-b", "value"),
    ("example", "example", "value"),
    ("query", "query", "value"),
)
# every figure gets a camera button that saves it as a PNG (plotly's toImage), named after the figure
GRAPH_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def _graph(id_: str, **kwargs) -> dcc.Graph:
    config = {
        **GRAPH_CONFIG,
        "toImageButtonOptions": {**GRAPH_CONFIG["toImageButtonOptions"], "filename": id_},
    }
    return dcc.Graph(id=id_, config=config, **kwargs)


def _dropdown(id_: str, options: list, value, label: str | None = None, **kwargs) -> html.Div:
    return html.Div(
        [
            html.Label(label or id_.replace("-", " ")),
            dcc.Dropdown(id=id_, options=options, value=value, clearable=False, **kwargs),
        ],
        style={"minWidth": "200px", "flex": "1"},
    )


def _default_source(sources: list[Source]) -> str | None:
    """Entropy when stored (a readable first view), else the first source."""
    preferred = [s for s in sources if s.kind == "stat" and s.name == "entropy"]
    return (preferred or sources)[0].encode() if sources else None


def _scatter_defaults(sources: list[Source]) -> tuple[str | None, str | None, str | None]:
    """(x, y, colour) of the scatter: entropy, the first mass role (image when stored), then a result
    column when one is stored, else the first sink score (alpha of position 0)."""

    def first(*tests) -> str | None:
        for test in tests:
            hit = next((s for s in sources if test(s)), None)
            if hit is not None:
                return hit.encode()
        return sources[0].encode() if sources else None

    x = first(lambda s: s.name == "entropy")
    y = first(lambda s: s.name == "mass" and s.column == "image", lambda s: s.name == "mass")
    colour = first(lambda s: s.kind == "result", lambda s: s.name == "alpha" and s.column == "pos:0")
    return x, y, colour


def default_conditions(conditions: list[str]) -> tuple[str, str]:
    """Conditions A and B shown first: with_image and no_image when both are stored (the comparison VHD
    is defined with), else the first and the last by name."""
    if WITH_IMAGE in conditions and NO_IMAGE in conditions:
        return WITH_IMAGE, NO_IMAGE
    return conditions[0], conditions[-1]


def message_page(title: str, text: str) -> html.Div:
    """A page that only explains something (an empty store), in place of the browser."""
    return html.Div([html.H2(title), html.P(text, id="message")], style={"fontFamily": "sans-serif"})


def _controls(data: BrowserData, sources: list[Source]) -> html.Div:
    conditions, towers = data.conditions(), data.towers()
    a, b = default_conditions(conditions)
    options = [{"label": s.label, "value": s.encode()} for s in sources]
    modes = [
        {"label": "condition A", "value": SINGLE},
        {"label": "A − B", "value": DIFF},
        {"label": "A | B | A − B", "value": SIDE},
    ]
    return html.Div(
        [
            _dropdown("source", options, _default_source(sources)),
            _dropdown("tower", towers, "lm" if "lm" in towers else towers[0]),
            _dropdown("mode", modes, SINGLE),
            _dropdown("condition-a", conditions, a),
            _dropdown("condition-b", conditions, b),
        ],
        style={"display": "flex", "gap": "12px", "flexWrap": "wrap"},
    )


def _scatter_panel(sources: list[Source]) -> html.Div:
    options = [{"label": s.label, "value": s.encode()} for s in sources]
    x, y, colour = _scatter_defaults(sources)
    return html.Div(
        [
            html.Div(
                [
                    _dropdown("scatter-x", options, x, "x"),
                    _dropdown("scatter-y", options, y, "y"),
                    _dropdown("scatter-color", options, colour, "colour"),
                ],
                style={"display": "flex", "gap": "6px"},
            ),
            _graph("scatter"),
        ],
        style={"flex": "2", "minWidth": "420px"},
    )


def _example_sections(data: BrowserData) -> list:
    count, low, high = data.example_ids()
    table = [
        html.H3("examples"),
        html.Div(
            [
                html.Label("filter (id or prompt) "),
                dcc.Input(id="example-filter", type="text", value="", debounce=True),
                html.Label(" page "),
                dcc.Input(id="page", type="number", value=1, min=1, step=1, debounce=True),
                html.Span(id="page-note", style={"marginLeft": "8px"}),
            ]
        ),
        html.Div(id="example-table"),
    ]
    view = html.Div(
        [
            html.H3("example view"),
            html.Div(
                [
                    html.Label(f"example id ({count} stored, {low}..{high}) "),
                    # text, not a number field: string-id stores ("COCO_val2014_000000000042") are typed as stored
                    dcc.Input(id="example", type="text", value=str(low), debounce=True),
                    html.Label(" query position (empty = last) "),
                    dcc.Input(id="query", type="number", value=None, step=1, debounce=True),
                ]
            ),
            html.Div(id="example-header"),
            html.P(id="status"),
            html.Div(id="tokens", style={"lineHeight": "1.8", "fontFamily": "monospace"}),
            html.Div(
                [_graph("pattern", style={"flex": "2"}), _graph("grid", style={"flex": "1"})],
                style={"display": "flex"},
            ),
        ],
        id="example-view",
    )
    return [html.Div(table, id="example-list"), view]


def build_layout(data: BrowserData) -> html.Div:
    """The browser page for `data`, or a message page when the store holds no examples."""
    root = str(data.store.root)
    if data.empty:
        return message_page(
            "headlab: empty store",
            f"{root} holds no examples yet; capture some with `headlab capture --out {root} ...`.",
        )
    sources = data.sources()
    count, _, _ = data.example_ids()
    atlas = atlas_figure(data)
    extra = [
        _graph(name, figure=fig)
        for name, fig in (("circuits", circuit_figure(data)), ("position", position_figure(data)))
        if fig is not None
    ]
    return html.Div(
        [
            dcc.Location(id=url_state.URL, refresh=False),
            dcc.Store(id="head"),
            html.H2("headlab head browser"),
            html.P(f"{root}: {count} examples, conditions {', '.join(data.conditions())}", id="store-info"),
            _controls(data, sources),
            html.Div(
                [
                    html.Div(_graph("heatmap"), style={"flex": "3", "minWidth": "480px"}),
                    _scatter_panel(sources),
                ],
                style={"display": "flex", "gap": "12px", "flexWrap": "wrap"},
                id="head-views",
            ),
            html.Div(id="result-options"),
            *([_graph("atlas", figure=atlas)] if atlas is not None else []),
            *extra,
            html.Div(id="top-examples"),
            *_example_sections(data),
        ],
        style={"fontFamily": "sans-serif", "margin": "12px"},
    )


def sync_state(trigger, search, figure_click, opened, values: list, head) -> tuple:
    """The state callback (`state.next_state`) as Dash outputs: (URL search, head, *CONTROLS values).
    trigger: ctx.triggered_id (None on the page's first call: the URL, when it holds a state, wins)."""
    controls = url_state.ViewState(
        **{name: value for (name, _, _), value in zip(CONTROLS, values, strict=True)},
        head=tuple(head) if head else None,
    )
    if trigger is None:
        trigger = url_state.URL if search else "initial"
    new, write = url_state.next_state(trigger, search, figure_click, opened, controls)
    if new == controls and not write:
        raise PreventUpdate
    out_values = [getattr(new, name) for name, _, _ in CONTROLS]
    changed = [v if v != old else no_update for v, old in zip(out_values, values, strict=True)]
    head_out = list(new.head) if new.head and new.head != controls.head else no_update
    if trigger == url_state.URL:  # the controls follow the URL: leave it as it is
        return (no_update, head_out, *changed)
    return (url_state.encode(new), head_out, *changed)


def _register(app: Dash, data: BrowserData, has_atlas: bool) -> None:
    """Wire the plain callback functions to the page's components."""
    app.callback(
        Output("heatmap", "figure"),
        Input("source", "value"),
        Input("tower", "value"),
        Input("mode", "value"),
        Input("condition-a", "value"),
        Input("condition-b", "value"),
        Input("head", "data"),
    )(lambda *args: heatmap_figure(data, *args))
    app.callback(
        Output("scatter", "figure"),
        Input("scatter-x", "value"),
        Input("scatter-y", "value"),
        Input("scatter-color", "value"),
        Input("tower", "value"),
        Input("condition-a", "value"),
    )(lambda *args: scatter_figure(data, *args))
    app.callback(Output("result-options", "children"), Input("source", "value"))(
        lambda source: result_options(data, source)
    )
    figures = ["heatmap", "scatter", *(["atlas"] if has_atlas else [])]

    def on_event(search, *args):
        clicks, rest = args[: len(figures)], args[len(figures) :]
        _, *values, head = rest
        trigger = ctx.triggered_id
        click = clicks[figures.index(trigger)] if trigger in figures else None
        opened = None
        if isinstance(trigger, dict):
            if not ctx.triggered[0]["value"]:  # a link appeared (a new table page), none was clicked
                raise PreventUpdate
            opened = trigger["index"]
        return sync_state(trigger, search, click, opened, values, head)

    app.callback(
        Output(url_state.URL, "search"),
        Output("head", "data"),
        *(Output(cid, prop) for _, cid, prop in CONTROLS),
        Input(url_state.URL, "search"),
        *(Input(name, "clickData") for name in figures),
        Input({"type": OPEN, "index": ALL, "where": ALL}, "n_clicks"),
        *(Input(cid, prop) for _, cid, prop in CONTROLS),
        State("head", "data"),
    )(on_event)
    app.callback(
        Output("pattern", "figure"),
        Output("tokens", "children"),
        Output("grid", "figure"),
        Output("status", "children"),
        Input("head", "data"),
        Input("example", "value"),
        Input("tower", "value"),
        Input("condition-a", "value"),
        Input("query", "value"),
    )(lambda *args: pattern_outputs(data, *args))
    app.callback(Output("example-header", "children"), Input("example", "value"))(
        lambda example: example_header(data, example)
    )
    app.callback(
        Output("top-examples", "children"),
        Input("source", "value"),
        Input("tower", "value"),
        Input("condition-a", "value"),
        Input("head", "data"),
    )(lambda *args: top_examples(data, *args))
    app.callback(
        Output("example-table", "children"),
        Output("page-note", "children"),
        Input("page", "value"),
        Input("example-filter", "value"),
    )(lambda page, text: example_table(data, page, text))


def make_app(store: str | Path | Store, layout: TokenLayout | None = None) -> Dash:
    """The Dash app over `store` (a path or an open Store); raises StoreError for a path that is not one.

    layout: the model's token layout (see `load_layout`); without it, tokens come from what the store
    holds (`Store.example_info`) or are shown as positions."""
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
        return None, f"the store's model did not load ({err}); tokens come from the store, else positions"


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8050, model: bool = True) -> None:
    """Open the store at `path`, load its model's tokenizer (unless model=False) and serve the browser."""
    store = Store.open(path)
    layout, note = load_layout(store) if model else (None, "tokens come from the store, else positions")
    print(f"headlab dash: {note}; serving {store.root} on http://{host}:{port}")
    make_app(store, layout).run(host=host, port=port, debug=False)
