"""Writing one Record into a shard: its tables (with store example ids and the condition) and its arrays.

`ids` maps the record's example index to the store id (int or str, checked by the store): the `example`
column of every table is int64 for integer ids and string for string ids. Arrays are ragged along a row
axis and located through index tables (see store.py's layout):
head outputs per (tower, step, layer), compact attention packed per (tower, layer) so that one read rebuilds a
pattern, and selected attention rows (dense, or top-k with their key indices).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from headlab.store.shard import ShardWriter

if TYPE_CHECKING:  # the store keeps what a capture recorded; it never runs the probe
    from headlab.probe.record import Record


def write_tables(writer: ShardWriter, rec: Record, ids: dict, meta_of: dict, condition: str) -> None:
    """The examples, head_stats and residuals tables of one record, with store example ids and condition."""
    ex = rec.examples
    ex = ex.assign(
        example=ex.example.map(ids),
        condition=condition,
        meta=[json.dumps(meta_of.get(e, {}), default=str) for e in rec.examples.example],
    )
    writer.table("examples", ex)
    for name, frame in (("head_stats", rec.head_stats), ("residuals", rec.residuals)):
        if len(frame):
            writer.table(name, frame.assign(example=frame.example.map(ids), condition=condition))


def write_arrays(
    writer: ShardWriter, rec: Record, ids: dict, condition: str, top_k: int | None = None
) -> None:
    """Head outputs, compact attention and selected rows as ragged Zarr arrays plus their index tables."""
    _write_head_outputs(writer, rec, ids, condition)
    _write_compact(writer, rec, ids, condition)
    _write_rows(writer, rec, ids, condition, top_k)


def _write_head_outputs(writer: ShardWriter, rec: Record, ids: dict, condition: str) -> None:
    groups: dict[tuple, list] = {}
    for h in rec.head_outputs:
        groups.setdefault((h.tower, h.step, h.layer), []).append(h)
    index = []
    for (tower, step, layer), items in groups.items():
        rows = np.concatenate([h.z.numpy() for h in items])  # [rows, head, d_head]
        writer.array(f"z/{tower}/s{step}/L{layer}", rows.astype(np.float32))
        row = 0
        for h in items:
            for p in h.queries:
                index.append((ids[h.example], condition, tower, step, layer, p, row, list(h.heads)))
                row += 1
    writer.table(
        "z_index",
        pd.DataFrame(
            index, columns=["example", "condition", "tower", "step", "layer", "position", "row", "heads"]
        ),
    )


def _pack_qk(c) -> np.ndarray:
    """[token, head + kv_head, d_head + 1]: q with the row logsumexp in the last column, then k (last column 0).

    One array per layer, so that one read (q and lse of head h, k of its kv head) rebuilds a pattern."""
    n, d = c.q.shape[1], c.q.shape[2]
    q = torch.cat([c.q, c.lse[..., None]], -1)  # [head, n, d + 1]
    k = torch.cat([c.k, torch.zeros(c.k.shape[0], n, 1)], -1)  # [kv_head, n, d + 1]
    return torch.cat([q, k]).permute(1, 0, 2).numpy().reshape(n, -1, d + 1)


def _write_compact(writer: ShardWriter, rec: Record, ids: dict, condition: str) -> None:
    by_layer: dict[tuple, list] = {}
    for c in rec.compact:
        by_layer.setdefault((c.tower, c.layer), []).append(c)
    index = []
    for (tower, layer), items in by_layer.items():
        start = 0
        for c in items:
            n = c.q.shape[1]
            index.append(
                (
                    ids[c.example],
                    condition,
                    tower,
                    layer,
                    start,
                    start + n,
                    c.scale,
                    c.causal,
                    -1 if c.window is None else c.window,
                    c.group,
                    list(c.heads),
                    float("nan") if c.softcap is None else c.softcap,
                )
            )
            start += n
        writer.array(f"attn/{tower}/L{layer}", np.concatenate([_pack_qk(c) for c in items]))
    writer.table(
        "attn_index",
        pd.DataFrame(
            index,
            columns=[
                "example",
                "condition",
                "tower",
                "layer",
                "start",
                "stop",
                "scale",
                "causal",
                "window",
                "group",
                "heads",
                "softcap",
            ],
        ),
    )


def _write_rows(writer: ShardWriter, rec: Record, ids: dict, condition: str, top_k: int | None) -> None:
    """Selected attention rows: dense, or (top_k) the k largest entries of each row with their key indices."""
    index, values, keys, start = [], [], [], 0
    for r in rec.patterns:
        for i, qpos in enumerate(r.queries):
            row = r.probs[i].numpy().astype(np.float32)
            n_keys = len(row)
            if top_k is not None:
                kept = np.sort(np.argsort(-row, kind="stable")[: min(top_k, n_keys)]).astype(np.int32)
                keys.append(kept)
                row = row[kept]
            index.append(
                (ids[r.example], condition, r.tower, r.step, r.layer, r.head, qpos, start, len(row), n_keys)
            )
            values.append(row)
            start += len(row)
    if values:
        writer.array("rows/values", np.concatenate(values), row_chunk=1 << 16)
    if keys:
        writer.array("rows/keys", np.concatenate(keys), row_chunk=1 << 16)
    writer.table(
        "rows_index",
        pd.DataFrame(
            index,
            columns=[
                "example",
                "condition",
                "tower",
                "step",
                "layer",
                "head",
                "query",
                "start",
                "length",
                "n_keys",
            ],
        ),
    )
