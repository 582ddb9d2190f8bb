"""ViT partial pruning (Li et al. 2023, lvlm.md 6.2): one head loses only its local or only its global
patch attention, and the score drop says which part of the head matters.

The paper's exact rule is unpublished, so this is the recommended faithful-in-spirit version. For one head,
patch queries lose either their LOCAL keys (patches within Euclidean distance `radius` on the patch grid, the
query's own patch included) or their GLOBAL keys (patches beyond `radius`). The CLS-like prefix tokens are
exempt, as queries and as keys: only patch -> patch attention is partitioned. renormalize=True (default): the
removed keys get score -inf, i.e. the kept keys share the row (p_j / (1 - m_removed)); a row with nothing left
outputs 0. renormalize=False: the removed probabilities are zeroed and the row keeps only its kept mass. The
key sets depend on the query, so this is a score mask (a `Patch.replace`), not a `GroupEdit` (whose groups are
per key). The fused path runs one masked fused attention (plus the plain one's logsumexp for
renormalize=False); `PartialPruning(reference=True)` edits explicit patterns instead (the oracle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from headlab.analyses.importance import VIT_TASK, TaskData, _all_heads, _drops, _evaluate, task_data
from headlab.analyses.registry import Analysis, Option, store_model
from headlab.errors import SelectionError, UnsupportedModelError
from headlab.interventions.core import AttentionCall, Intervention, Patch
from headlab.interventions.heads import Head, HeadAblation
from headlab.kernels.augmented import attention_with_lse
from headlab.kernels.reference import expand_kv
from headlab.loading import LoadedModel
from headlab.store import Store

PARTS = ("local", "global")


def grid_removal(lm: LoadedModel, n_tokens: int, part: str, radius: float, *, tower: str = "vision"):
    """[q, k] bool: the patch -> patch attention entries that pruning `part` removes (Euclidean distance
    on the patch grid <= radius is local; prefix tokens are never removed, as queries or keys)."""
    if part not in PARTS:
        raise SelectionError(f"part must be one of {PARTS}, got {part!r}")
    info = lm.tower(tower)
    if info.grid is None:
        raise UnsupportedModelError(f"the {tower} tower of {lm.model_type} has no patch grid")
    rows, cols = info.grid
    if n_tokens != info.prefix_tokens + rows * cols:
        raise SelectionError(
            f"the attention call has {n_tokens} tokens, not {info.prefix_tokens} + {rows} x {cols} patches; "
            "partial pruning needs inputs at the model's native image size"
        )
    patch = torch.arange(rows * cols)
    where = torch.stack([patch // cols, patch % cols], -1).float()  # [patches, 2] (row, col)
    local = torch.cdist(where, where) <= radius  # [patches, patches]
    removed = torch.zeros(n_tokens, n_tokens, dtype=torch.bool)
    removed[info.prefix_tokens :, info.prefix_tokens :] = local if part == "local" else ~local
    return removed


class _PartialPatch(Patch):
    def __init__(self, spec: PartialPruning, removed: Callable[[int], torch.Tensor], prefix: int) -> None:
        self.spec, self.removed, self.tower, self.prefix = spec, removed, spec.tower, prefix
        self.removed_mass: list[torch.Tensor] = []  # per call: [b] mean removed mass over patch queries

    def touches(self, tower: str, layer: int) -> bool:
        return tower == self.tower and layer == self.spec.layer

    def replace(self, call: AttentionCall) -> torch.Tensor:
        if call.causal or call.n_q != call.k.shape[2]:
            raise UnsupportedModelError("partial pruning edits full (non-causal, uncached) vision attention")
        removed = self.removed(call.n_q).to(call.q.device)  # [q, k]
        return self._reference(call, removed) if self.spec.reference else self._fused(call, removed)

    def _note(self, call: AttentionCall, mass: torch.Tensor) -> None:
        self.removed_mass.append(mass[:, self.prefix :].mean(-1).detach().cpu())  # over patch queries

    def _fused(self, call: AttentionCall, removed: torch.Tensor) -> torch.Tensor:
        h = self.spec.head
        plain, plain_lse = call.plain  # [b, H, q, d], [b, H, q]
        keep = ~removed[None, None]  # [1, 1, q, k]
        if call.mask is not None:
            keep = (
                keep & call.mask.bool()[:, h : h + 1] if call.mask.shape[1] > 1 else keep & call.mask.bool()
            )
        empty = ~keep.any(-1)  # rows with nothing kept
        q = call.q[:, h : h + 1].float()
        k = expand_kv(call.k, call.n_heads)[:, h : h + 1].float()
        v = expand_kv(call.v, call.n_heads)[:, h : h + 1].float()
        out, lse = attention_with_lse(q, k, v, mask=keep | empty[..., None], scale=call.scale, causal=False)
        kept = torch.where(empty, 0.0, torch.exp(lse - plain_lse[:, h : h + 1].float()))  # [b, 1, q]
        out = torch.where(empty[..., None], 0.0, out)
        if not self.spec.renormalize:
            out = out * kept[..., None]
        self._note(call, 1 - kept[:, 0])
        result = plain.clone()
        result[:, h] = out[:, 0]
        return result

    def _reference(self, call: AttentionCall, removed: torch.Tensor) -> torch.Tensor:
        probs = call.probs().float().clone()  # [b, H, q, k], explicit
        h = self.spec.head
        row = probs[:, h]
        edited = row.masked_fill(removed, 0.0)
        self._note(call, 1 - edited.sum(-1))
        if self.spec.renormalize:
            total = edited.sum(-1, keepdim=True)
            edited = torch.where(total > 0, edited / total.clamp(min=1e-30), 0.0)
        probs[:, h] = edited
        return probs @ expand_kv(call.v, call.n_heads).float()


@dataclass(frozen=True)
class PartialPruning(Intervention):
    """Remove only the local or only the global patch -> patch attention of head (`layer`, `head`) of a
    ViT tower (module docstring, part 3). `reference=True` edits explicit [q, k] patterns (the oracle)."""

    layer: int
    head: int
    part: str = "local"
    radius: float = 2.0
    renormalize: bool = True
    reference: bool = False
    tower: str = "vision"

    def bind(self, lm: LoadedModel) -> Patch:
        info = lm.tower(self.tower)
        if not (0 <= self.layer < info.n_layers and 0 <= self.head < info.n_heads):
            raise SelectionError(
                f"head ({self.layer}, {self.head}) is out of range: the {self.tower} tower has "
                f"{info.n_layers} layers x {info.n_heads} heads"
            )
        if not (self.radius >= 0 and math.isfinite(self.radius)):
            raise SelectionError(f"radius must be a finite distance >= 0 in patches, got {self.radius}")
        grid_removal(lm, info.prefix_tokens + math.prod(info.grid or (0, 0)), self.part, self.radius)
        cache: dict[int, torch.Tensor] = {}

        def removed(n: int) -> torch.Tensor:
            if n not in cache:
                cache[n] = grid_removal(lm, n, self.part, self.radius, tower=self.tower)
            return cache[n]

        return _PartialPatch(self, removed, info.prefix_tokens)


def partial_pruning(
    lm: LoadedModel,
    data: TaskData,
    *,
    radius: float = 2.0,
    renormalize: bool = True,
    heads: Sequence[Head] | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Per head and part ("local", "global", and "head" = the whole head zero-ablated for comparison):
    accuracy, confidence, loss, logit_shift, their drops, and removed_mass (the mean attention mass of the patch
    queries that the part carried in the unedited head; 1 for "head")."""
    if data.tower != "vision":
        raise UnsupportedModelError("partial pruning needs a ViT tower (a patch grid)")
    heads = list(heads) if heads is not None else _all_heads(lm, data.tower)
    clean = _evaluate(lm, data, batch_size)
    rows = []
    for layer, head in heads:
        for part in (*PARTS, "head"):
            masses: list[torch.Tensor] = []

            def make(chunk, layer=layer, head=head, part=part, masses=masses):
                if part == "head":
                    return (HeadAblation(((layer, head),), "zero", tower=chunk.tower),)
                spec = PartialPruning(layer, head, part, radius, renormalize, tower=chunk.tower)
                return (_Recording(spec, masses),)

            ablated = _evaluate(lm, data, batch_size, make, clean)
            mass = float(torch.cat(masses).mean()) if masses else 1.0
            rows.append(
                {
                    **{"tower": data.tower, "layer": layer, "head": head, "part": part, "radius": radius},
                    **_drops(clean, ablated),
                    "removed_mass": mass,
                }
            )
    return pd.DataFrame(rows)


@dataclass(frozen=True, eq=False)
class _Recording(Intervention):
    """A PartialPruning whose patch appends its removed masses to `masses`."""

    spec: PartialPruning
    masses: list = field(default_factory=list)

    def bind(self, lm: LoadedModel) -> Patch:
        patch = self.spec.bind(lm)
        patch.removed_mass = self.masses
        return patch


def _run_partial(store: Store, options: dict) -> pd.DataFrame:
    lm = store_model(store)
    data = task_data(lm, VIT_TASK, n=options["n"], seed=options["seed"])
    return partial_pruning(
        lm,
        data,
        radius=options["radius"],
        renormalize=options["renormalize"],
        batch_size=options["batch_size"],
    )


ANALYSES: dict[str, Analysis] = {
    "vit-partial-pruning": Analysis(
        name="vit-partial-pruning",
        description="ViT heads with only their local or only their global patch attention removed (Li et al. 2023)",
        run=_run_partial,
        options={
            "n": Option(type=int, default=128, ge=1, help="number of scene images"),
            "seed": Option(type=int, default=0, ge=0, help="seed of the scenes"),
            "batch_size": Option(type=int, default=64, ge=1, help="images per forward pass"),
            "radius": Option(
                type=float,
                default=2.0,
                ge=0,
                help="local = patches within this Euclidean distance on the grid (in patches; 0: the patch itself)",
            ),
            "renormalize": Option(
                type=bool,
                default=True,
                help="kept keys share the removed mass (else the removed mass is dropped)",
            ),
        },
    ),
}
