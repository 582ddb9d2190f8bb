"""Which tokens the keys of an attention call are, for every KV cache transformers uses.

Token columns. A forward pass of the language model over `past` cached tokens and `n_new` new ones has
`past + n_new` token columns: the columns of the 2-D attention mask `generate()` keeps, padding included
(column c is cache position c). What a layer's cache hands the attention function (transformers 5,
`cache_utils.py`; W = the layer's sliding window):

- no cache, `DynamicLayer` (full-attention layers): every column, 0 .. past + n_new - 1;
- `DynamicSlidingWindowLayer` (Mistral; the sliding layers of Gemma 2 and Gemma 3): the last W - 1 cached
  columns and the new ones, so once past >= W the oldest columns are gone (evicted): the keys are the LAST
  n_k columns;
- `StaticLayer` (`cache_implementation="static"`): max_cache_len slots, slot j = column j; slots beyond
  the filled ones hold zeros (or stale keys after a crop);
- `StaticSlidingWindowLayer`: W slots, slot j = column j until they are full (unfilled slots as above);
  once full (rolled) the last W columns; an update that crosses the boundary hands over every column.

So the keys are either the last n_k columns (n_k <= columns) or all the columns followed by unfilled slots
(n_k > columns). `call_keys` brings every call into the first form by dropping the unfilled slots and their
mask columns. Transformers never lets a query see an unfilled slot: its mask hides them, and a skipped
(None) mask means SDPA's top-left `is_causal` (a static-cache prefill), under which query i sees slots
0..i only; eager attention builds that mask explicitly. After `call_keys`, the keys of a call are the
last n_k token columns, its queries the last n_q keys (bottom-right, as headlab's kernels assume), and
`key_start = columns - n_k` columns were evicted before the first key. Which of the remaining keys a query
sees is the mask's business (padding, causality, the window); headlab never re-derives it from slot counts.

`token_validity` reads which columns are real tokens from the forward's `attention_mask`, which
`generate()` hands over as a 2-D padding mask, or, for a static cache, as the 4-D mask (or a dict of them
per layer type, for hybrid models) it has already built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from headlab.compat import past_length
from headlab.errors import InputError
from headlab.probe.call import keep_mask


def new_tokens(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The input_ids (or inputs_embeds) [batch, n_new, ...] of a model forward, or None."""
    ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
    return ids if ids is not None else kwargs.get("inputs_embeds")


def pass_columns(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """Token columns (cached + new tokens) of a language-model forward; None without ids or embeddings."""
    tokens = new_tokens(args, kwargs)
    return None if tokens is None else past_length(kwargs) + tokens.shape[1]


def call_keys(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, columns: int | None, n_q: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(k, v, mask, key_start) of an attention call with k, v [batch, kv_head, n_k, d] over `columns` token
    columns: unfilled static-cache slots (keys beyond `columns`) dropped, so that the keys are the last
    n_k' columns; key_start = columns - n_k' evicted columns (0 unless a sliding-window cache evicted)."""
    n_k = k.shape[2]
    if columns is None or n_k == columns:
        return k, v, mask, 0
    if columns < n_q:
        raise InputError(f"an attention call has {n_q} queries but its pass only {columns} token columns")
    if n_k < columns:
        return k, v, mask, columns - n_k
    if mask is not None and mask.shape[-1] == n_k:
        mask = mask[..., :columns]
    return k[:, :, :columns], v[:, :, :columns], mask, 0


def token_validity(
    attention_mask: Any, *, batch: int, past: int, n_new: int, previous: torch.Tensor | None
) -> torch.Tensor:
    """[batch, past + n_new] bool: which token columns of a forward are real tokens (not padding).

    attention_mask: what the forward got. A 2-D mask is the answer. Otherwise (None, a 4-D mask
    [batch|1, 1, q, k], boolean or additive, or a dict of them per layer type, None where transformers
    skipped one): in a decode step, the `previous` pass's columns followed by the new tokens (real, as
    generate() appends them); in a prefill, column i is real iff query i may attend to itself (a padding
    column is hidden from every query), and every column without a mask."""
    mask = _one_mask(attention_mask)
    if mask is not None and mask.dim() == 2:
        return mask.bool().cpu()
    if past:
        if previous is None or previous.shape[1] < past:
            raise InputError(
                f"a decode step over {past} cached tokens came without a 2-D attention mask and headlab saw "
                "no prefill of them; run the whole generate() inside the block"
            )
        return torch.cat([previous[:, :past], torch.ones(batch, n_new, dtype=torch.bool)], 1)
    if mask is None:
        return torch.ones(batch, n_new, dtype=torch.bool)
    keep = keep_mask(mask)[:, 0, :n_new, :n_new]  # [batch|1, q, q]
    return keep.diagonal(dim1=-2, dim2=-1).expand(batch, n_new).cpu()


def _one_mask(attention_mask: Any) -> torch.Tensor | None:
    """The forward's attention mask as one tensor (2-D or 4-D); of a dict per layer type, the full-attention
    one if built, else any built one; None if none was built."""
    if isinstance(attention_mask, Mapping):
        built = {name: m for name, m in attention_mask.items() if m is not None}
        attention_mask = built.get("full_attention", next(iter(built.values()), None))
    if attention_mask is not None and (
        not torch.is_tensor(attention_mask) or attention_mask.dim() not in (2, 4)
    ):
        raise InputError(
            f"cannot read padding from an attention_mask of type {type(attention_mask).__name__}; pass a 2-D "
            "[batch, tokens] mask (or a 4-D boolean/additive one)"
        )
    return attention_mask
