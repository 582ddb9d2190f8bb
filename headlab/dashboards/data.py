"""What the head browser reads from a store: head matrices, patterns and token labels, lazily.

`BrowserData` wraps an open `Store` and answers the dashboard's questions without ever loading every
pattern: head_stats reads are filtered by stat, tower and condition in the Parquet scan; a pattern read
touches one example's rows of one head; the stat/role menu comes from one example's rows. Head matrices
are [layer, head] arrays (NaN where a head has no value) and are cached per (source, tower, condition).

A `Source` names what a heat map shows: a stored statistic (stat, role), or a numeric column of a stored
analysis result. `TokenLayout` is the optional model knowledge (token strings, image-token id, patch grid)
built once from the store's model by `layout_from_model`; without it, tokens are shown as positions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd

from headlab.errors import SelectionError
from headlab.store import Store

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


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """Model knowledge for labelling tokens: `tokenize(prompt) -> (token strings, token ids)`, the LVLM's
    image-token id, and the patch grid (rows, cols) and prefix tokens of each vision tower."""

    tokenize: Callable[[str], tuple[list[str], list[int]]]
    image_token_id: int | None = None
    grids: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # tower -> (rows, cols, prefix)


@dataclass(frozen=True)
class PatternView:
    """One head's attention for one example: `rows` [q, k] (only the chosen query when the example is
    long), `labels` per key, `query` the chosen query position, and the image part as a grid."""

    rows: np.ndarray  # [q, k]
    queries: list[int]
    labels: list[str]
    query: int
    prompt: str
    grid: np.ndarray | None  # [rows, cols]: the query's attention to the image tokens / patches
    note: str


def layout_from_model(lm) -> TokenLayout:
    """The token layout of a loaded model (its tokenizer, image-token id and vision grids)."""
    tokenizer = lm.tokenizer or getattr(lm.processor, "tokenizer", None)

    def tokenize(prompt: str) -> tuple[list[str], list[int]]:
        if tokenizer is None:
            return [], []
        ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)], ids

    grids = {t.name: (*t.grid, t.prefix_tokens) for t in lm.towers if t.grid}
    return TokenLayout(tokenize=tokenize, image_token_id=lm.image_token_id, grids=grids)


class BrowserData:
    """The dashboard's lazy view of one store (see the module docstring)."""

    def __init__(self, store: Store, layout: TokenLayout | None = None) -> None:
        self.store = store
        self.layout = layout
        self._examples = store.examples()
        self.matrix = lru_cache(maxsize=64)(self._matrix)

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
            frame = self.store.head_stats(stat=source.name, tower=tower, condition=condition)
            frame = (
                frame[(frame.role == source.column) & (frame.step == frame.step.min())]
                if len(frame)
                else frame
            )
            value = "value"
        else:
            frame = self.store.result(source.name)
            if "tower" in frame:
                frame = frame[frame.tower == tower]
            if condition is not None and "condition" in frame:
                frame = frame[frame.condition == condition]
            value = source.column
        if not len(frame):
            raise SelectionError(f"no values of {source.label} for tower {tower!r}, condition {condition!r}")
        mean = frame.groupby(["layer", "head"])[value].mean()
        layers, heads = mean.index.get_level_values(0), mean.index.get_level_values(1)
        out = np.full((int(layers.max()) + 1, int(heads.max()) + 1), np.nan)  # [layer, head]
        out[layers.to_numpy(int), heads.to_numpy(int)] = mean.to_numpy(float)
        return out

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
        """One head's attention for one example; the full [q, k] when short, else just the query row.
        `example` as the store keeps it, or as typed (`example_id`)."""
        example = self.example_id(example)
        info = self._examples[
            (self._examples.example == example)
            & (self._examples.condition == condition)
            & (self._examples.tower == tower)
        ]
        if not len(info):
            raise SelectionError(
                f"example {example!r} is not stored under condition {condition!r} ({tower} tower)"
            )
        n = int(info.n_tokens.iloc[0])
        q = n - 1 if query is None else int(query)
        if not -n <= q < n:
            raise SelectionError(f"query {q} is outside example {example!r}'s {n} tokens (0..{n - 1})")
        q %= n
        full = n <= 256
        rows = self.store.pattern(
            example, layer, head, tower=tower, condition=condition, queries=None if full else [q]
        )  # [q, k]
        queries = list(range(rows.shape[0])) if full else [q]
        prompt = str(json.loads(info.meta.iloc[0] or "{}").get("prompt", ""))
        labels, image_positions, note = self._labels(prompt, tower, n)
        grid = self._grid(rows[queries.index(q)], tower, n, image_positions)
        if grid is None and image_positions:
            note += f"; {len(image_positions)} image tokens do not fill the tower's patch grid"
        return PatternView(rows, queries, labels, q, prompt, grid, note)

    def _labels(self, prompt: str, tower: str, n: int) -> tuple[list[str], list[int], str]:
        """Key labels ("i:token" or positions), the LM's image-token positions, and a note on how."""
        positions = [str(i) for i in range(n)]
        if tower != "lm":
            return positions, [], "vision tokens: positions"
        if self.layout is None:
            return positions, [], "tokens shown as positions (the store's model did not load)"
        tokens, ids = self.layout.tokenize(prompt)
        image = self.layout.image_token_id
        if image is not None and ids.count(image) == 1 and len(ids) < n:  # the processor expands one image
            at, extra = ids.index(image), n - len(ids)
            tokens = tokens[:at] + [tokens[at]] * (extra + 1) + tokens[at + 1 :]
            ids = ids[:at] + [image] * (extra + 1) + ids[at + 1 :]
        if len(tokens) != n:
            return (
                positions,
                [],
                f"tokens shown as positions (the prompt has {len(tokens)} tokens, the store {n})",
            )
        image_positions = [i for i, t in enumerate(ids) if image is not None and t == image]
        return (
            [f"{i}:{t}" for i, t in enumerate(tokens)],
            image_positions,
            "tokens from the model's tokenizer",
        )

    def _grid(self, row: np.ndarray, tower: str, n: int, image_positions: list[int]) -> np.ndarray | None:
        """The query's attention to the image part on the patch grid [rows, cols], or None."""
        if tower == "lm":
            grids = self.layout.grids if self.layout else {}
            shape = next(((r, c) for r, c, _ in grids.values() if r * c == len(image_positions)), None)
            if not image_positions or shape is None:
                return None
            return row[image_positions].reshape(shape)  # [rows, cols]
        if self.layout is not None and tower in self.layout.grids:
            r, c, prefix = self.layout.grids[tower]
        else:  # no model: assume one prefix token then a square grid, as in CLIP / ViT
            side = math.isqrt(n - 1)
            r, c, prefix = side, side, 1
        if prefix + r * c != n:
            return None
        return row[prefix:].reshape(r, c)  # [rows, cols]
