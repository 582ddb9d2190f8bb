"""The browser's state and its URL: what a link holds so that opening it shows the same view.

The state is the view's controls (source, tower, mode, condition A and B, example, query) and the chosen
head. It lives in the page's components; `encode` writes it as the URL's query string ("?source=...&
head=3,5&example=q1"), `decode` reads one back (unknown keys ignored; a malformed head left out). One
callback (`next_state`) keeps both in step: a changed URL (a link opened, back / forward) sets the
controls; a click on a head or an example link, or a changed control, writes the URL. It is a single
callback because Dash allows a component to be both input and output only within one callback.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from urllib.parse import parse_qsl, urlencode

URL = "url"  # the dcc.Location's id


@dataclass(frozen=True, kw_only=True)
class ViewState:
    """What a link to the browser holds (module docstring); None where unset."""

    source: str | None = None
    tower: str | None = None
    mode: str | None = None
    a: str | None = None
    b: str | None = None
    example: str | None = None
    query: int | None = None
    head: tuple[int, int] | None = None  # (layer, head)


def encode(state: ViewState) -> str:
    """The URL query string of `state` ("" when nothing is set), keys in field order."""
    pairs = []
    for f in fields(state):
        value = getattr(state, f.name)
        if value is None or value == "":
            continue
        pairs.append((f.name, f"{value[0]},{value[1]}" if f.name == "head" else str(value)))
    return "?" + urlencode(pairs) if pairs else ""


def decode(search: str | None) -> ViewState:
    """The state a URL query string holds; unknown keys are ignored, a malformed head or query dropped."""
    values: dict = {}
    names = {f.name for f in fields(ViewState)}
    for key, value in parse_qsl((search or "").lstrip("?")):
        if key not in names:
            continue
        if key == "head":
            parts = value.split(",")
            if len(parts) == 2 and all(p.strip().lstrip("-").isdigit() for p in parts):
                values[key] = (int(parts[0]), int(parts[1]))
        elif key == "query":
            if value.strip().lstrip("-").isdigit():
                values[key] = int(value)
        else:
            values[key] = value
    return ViewState(**values)


def clicked_head(click: dict | None) -> tuple[int, int] | None:
    """(layer, head) of a heat-map, scatter or atlas click, or None. Points carrying customdata
    [layer, head, ...] (scatter, atlas) are read from it, heat-map cells from (y, x)."""
    if not click or not click.get("points"):
        return None
    point = click["points"][0]
    if point.get("customdata") is not None:
        layer, head = point["customdata"][:2]
        return int(layer), int(head)
    return int(point["y"]), int(point["x"])


def next_state(
    trigger: object, search: str | None, click: dict | None, opened: object, controls: ViewState
) -> tuple[ViewState, bool]:
    """The state after an event, and whether the URL should be rewritten.

    trigger: what fired (URL, a figure id, a control id, or an example link's id dict). search: the URL's
    query string. click: the figure click when a figure fired. opened: the example id of a clicked example
    link. controls: the state the page's controls hold now (their head is the last chosen one)."""
    if trigger == URL:
        from_url = decode(search)
        merged = {
            f.name: getattr(from_url, f.name)
            for f in fields(from_url)
            if getattr(from_url, f.name) is not None
        }
        return replace(controls, **merged), False
    if isinstance(trigger, dict):
        return (replace(controls, example=str(opened)), True) if opened is not None else (controls, False)
    if click is not None:
        head = clicked_head(click)
        return (replace(controls, head=head), True) if head is not None else (controls, False)
    return controls, True
