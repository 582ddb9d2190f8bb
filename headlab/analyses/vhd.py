"""VHD: vision-aware head divergence per head, and token-level T-VHD (He et al., ACL 2025), from a store.

For each example captured under two conditions, with the image (`with_condition`, default "with_image") and
with the image placeholder removed from the prompt, so no image tokens at all (`without_condition`, default
"no_image"; the names are `headlab.conditions.WITH_IMAGE` / `NO_IMAGE`), and each layer:
VHD_{l,h} = || A_{l,h}(with image) - A_{l,h}(without) ||_2, where A is the head's output before o_proj at the
last position (the position predicting the next token), and TA_{l,h} = || A_{l,h}(without) ||^2 (VHR's
outlier rule uses it). `vhr_selected` marks the heads VHR would reinforce for that example (outlier rule,
strictly above the layer's median), computed here WITHOUT the layer-by-layer reinforcement (a diagnostic,
not the intervention; `headlab.interventions.VHR` does the real thing).

T-VHD of an example = sum over layers of the sum of the k largest VHDs in that layer (Eq. 5); the paper does
not state k: headlab's default is half the heads (the size of VHR's selection), `top_k` changes it.

A store gets what this needs (head outputs at the last position of every language-model layer, under both
conditions) from `headlab capture --condition with_image,no_image` on a prompt file with images, or from
`capture_vhd_conditions`, its Python API for prompts and images in memory. Both store the same: per-head
statistics of every tower, compact attention, head outputs, and the tokens, image and label of each example
under each condition (`runs.batch.capture_to_store`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab.analyses.registry import Analysis, Option, StoreValues
from headlab.conditions import NO_IMAGE, WITH_IMAGE, Condition
from headlab.errors import InputError, SelectionError, StoreError
from headlab.interventions.vhr import select_heads
from headlab.loading import Family, LoadedModel
from headlab.store import Store


def vhd_per_example(
    store: Store, *, with_condition: str = WITH_IMAGE, without_condition: str = NO_IMAGE
) -> pd.DataFrame:
    """Tidy (example, layer, head, vhd, ta, vhr_selected) for every example stored under both conditions."""
    frames = []
    layer = 0
    while True:  # every layer with stored head outputs
        try:
            idx_w, z_w = store.head_outputs(layer, condition=with_condition, position="last")
            idx_o, z_o = store.head_outputs(layer, condition=without_condition, position="last")
        except SelectionError:
            break  # past the last layer with stored head outputs (or a condition that is not stored)
        except StoreError:
            raise StoreError(
                "VHD needs head outputs at the last position under both conditions; fill the store with "
                f"`headlab capture --condition {WITH_IMAGE},{NO_IMAGE}` (or "
                "headlab.analyses.vhd.capture_vhd_conditions(lm, store, prompts, images))"
            ) from None
        if not len(idx_w) or not len(idx_o):
            break
        both = sorted(set(idx_w.example) & set(idx_o.example))
        row_w = {e: i for i, e in enumerate(idx_w.example)}
        row_o = {e: i for i, e in enumerate(idx_o.example)}
        a = torch.from_numpy(z_w[[row_w[e] for e in both]]).float()  # [examples, heads, d]
        b = torch.from_numpy(z_o[[row_o[e] for e in both]]).float()
        vhd = (a - b).norm(dim=-1)  # [examples, heads]
        ta = b.pow(2).sum(-1)
        chosen = select_heads(vhd, ta)
        heads = vhd.shape[1]
        frames.append(
            pd.DataFrame(
                {
                    "example": np.repeat(both, heads),
                    "layer": layer,
                    "head": np.tile(np.arange(heads), len(both)),
                    "vhd": vhd.flatten().numpy(),
                    "ta": ta.flatten().numpy(),
                    "vhr_selected": chosen.flatten().numpy(),
                }
            )
        )
        layer += 1
    if not frames:
        raise StoreError(
            f"no head outputs under both {with_condition!r} and {without_condition!r}; stored conditions: "
            f"{store.conditions()}"
        )
    return pd.concat(frames, ignore_index=True)


def vhd_per_head(store: Store, **conditions) -> pd.DataFrame:
    """(layer, head, vhd, vhd_std, ta, selected_share, n): VHD averaged over the examples."""
    frame = vhd_per_example(store, **conditions)
    grouped = frame.groupby(["layer", "head"])
    return pd.DataFrame(
        {
            "vhd": grouped.vhd.mean(),
            "vhd_std": grouped.vhd.std(ddof=0),
            "ta": grouped.ta.mean(),
            "selected_share": grouped.vhr_selected.mean(),
            "n": grouped.size(),
        }
    ).reset_index()


def token_vhd(store: Store, *, top_k: int | None = None, **conditions) -> pd.DataFrame:
    """(example, t_vhd): sum over layers of the top-k VHDs of each layer (k default: half the heads)."""
    frame = vhd_per_example(store, **conditions)
    k = top_k or max(1, frame["head"].nunique() // 2)
    top = frame.sort_values("vhd", ascending=False).groupby(["example", "layer"]).head(k)
    return top.groupby("example").vhd.sum().rename("t_vhd").reset_index()


def capture_vhd_conditions(
    lm: LoadedModel,
    store: Store,
    prompts: Sequence[str],
    images: Sequence,
    *,
    examples: Sequence[int | str] | None = None,
    with_condition: str = WITH_IMAGE,
    without_condition: str = NO_IMAGE,
    attention_layers: Sequence[int] | None = None,
    batch_size: int = 8,
) -> None:
    """Capture each (prompt, image) with the image and text-only (`inputs.text_only_prompt`) into `store`
    under the two conditions: the Python API of `headlab capture --condition with_image,no_image`, storing
    the same (module docstring). images: PIL images or paths; examples: their ids (default 0, 1, ...);
    attention_layers: language-model and vision layers whose compact attention is kept (None = all, () =
    none). Resumable: pairs already committed are skipped. Raises InputError listing the pairs that failed
    (the others are stored), and KeyboardInterrupt when interrupted (committed batches stay)."""
    from headlab.datasets.prompts import PromptItem
    from headlab.runs.batch import capture_to_store

    if lm.family is not Family.LVLM:
        raise InputError("VHD compares a vision-language model with and without its image")
    if len(prompts) != len(images):
        raise InputError(f"got {len(prompts)} prompts but {len(images)} images")
    ids = list(examples) if examples is not None else list(range(len(prompts)))
    items = [
        PromptItem(
            ident,
            prompt,
            image,
            {"prompt": prompt},
            i + 1,
            f"item {i}",
            image_name=str(image) if isinstance(image, str | Path) else None,
        )
        for i, (ident, prompt, image) in enumerate(zip(ids, prompts, images, strict=True))
    ]
    conditions = (
        Condition(name=with_condition, image=True, intervention=None),
        Condition(name=without_condition, image=False, intervention=None),
    )
    report = capture_to_store(
        lm,
        store,
        items,
        conditions=conditions,
        batch_size=batch_size,
        attention_layers=attention_layers,
        progress=False,
    )
    if report.interrupted:
        raise KeyboardInterrupt
    if report.failed:
        raise InputError(f"{len(report.failed)} captures failed: {'; '.join(report.failed)}")


def _run_vhd(store: Store, options: dict) -> pd.DataFrame:
    return vhd_per_head(
        store, with_condition=options["with_condition"], without_condition=options["without_condition"]
    )


ANALYSES = {
    "vhd": Analysis(
        name="vhd",
        description="vision-aware head divergence per head (with vs without image, head outputs at the last position)",
        run=_run_vhd,
        options={
            "with_condition": Option(
                type=str,
                default=WITH_IMAGE,
                among=StoreValues.CONDITIONS,
                help="condition holding the with-image captures",
            ),
            "without_condition": Option(
                type=str,
                default=NO_IMAGE,
                among=StoreValues.CONDITIONS,
                help="condition holding the text-only captures",
            ),
        },
    )
}
