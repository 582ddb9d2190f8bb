"""Reading one head's attention for one example back from a shard: rebuilt exactly from compact attention,
or read from the selected rows a capture kept (dense, or top-k with their key indices).

Both read only that example's rows of that head, through the catalog's verified reads (catalog.py); the
layouts are store.py's (attn_index / rows_index and the arrays they point into).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from headlab.errors import SelectionError, StoreError
from headlab.kernels.rebuild import rebuild_rows
from headlab.store.catalog import Catalog
from headlab.store.selection import positions, span


def compact_rows(
    catalog: Catalog, row, example, tower: str, layer: int, head: int, queries: Sequence[int] | None
) -> np.ndarray:
    """The exact rows [q, k] of `head` rebuilt from the compact attention that the attn_index `row` locates
    (queries: positions, negative from the end; None: every query)."""
    heads = [int(h) for h in row.heads]
    if head not in heads:
        raise SelectionError(f"head {head} of {tower} layer {layer} was not stored; stored heads: {heads}")
    start, stop, h = int(row.start), int(row.stop), heads.index(head)
    n = stop - start
    at = torch.tensor(positions(queries, n, example))
    both = catalog.read(
        row.shard,
        f"attn/{tower}/L{layer}",
        (slice(start, stop), [h, len(heads) + head // int(row.group)]),
    )  # [token, 2 (q | lse, k | 0), d_head + 1]
    q, lse, k = (torch.from_numpy(x) for x in (both[:, 0, :-1], both[:, 0, -1], both[:, 1, :-1]))
    window = None if int(row.window) < 0 else int(row.window)
    softcap = float(getattr(row, "softcap", float("nan")))  # stores from before soft-cap support lack it
    return rebuild_rows(
        q[at],
        k,
        lse[at],
        scale=float(row.scale),
        query_positions=at,
        causal=bool(row.causal),
        window=window,
        softcap=None if np.isnan(softcap) else softcap,
    ).numpy()


def stored_rows(
    catalog: Catalog, idx: pd.DataFrame, where: dict, queries: Sequence[int] | None, held: Callable[[], str]
) -> np.ndarray:
    """The selected rows [q, k] of one head that rows_index `idx` locates for `where` (example, condition,
    tower, layer, head; prefill step); a StoreError naming what is stored (`held()`) when there are none."""
    example = where["example"]
    hit = idx
    if len(idx):
        mask = idx.step == 0
        for column, value in where.items():
            mask &= idx[column] == value
        hit = idx[mask]
    if not len(hit):
        raise StoreError(
            f"no attention stored for example {example!r} ({where['condition']}), {where['tower']} layer "
            f"{where['layer']} head {where['head']}; stored for this example: {held()}; capture it with "
            "compact=Select(...) or patterns=Select(...)"
        )
    n_keys = int(hit.n_keys.iloc[0])
    if queries is not None:
        wanted = [q % n_keys for q in positions(queries, n_keys, example)]
        hit = hit[hit["query"].isin(wanted)]
        if len(hit) < len(set(wanted)):
            raise SelectionError(f"queries {list(queries)} are not all stored rows of this head")
    shard = hit.shard.iloc[0]
    sparse = "arrays.zarr/rows/keys/zarr.json" in catalog.meta(shard).files
    rows = np.zeros((len(hit), n_keys), dtype=np.float32)
    for i, r in enumerate(hit.itertuples()):
        part = (slice(int(r.start), int(r.start) + int(r.length)),)
        values = catalog.read(shard, "rows/values", part)
        if sparse:
            rows[i, catalog.read(shard, "rows/keys", part)] = values
        else:
            rows[i] = values
    return rows


def attention_held(attn_index: pd.DataFrame, rows_index: pd.DataFrame, example, condition: str) -> str:
    """What attention is stored for one example under `condition`, for messages."""
    held = []
    for idx, what in ((attn_index, "compact attention"), (rows_index, "rows")):
        mine = idx[(idx.example == example) & (idx.condition == condition)] if len(idx) else idx
        for tower, group in mine.groupby("tower") if len(mine) else ():
            held.append(f"{what} of {tower} layers {span(group.layer.unique())}")
    return "; ".join(held) or "none"
