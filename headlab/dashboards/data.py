"""What the head browser reads from a store: head matrices, patterns and token labels, lazily.

`BrowserData` wraps an open `Store` and answers the dashboard's questions without ever loading every
pattern: head_stats reads are filtered by stat, tower and condition in the Parquet scan; a pattern read
touches one example's rows of one head; the stat/role menu comes from one example's rows. Head matrices
are [layer, head] arrays (NaN where a head has no value) and are cached per (source, tower, condition).

A `Source` names what a heat map shows: a stored statistic (stat, role), or a numeric column of a stored
analysis result. For a mass stat a role an example lacks counts as 0 (`ZERO_WHEN_ABSENT`). What went into
the model (`Store.example_info`: prompt, tokens, image, label, answer) is read per (example, condition)
and cached, so the example table reads one page at a time. `TokenLayout` is the optional model knowledge
(tokenizer, image-token id, patch grid) built from the store's model by `layout_from_model`: the fallback
for stores without stored tokens (`patterns.example_tokens`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from headlab.dashboards.patterns import (
    ExampleTokens,
    GridPlace,
    PatternView,
    TokenLayout,
    example_tokens,
    layout_from_model,
    pattern_view,
)
from headlab.errors import HeadlabError, SelectionError
from headlab.store import ExampleInfo, Store

__all__ = ["BrowserData", "PatternView", "Source", "TokenLayout", "layout_from_model"]

# stats whose role is a set of keys: an example without the role's tokens puts 0 attention mass on it
ZERO_WHEN_ABSENT = ("mass", "mass_last")
KEY_COLUMNS = ("tower", "layer", "head", "condition", "example", "step", "cluster")


@dataclass(frozen=True, kw_only=True)
class Source:
    """What a heat map shows: `kind` "stat" (a head_stats stat, averaged over examples, for one role) or
    "result" (a numeric column of a stored analysis result)."""

    kind: str
    name: str  # the stat, or the result name
    column: str = ""  # the role of a stat ("" for role-less stats), or the result's column

    def encode(self) -> str:
        """The dropdown value of this source (JSON, so names may hold any character)."""
        return json.dumps([self.kind, self.name, self.column])

    @classmethod
    def decode(cls, value: str) -> Source:
        try:
            kind, name, column = json.loads(value)
        except (ValueError, TypeError) as err:
            raise SelectionError(f"not a heat-map source: {value!r}") from err
        return cls(kind=kind, name=name, column=column)

    @property
    def label(self) -> str:
        if self.kind == "stat":
            return f"{self.name} [{self.column}]" if self.column else self.name
        return f"{self.name}: {self.column} (result)"


class BrowserData:
    """The dashboard's lazy view of one store (see the module docstring)."""

    def __init__(self, store: Store, layout: TokenLayout | None = None) -> None:
        self.store = store
        self.layout = layout
        self._examples = store.examples()
        self.matrix = lru_cache(maxsize=64)(self._matrix)
        self._info = lru_cache(maxsize=4096)(self._read_info)
        self._infos = lru_cache(maxsize=16)(self._read_infos)

    @property
    def empty(self) -> bool:
        return not len(self._examples)

    def conditions(self) -> list[str]:
        return self.store.conditions()

    def towers(self) -> list[str]:
        return sorted(self._examples.tower.unique()) if len(self._examples) else []

    def example_ids(self) -> tuple[int, int | str, int | str]:
        """(count, first, last) of the stored example ids, in order (integers by value, strings as text)."""
        ids = sorted(self._examples.example.unique().tolist())
        return len(ids), ids[0], ids[-1]

    def example_id(self, value: object) -> int | str:
        """An example id typed in the browser, as the store keeps it: an integer store takes digits ("42"
        or 42), a string store takes the text as typed ("000042" stays "000042")."""
        if self.store.id_kind == "int" and isinstance(value, str):
            text = value.strip()
            if not re.fullmatch(r"-?\d+", text):
                raise SelectionError(f"example ids of this store are integers; {value!r} is not one")
            value = int(text)
        if self.store.id_kind == "str" and isinstance(value, int | float) and not isinstance(value, bool):
            raise SelectionError(
                f"example ids of this store are strings; type the id as stored, not {value!r}"
            )
        return value

    def sources(self) -> list[Source]:
        """Every stat (with its roles) of the first stored example, then every numeric result column."""
        first = self._examples.iloc[0]
        sample = self.store.head_stats(examples=[first.example], condition=first.condition)
        found = [
            Source(kind="stat", name=s, column=r)
            for s, r in sample[["stat", "role"]].drop_duplicates().itertuples(index=False)
        ]
        for name in self.store.results():
            frame = self.store.result(name)
            if not {"layer", "head"} <= set(frame.columns):
                continue
            for column in frame.columns:
                if column not in KEY_COLUMNS and pd.api.types.is_numeric_dtype(frame[column]):
                    found.append(Source(kind="result", name=name, column=column))
        return sorted(found, key=lambda s: (s.kind != "stat", s.name, s.column))

    def _matrix(self, source: Source, tower: str, condition: str | None) -> np.ndarray:
        """[layer, head] mean of `source` over examples (NaN where missing); condition None = all."""
        if source.kind == "stat":
            return self._stat_matrix(source, tower, condition)
        else:
            frame = self.store.result(source.name)
            if "tower" in frame:
                frame = frame[frame.tower == tower]
            if condition is not None and "condition" in frame:
                frame = frame[frame.condition == condition]
            value = source.column
        if not len(frame):
            raise SelectionError(f"no values of {source.label} for tower {tower!r}, condition {condition!r}")
        return _as_matrix(frame.groupby(["layer", "head"])[value].mean())

    def _stat_matrix(self, source: Source, tower: str, condition: str | None) -> np.ndarray:
        """[layer, head] mean of a stat's role over the examples holding the stat (first step). For a mass
        stat (`ZERO_WHEN_ABSENT`) an example without the role counts as 0: its tokens are absent, so they
        receive no attention (a text-only example has no image mass); other stats average where present."""
        frame = self.store.head_stats(stat=source.name, tower=tower, condition=condition)
        if len(frame):
            frame = frame[frame.step == frame.step.min()]
        part = frame[frame.role == source.column] if len(frame) else frame
        zero_fill = source.name in ZERO_WHEN_ABSENT and len(frame)
        if not len(part) and not zero_fill:
            raise SelectionError(f"no values of {source.label} for tower {tower!r}, condition {condition!r}")
        if not zero_fill:
            return _as_matrix(part.groupby(["layer", "head"]).value.mean())
        keys = ["layer", "head"]
        holding = frame[[*keys, "example", "condition"]].drop_duplicates().groupby(keys).size()
        total = part.groupby(keys).value.sum().reindex(holding.index, fill_value=0.0)
        return _as_matrix(total / holding)

    def per_example(self, source: Source, tower: str, condition: str, layer: int, head: int) -> pd.Series:
        """One head's value of a stat source for every example stored under `condition` (example id ->
        value, by the same rule as the heat map: first step; a mass role an example lacks counts as 0)."""
        if source.kind != "stat":
            raise SelectionError(f"{source.label} is a result with no per-example values; choose a statistic")
        frame = self.store.head_stats(
            stat=source.name, tower=tower, condition=condition, layers=[layer], heads=[head]
        )
        if not len(frame):
            raise SelectionError(f"no values of {source.label} for L{layer}H{head} ({tower}, {condition})")
        frame = frame[frame.step == frame.step.min()]
        values = frame[frame.role == source.column].groupby("example").value.mean()
        examples = frame.example.drop_duplicates()
        if source.name in ZERO_WHEN_ABSENT:
            return values.reindex(examples, fill_value=0.0)
        return values

    def info(self, example: int | str, condition: str) -> ExampleInfo:
        """What went into the model for `example` under `condition` (`Store.example_info`); an empty
        ExampleInfo when the store does not hold the pair. Cached: the table pages and views reread it."""
        return self._info(example, condition)

    def _read_info(self, example: int | str, condition: str) -> ExampleInfo:
        try:
            return self.store.example_info(example, condition=condition)
        except HeadlabError:
            return ExampleInfo()

    def _read_infos(self, condition: str) -> dict[int | str, ExampleInfo]:
        """Every example's ExampleInfo under `condition`, in one store read (the table's filter)."""
        try:
            return self.store.example_infos(condition=condition)
        except HeadlabError:
            return {}

    def example_list(self, text: str = "") -> list[int | str]:
        """Every stored example id in order; `text` keeps those whose id or stored prompt contains it
        (case-insensitive; prompts are read only when filtering)."""
        ids = sorted(self._examples.example.unique().tolist())
        needle = text.strip().lower()
        if not needle:
            return ids
        keep = []
        for example in ids:
            prompts = [
                self._infos(c).get(example, ExampleInfo()).prompt or "" for c in self.conditions_of(example)
            ]
            if needle in str(example).lower() or any(needle in p.lower() for p in prompts):
                keep.append(example)
        return keep

    def conditions_of(self, example: int | str) -> list[str]:
        """The conditions under which `example` is stored, by name."""
        return sorted(self._examples[self._examples.example == example].condition.unique().tolist())

    def difference(self, source: Source, tower: str, a: str, b: str) -> np.ndarray:
        """[layer, head] of condition a minus condition b (shapes padded with NaN where they differ)."""
        if source.kind == "result" and "condition" not in self.store.result(source.name):
            raise SelectionError(f"result {source.name!r} has no condition column; there is no A - B of it")
        ma, mb = self.matrix(source, tower, a), self.matrix(source, tower, b)
        shape = (max(ma.shape[0], mb.shape[0]), max(ma.shape[1], mb.shape[1]))
        pa, pb = (
            np.pad(m, [(0, s - d) for s, d in zip(shape, m.shape, strict=True)], constant_values=np.nan)
            for m in (ma, mb)
        )
        return pa - pb

    def atlas(self) -> pd.DataFrame | None:
        """The stored head atlas (tower, layer, head, x, y, role), or None."""
        if "atlas" not in self.store.results():
            return None
        frame = self.store.result("atlas")
        return frame if {"x", "y", "layer", "head"} <= set(frame.columns) else None

    def pattern(
        self, example: int | str, layer: int, head: int, *, tower: str, condition: str, query: int | None
    ) -> PatternView:
        """One head's attention for one example (`patterns.pattern_view`: full, block-averaged or just the
        query row by length). `example` as the store keeps it, or as typed (`example_id`)."""
        example = self.example_id(example)
        rows = self._examples[
            (self._examples.example == example)
            & (self._examples.condition == condition)
            & (self._examples.tower == tower)
        ]
        if not len(rows):
            raise SelectionError(
                f"example {example!r} is not stored under condition {condition!r} ({tower} tower)"
            )
        n = int(rows.n_tokens.iloc[0])
        q = n - 1 if query is None else int(query)
        if not -n <= q < n:
            raise SelectionError(f"query {q} is outside example {example!r}'s {n} tokens (0..{n - 1})")
        info = self.info(example, condition)
        tokens = example_tokens(info, tower, n, self.layout, self._vision_grid())
        read = lambda queries: self.store.pattern(  # noqa: E731
            example, layer, head, tower=tower, condition=condition, queries=queries
        )  # [q, k]
        return pattern_view(read, n, q % n, tokens, self._grid_of(tower, n, tokens), info.prompt or "")

    def _vision_grid(self) -> tuple[int, int, int] | None:
        """(rows, cols, prefix) of the first vision tower: the model's when loaded, else inferred from the
        stored token count (one prefix token then a square grid, as in CLIP and ViT)."""
        if self.layout is not None and self.layout.grids:
            return next(iter(self.layout.grids.values()))
        vision = self._examples[self._examples.tower != "lm"]
        if not len(vision):
            return None
        n = int(vision.n_tokens.iloc[0])
        side = math.isqrt(n - 1)
        return (side, side, 1) if side * side == n - 1 else None

    def _grid_of(self, tower: str, n: int, tokens: ExampleTokens) -> GridPlace | None:
        """Where the image sits among the example's keys: the LM's image tokens, or a tower's patches."""
        if tower == "lm":
            grid = self._vision_grid()
            if grid is None or not tokens.image_positions:
                return None
            r, c, _ = grid
            return GridPlace(tokens.image_positions, (r, c)) if r * c == len(tokens.image_positions) else None
        if self.layout is not None and tower in self.layout.grids:
            r, c, prefix = self.layout.grids[tower]
        else:
            grid = self._vision_grid()
            if grid is None:
                return None
            r, c, prefix = grid
        return GridPlace(list(range(prefix, n)), (r, c)) if prefix + r * c == n else None


def _as_matrix(mean: pd.Series) -> np.ndarray:
    """A (layer, head)-indexed Series as a [layer, head] array, NaN where a head has no value."""
    layers, heads = mean.index.get_level_values(0), mean.index.get_level_values(1)
    out = np.full((int(layers.max()) + 1, int(heads.max()) + 1), np.nan)  # [layer, head]
    out[layers.to_numpy(int), heads.to_numpy(int)] = mean.to_numpy(float)
    return out
