"""Selections given to the store's readers: checked, turned into Parquet filters, and described in messages.

Layers, heads, steps and query positions are integers (numpy integers too); towers, stats and conditions are
names. A value of the wrong type is a SelectionError; `span` lists what a store holds ("0..11" for a run of
integers, else a sorted, shortened list).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from headlab.errors import SelectionError
from headlab.store.ids import describe_ids


def parquet_filter(**columns):
    """A pyarrow filter: every given column (list of values) must match; None means no condition."""
    expr = None
    for column, values in columns.items():
        if values is None:
            continue
        term = pads.field(column).isin([values] if isinstance(values, str) else list(values))
        expr = term if expr is None else expr & term
    return expr


def ints(what: str, values) -> list[int] | None:
    """Integer selections (a number or numbers); anything else is a SelectionError."""
    if values is None:
        return None
    items = [values] if isinstance(values, int | np.integer) else list(values)
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int | np.integer)]
    if bad:
        raise SelectionError(f"{what} must be integers, got {bad[0]!r}")
    return [int(v) for v in items]


def names(what: str, values) -> list[str] | None:
    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    if not all(isinstance(v, str) for v in items):
        raise SelectionError(f"{what} must be names (strings), got {items!r}")
    return items


def span(values) -> str:
    """Values for messages: "0..11" for a run of integers, else a sorted list (shortened)."""
    items = sorted(
        {v.item() if isinstance(v, np.generic) else v for v in values}, key=lambda v: (str(type(v)), v)
    )
    if (
        len(items) > 2
        and all(isinstance(v, int) for v in items)
        and items == list(range(items[0], items[-1] + 1))
    ):
        return f"{items[0]}..{items[-1]}"
    return describe_ids(items, 12) if items else "none"


def positions(queries: Sequence[int] | None, n: int, example) -> list[int]:
    """Query positions in 0..n-1 (negative ones count from the end); out of range: SelectionError."""
    if queries is None:
        return list(range(n))
    items = ints("queries", queries)
    bad = [q for q in items if not -n <= q < n]
    if bad:
        raise SelectionError(
            f"queries {bad} are outside example {example!r}'s {n} tokens (0..{n - 1} or -{n}..-1)"
        )
    return [q % n for q in items]


def at_position(hit: pd.DataFrame, position: int | str | None) -> pd.DataFrame:
    """The z_index rows at `position` (an example position, "last", or None: all)."""
    if position is None:
        return hit
    if position == "last":
        return hit[hit.position == hit.groupby("example").position.transform("max")]
    if isinstance(position, str | bool) or not isinstance(position, int | np.integer):
        raise SelectionError(f"position must be an integer or 'last', got {position!r}")
    if position not in set(hit.position.unique()):
        raise SelectionError(
            f"no head outputs at position {position}; stored positions: {span(hit.position.unique())}"
        )
    return hit[hit.position == position]
