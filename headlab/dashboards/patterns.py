"""One head's attention for one example, shaped for the browser: token labels, the image part, and long
sequences reduced on the server.

Shapes: n tokens of the example; [q, k] an attention map (rows: queries, columns: keys); [rows, cols] the
patch grid. `pattern_view` picks what to read by length: the exact [q, k] up to `FULL_TOKENS` tokens,
the map averaged over blocks of `block` consecutive tokens on both axes up to `MAX_BLOCKED_TOKENS` (each
cell the mean attention of a query block to a key block, so rows stay comparable), and beyond that only
the chosen query's row. The query's exact row [k] is always kept for the token heat and the image overlay.

Token labels come from what the store holds (`ExampleInfo.tokens`, the ids decoded alone at capture); a
store from before those tables falls back to re-tokenizing the prompt with the model's tokenizer
(`TokenLayout`), and without either, tokens are positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from headlab.store import ExampleInfo

FULL_TOKENS = 512  # up to this many tokens the [q, k] map is shown exactly
MAX_BLOCKED_TOKENS = 4096  # up to this many, block-averaged (the full map is read once); beyond, one row
BLOCKS = 256  # the block-averaged map has at most this many blocks per axis


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """Model knowledge for labelling tokens: `tokenize(prompt) -> (token strings, token ids)`, the LVLM's
    image-token id, and the patch grid (rows, cols) and prefix tokens of each vision tower."""

    tokenize: Callable[[str], tuple[list[str], list[int]]]
    image_token_id: int | None = None
    grids: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # tower -> (rows, cols, prefix)


@dataclass(frozen=True)
class ExampleTokens:
    """An example's n token labels ("i:token", or "i" as positions), the positions of its image tokens in
    the language model, and a note on where the labels come from."""

    labels: list[str]
    image_positions: list[int]
    note: str


@dataclass(frozen=True)
class GridPlace:
    """Where the image sits among an example's keys: `positions` (rows * cols of them, in raster order)
    and the patch grid `shape` (rows, cols)."""

    positions: list[int]
    shape: tuple[int, int]


@dataclass(frozen=True)
class PatternView:
    """One head's attention for one example: `rows` [q', k'] over `queries` (positions, or block starts
    when `block` > 1; only the chosen query when the example is very long), `axis` the key labels of the
    map's columns, `row` the chosen query's exact row [k] with `labels` per key, and the image part of
    that row on the patch grid `grid` [rows, cols] (None without one)."""

    rows: np.ndarray  # [q', k']
    queries: list[int]
    axis: list[str]
    block: int
    row: np.ndarray  # [k]
    labels: list[str]
    query: int
    prompt: str
    grid: np.ndarray | None  # [rows, cols]
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


def example_tokens(
    info: ExampleInfo,
    tower: str,
    n: int,
    layout: TokenLayout | None,
    grid: tuple[int, int, int] | None,
) -> ExampleTokens:
    """The labels of an example's n tokens in `tower` (module docstring: stored tokens first, then the
    model's tokenizer on the prompt, then positions). A vision tower's tokens are its prefix and patches."""
    positions = [str(i) for i in range(n)]
    if tower != "lm":
        if grid is not None and grid[2] + grid[0] * grid[1] == n:
            rows, cols, prefix = grid
            names = [f"{i}:prefix" for i in range(prefix)]
            names += [f"{prefix + i}:r{i // cols}c{i % cols}" for i in range(rows * cols)]
            return ExampleTokens(names, [], "vision tokens: prefix, then patches by row and column")
        return ExampleTokens(positions, [], "vision tokens: positions")
    if info.tokens is not None and info.token_ids is not None and len(info.tokens) == n:
        tokens, ids, note = list(info.tokens), list(info.token_ids), "tokens stored with the example"
    elif layout is not None and info.prompt is not None:
        tokens, ids = layout.tokenize(info.prompt)
        tokens, ids = _expand_image(tokens, ids, layout.image_token_id, n)
        note = "tokens from the model's tokenizer"
    else:
        why = "the store holds no tokens of it" + ("" if layout else " and the model did not load")
        return ExampleTokens(positions, [], f"tokens shown as positions ({why})")
    if len(tokens) != n:
        return ExampleTokens(
            positions, [], f"tokens shown as positions (the prompt has {len(tokens)} tokens, the store {n})"
        )
    image = layout.image_token_id if layout is not None else _image_run(ids, grid)
    image_positions = [i for i, t in enumerate(ids) if image is not None and t == image]
    return ExampleTokens([f"{i}:{t}" for i, t in enumerate(tokens)], image_positions, note)


def _expand_image(tokens: list[str], ids: list[int], image: int | None, n: int) -> tuple[list, list]:
    """A prompt's tokens with its one image token repeated as the processor expands it to n tokens."""
    if image is None or ids.count(image) != 1 or len(ids) >= n:
        return tokens, ids
    at, extra = ids.index(image), n - len(ids)
    return (
        tokens[:at] + [tokens[at]] * (extra + 1) + tokens[at + 1 :],
        ids[:at] + [image] * (extra + 1) + ids[at + 1 :],
    )


def _image_run(ids: Sequence[int], grid: tuple[int, int, int] | None) -> int | None:
    """Without the model: the id repeated rows * cols times in one run (the expanded image placeholder)."""
    if grid is None:
        return None
    want, run, start = grid[0] * grid[1], 1, 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and ids[i] == ids[i - 1]:
            run += 1
            continue
        if run == want:
            return int(ids[start])
        run, start = 1, i
    return None


def pattern_view(
    read: Callable[[list[int] | None], np.ndarray],
    n: int,
    query: int,
    tokens: ExampleTokens,
    place: GridPlace | None,
    prompt: str,
) -> PatternView:
    """The view of one head for one example of n tokens at `query` (0 <= query < n), from `read(queries)`
    -> [q, k] (None: every query). Module docstring: exact, block-averaged or one row, by length."""
    note = tokens.note
    if n <= MAX_BLOCKED_TOKENS:
        full = read(None)  # [n, n]
        row = full[query]
        block = 1 if n <= FULL_TOKENS else math.ceil(n / BLOCKS)
        rows = block_mean(full, block)
        queries = list(range(0, n, block))
        if block > 1:
            note += f"; the map averages blocks of {block} tokens ({n} tokens)"
    else:
        row = read([query])[0]
        rows, queries, block = row[None, :], [query], 1
        note += f"; {n} tokens: only query {query}'s row is shown"
    axis = tokens.labels if block == 1 else [f"{k}-{min(k + block, n) - 1}" for k in range(0, n, block)]
    grid = None
    if place is not None:
        grid = row[place.positions].reshape(place.shape)  # [rows, cols]
    elif tokens.image_positions:
        note += f"; {len(tokens.image_positions)} image tokens do not fill the tower's patch grid"
    return PatternView(rows, queries, axis, block, row, tokens.labels, query, prompt, grid, note)


def block_mean(matrix: np.ndarray, block: int) -> np.ndarray:
    """[q, k] averaged over blocks of `block` rows and columns -> [ceil(q / block), ceil(k / block)] (the
    last block of each axis may be shorter; its mean is over the tokens it holds)."""
    if block == 1:
        return matrix
    q, k = matrix.shape
    pq, pk = -q % block, -k % block
    padded = np.pad(matrix, [(0, pq), (0, pk)], constant_values=np.nan)
    blocks = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    return np.nanmean(blocks, axis=(1, 3))  # [q / block, k / block]
