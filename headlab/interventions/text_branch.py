"""The inputs of a text-only branch: each example of a pass without its image tokens, left-padded.

VHR's selection pass (with vs without the image) and PAI's logit refinement (PAICFG) both run the prompt of
every row again without its image, beside the model's own pass. This module is the one place that builds
that batch: `example_rows` cuts each row's real tokens (and what goes with each token) out of a pass's
inputs, `drop_image_tokens` removes the image tokens, and `left_padded` puts rows back into one batch whose
last position is every row's last token.
"""

from __future__ import annotations

import torch

from headlab.inputs import TOKEN_INPUTS


def example_rows(kwargs: dict, mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each row's real tokens: input_ids and the per-token inputs (`TOKEN_INPUTS`) where `mask` [b, t] is set."""
    ids = kwargs["input_ids"]
    per_token = {k: kwargs[k] for k in TOKEN_INPUTS if kwargs.get(k) is not None}
    columns = {"input_ids": ids, **per_token}
    real = [m.bool() for m in mask]
    return [{k: v[b][real[b]] for k, v in columns.items()} for b in range(len(ids))]


def drop_image_tokens(row: dict[str, torch.Tensor], image_token_id: int) -> dict[str, torch.Tensor]:
    """`row` without its image tokens (the text-only rule: the image placeholder removed, nothing else)."""
    keep = row["input_ids"] != image_token_id
    return {k: v[keep] for k, v in row.items()}


def left_padded(rows: list[dict[str, torch.Tensor]], *, pad: int, mask_dtype) -> dict[str, torch.Tensor]:
    """One left-padded batch of rows (each: input_ids and the per-token inputs), with its attention mask and
    each row's own position ids (0 at its first real token): the last position is every row's last token."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        k: torch.full((len(rows), width), pad if k == "input_ids" else 0, dtype=v.dtype)
        for k, v in rows[0].items()
    }
    attention = torch.zeros((len(rows), width), dtype=mask_dtype)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for k, v in row.items():
            batch[k][i, width - n :] = v
        attention[i, width - n :] = 1
    batch["attention_mask"] = attention
    batch["position_ids"] = (attention.long().cumsum(-1) - 1).clamp(min=0)
    return batch
