"""Head-level interventions on the head outputs before o_proj: scaling, and zero / mean / resample ablation.

The head output of head h at a query is the head's softmax(QK^T)V slice, before the output projection, so
scaling or replacing it changes only that head's contribution to the layer's attention output (and
everything downstream), exactly as zeroing the matching columns of W_O's input would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from headlab.errors import InputError, SelectionError
from headlab.interventions.core import AttentionCall, Intervention, Patch
from headlab.loading import LoadedModel
from headlab.probe.outputs import record_head_outputs

Head = tuple[int, int]  # (layer, head)


def _checked_heads(lm: LoadedModel, tower: str, heads: Iterable[Head]) -> dict[int, list[int]]:
    info = lm.tower(tower)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < info.n_layers and 0 <= head < info.n_heads):
            raise SelectionError(
                f"head ({layer}, {head}) is out of range: the {tower} tower has {info.n_layers} layers x "
                f"{info.n_heads} heads"
            )
        by_layer.setdefault(layer, []).append(head)
    return by_layer


class _HeadPatch(Patch):
    def __init__(self, tower: str, by_layer: dict[int, list[int]], edit, factor: float | None = None) -> None:
        self.tower, self.by_layer, self.edit, self.factor = tower, by_layer, edit, factor

    def head_scale(self, call: AttentionCall) -> torch.Tensor | None:
        if self.factor is None:
            return None
        scale = torch.ones(1, call.n_heads, device=call.q.device)
        scale[0, self.by_layer[call.layer]] = self.factor
        return scale

    def touches(self, tower: str, layer: int) -> bool:
        return tower == self.tower and layer in self.by_layer

    def transform(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for head in self.by_layer[call.layer]:
            out[:, head] = self.edit(call, head, out[:, head])
        return out


@dataclass(frozen=True)
class HeadScale(Intervention):
    """Multiply the outputs of `heads` [(layer, head), ...] by `factor` at every query (0 = zero ablation)."""

    heads: tuple[Head, ...]
    factor: float = 0.0
    tower: str = "lm"

    def bind(self, lm: LoadedModel) -> Patch:
        return _HeadPatch(
            self.tower,
            _checked_heads(lm, self.tower, self.heads),
            lambda call, head, z: z * self.factor,
            factor=self.factor,
        )


@dataclass(frozen=True)
class HeadAblation(Intervention):
    """Ablate `heads`: "zero" (output 0), "mean" (the head's mean output, `means[(layer, head)]` [d_head],
    e.g. from `mean_head_outputs` over a reference set) or "resample" (the output the head produced on
    another input at the same example position, `source[(layer, head)]` [batch, n_tokens, d_head], e.g.
    from `head_outputs` on the corrupted prompts, aligned row by row with the intervened batch)."""

    heads: tuple[Head, ...]
    kind: str = "zero"
    means: Mapping[Head, torch.Tensor] = field(default_factory=dict)
    source: Mapping[Head, torch.Tensor] = field(default_factory=dict)
    tower: str = "lm"

    def bind(self, lm: LoadedModel) -> Patch:
        by_layer = _checked_heads(lm, self.tower, self.heads)
        if self.kind == "zero":
            return _HeadPatch(self.tower, by_layer, lambda call, head, z: torch.zeros_like(z))
        table = {"mean": self.means, "resample": self.source}.get(self.kind)
        if table is None:
            raise SelectionError(f"ablation kind must be zero, mean or resample, got {self.kind!r}")
        missing = [h for h in self.heads if h not in table]
        if missing:
            what = "means=" if self.kind == "mean" else "source="
            raise InputError(f"{self.kind} ablation needs {what} for heads {missing}")
        if self.kind == "mean":
            return _HeadPatch(
                self.tower, by_layer, lambda call, head, z: table[(call.layer, head)].to(z).expand_as(z)
            )
        return _HeadPatch(self.tower, by_layer, lambda call, head, z: _resampled(call, head, z, table))


def _resampled(call: AttentionCall, head: int, z: torch.Tensor, table) -> torch.Tensor:
    src = table[(call.layer, head)].to(z)  # [batch, n_tokens, d]
    if src.shape[0] != z.shape[0]:
        raise InputError(f"resample source has {src.shape[0]} rows but the batch has {z.shape[0]}")
    pos = call.query_pos  # [b, q]
    if int(pos.max()) >= src.shape[1]:
        raise InputError(
            f"resample source holds {src.shape[1]} positions but the input has {int(pos.max()) + 1}; "
            "use source prompts at least as long (same template)"
        )
    gathered = src[torch.arange(z.shape[0])[:, None], pos.clamp(min=0)]  # [b, q, d]
    return torch.where((pos >= 0)[..., None], gathered, z)


@torch.no_grad()
def head_outputs(lm: LoadedModel, inputs: Mapping, heads: Iterable[Head], *, tower: str = "lm"):
    """{(layer, head): [batch, n_tokens, d_head]} head outputs on `inputs`, at example positions (a source
    for resample ablation)."""
    heads = list(heads)
    _checked_heads(lm, tower, heads)
    with record_head_outputs(lm, tower=tower, layers=sorted({layer for layer, _ in heads})) as rec:
        lm.model(**inputs)
    return {(layer, head): rec.table(layer)[:, head] for layer, head in heads}


def mean_head_outputs(lm: LoadedModel, inputs: Mapping, heads: Iterable[Head], *, tower: str = "lm"):
    """{(layer, head): [d_head]} each head's output averaged over every real token of `inputs`."""
    heads = list(heads)
    valid = inputs.get("attention_mask")
    out = {}
    for key, z in head_outputs(lm, inputs, heads, tower=tower).items():
        n = z.shape[1]
        real = (
            torch.ones(z.shape[:2], dtype=torch.bool)
            if valid is None
            else (torch.arange(n)[None] < valid.sum(-1)[:, None])
        )
        out[key] = z[real].mean(0)
    return out
