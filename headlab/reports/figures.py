"""The report figures' shared shapes: heat maps over layers and heads, and grouped bars with error bars.

Contract:
- Layers and heads are categories, never numbers: a figure that shows them labels them "L0", "L1", ... and
  "H0", "H1", ... (`layer_labels`, `head_labels`) on axes of type "category", so they tick once per layer or
  head and never at half steps. `layer_head_heatmap` is the one way a report draws a (layer x head) grid;
  `categorical_axes` puts such axes on any other figure (e.g. layers x image tokens).
- `grouped_bars(groups, categories, values, intervals)` draws one bar trace per group (a condition) over the
  categories (metrics, subtasks), each bar with its interval as an asymmetric error bar when it has one;
  a value of None (n/a) is a missing bar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def layer_labels(layers: Sequence[int]) -> list[str]:
    return [f"L{int(layer)}" for layer in layers]


def head_labels(heads: Sequence[int]) -> list[str]:
    return [f"H{int(head)}" for head in heads]


def categorical_axes(fig, *, x: str | None = None, y: str | None = None):
    """`fig` with its x and/or y axis of type "category" titled `x` / `y` (the first category at the top
    of a heat map's y axis, as a table reads)."""
    if x is not None:
        fig.update_xaxes(type="category", title_text=x)
    if y is not None:
        fig.update_yaxes(type="category", title_text=y, autorange="reversed")
    return fig


def layer_head_heatmap(grid, *, title: str, colorscale: str | None = None, **heatmap):
    """A heat map of `grid` (a DataFrame indexed by layer, one column per head) on categorical axes."""
    import plotly.graph_objects as go

    trace = go.Heatmap(
        z=grid.values,
        x=head_labels(grid.columns),
        y=layer_labels(grid.index),
        colorscale=colorscale,
        hovertemplate="%{y} %{x}: %{z:.4f}<extra></extra>",
        **heatmap,
    )
    fig = go.Figure(trace)
    fig.update_layout(title=title)
    return categorical_axes(fig, x="head", y="layer")


def grouped_bars(
    groups: Mapping[str, Mapping[str, float | None]],
    intervals: Mapping[str, Mapping[str, Sequence[float] | None]],
    categories: Sequence[str],
    *,
    title: str,
    **layout,
):
    """One bar trace per group over `categories`; `intervals[group][category]` = (low, high) or None."""
    import plotly.graph_objects as go

    traces = []
    for name, values in groups.items():
        y = [values.get(c) for c in categories]
        bounds = [(intervals.get(name) or {}).get(c) for c in categories]
        traces.append(
            go.Bar(
                name=name,
                x=list(categories),
                y=y,
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[_above(v, b) for v, b in zip(y, bounds, strict=True)],
                    arrayminus=[_below(v, b) for v, b in zip(y, bounds, strict=True)],
                ),
            )
        )
    fig = go.Figure(traces)
    fig.update_layout(barmode="group", title=title, **layout)
    fig.update_xaxes(type="category")
    return fig


def _above(value: float | None, bounds) -> float | None:
    return None if value is None or not bounds else max(0.0, bounds[1] - value)


def _below(value: float | None, bounds) -> float | None:
    return None if value is None or not bounds else max(0.0, value - bounds[0])
