"""What a capture recorded: tidy tables and the selected tensors.

`Record.head_stats` is a pandas DataFrame with one row per (example, tower, step, layer, head, stat, role):
    stat "mass"/"mass_last" (role = role name), "entropy"/"entropy_last", "distance"/"distance_rms",
    "alpha" (role = "pos:K", the received-attention score of key K). An LVLM that splits an image into
    tiles (several vision-tower rows of one example) gets the mean over the tiles for its vision tower.
Patterns, head outputs and residual ratios are kept only for what was selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from headlab.errors import SelectionError

if TYPE_CHECKING:  # figures import plotly, on first use only
    from headlab.plots import RecordPlots

_STAT_COLUMNS = ("example", "tower", "step", "layer", "head", "stat", "role", "value")


@dataclass(frozen=True)
class AttentionRows:
    """Attention rows of one head: probs[i, j] from query queries[i] to key j (example coordinates; j
    spans every token of the example so far, and keys a sliding-window KV cache evicted have 0)."""

    example: int
    tower: str
    step: int
    layer: int
    head: int
    queries: tuple[int, ...]
    probs: torch.Tensor  # [q, k]


@dataclass(frozen=True)
class HeadOutputs:
    """Per-head attention outputs before the output projection (z) at the selected query positions."""

    example: int
    tower: str
    step: int
    layer: int
    heads: tuple[int, ...]
    queries: tuple[int, ...]
    z: torch.Tensor  # [q, head, d_head]


@dataclass(frozen=True)
class ResidualRatios:
    """|x| / RMS(x) per dimension of the residual stream entering `layer`, at the selected positions."""

    example: int
    tower: str
    step: int
    layer: int
    positions: tuple[int, ...]
    ratios: torch.Tensor  # [position, d_model]


@dataclass(frozen=True)
class CompactAttention:
    """Compact attention of one example in one layer (prefill): post-RoPE q and k of the real tokens and the
    row logsumexp, from which `rows()` rebuilds any selected head's exact pattern."""

    example: int
    tower: str
    layer: int
    heads: tuple[int, ...]
    q: torch.Tensor  # [head (selected), n, d_head]
    k: torch.Tensor  # [kv_head, n, d_head]
    lse: torch.Tensor  # [head (selected), n]
    scale: float
    causal: bool
    window: int | None
    group: int  # query heads per kv head
    softcap: float | None = None  # attention logit soft-cap (Gemma 2)

    def rows(self, head: int, queries=None) -> torch.Tensor:
        """Attention rows [q, k] of `head` (all queries, or the given positions)."""
        from headlab.kernels.rebuild import rebuild_rows

        if head not in self.heads:
            raise SelectionError(
                f"head {head} was not recorded for layer {self.layer}; recorded: {list(self.heads)}"
            )
        i = self.heads.index(head)
        positions = torch.arange(self.q.shape[1]) if queries is None else torch.as_tensor(list(queries))
        return rebuild_rows(
            self.q[i, positions],
            self.k[head // self.group],
            self.lse[i, positions],
            scale=self.scale,
            query_positions=positions,
            causal=self.causal,
            window=self.window,
            softcap=self.softcap,
        )


@dataclass
class Record:
    """Everything one `capture` block recorded."""

    _stat_chunks: list[dict[str, np.ndarray]] = field(default_factory=list)
    _residual_rows: list[dict[str, np.ndarray]] = field(default_factory=list)
    _examples: list[dict] = field(default_factory=list)
    _tiled: bool = False  # a vision pass had several rows (tiles) of one example: their statistics average
    patterns: list[AttentionRows] = field(default_factory=list)
    head_outputs: list[HeadOutputs] = field(default_factory=list)
    residual_ratios: list[ResidualRatios] = field(default_factory=list)
    compact: list[CompactAttention] = field(default_factory=list)
    _probe: object = field(default=None, repr=False)

    def use_roles(self, roles) -> None:
        """Token roles (a TokenRoles per example) for the next forward pass inside the capture block."""
        self._probe.use_roles(roles)

    @property
    def plot(self) -> RecordPlots:
        """Plotly figures of this record (`headlab.plots.RecordPlots`): `rec.plot.pattern(0, layer=1)`,
        `rec.plot.heads("entropy")`. Imports plotly on first use."""
        from headlab.plots import RecordPlots

        return RecordPlots(self)

    @property
    def head_stats(self) -> pd.DataFrame:
        if not self._stat_chunks:
            return pd.DataFrame({c: [] for c in _STAT_COLUMNS})
        frame = pd.DataFrame({c: np.concatenate([ch[c] for ch in self._stat_chunks]) for c in _STAT_COLUMNS})
        frame = frame.astype({"example": int, "step": int, "layer": int, "head": int, "value": float})
        if (
            self._tiled
        ):  # the tiles of one image have equal token counts: their mean is over all their queries
            frame = frame.groupby(list(_STAT_COLUMNS[:-1]), sort=False, as_index=False)["value"].mean()
        return frame

    def gathered(self, group=None) -> Record:
        """This record joined with the same block's records on every rank of a torch.distributed `group`
        (tensor parallelism: each rank captured its own heads, under their global indices); every rank gets
        the joined record. Only the statistics travel (selected tensors are refused under tensor
        parallelism)."""
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (self._stat_chunks, self._examples, self._tiled), group=group)
        joined = Record(_examples=list(parts[0][1]), _tiled=any(p[2] for p in parts))
        joined._stat_chunks = [chunk for chunks, _, _ in parts for chunk in chunks]
        return joined

    @property
    def residuals(self) -> pd.DataFrame:
        cols = (
            "example",
            "tower",
            "step",
            "layer",
            "position",
            "norm",
            "rms",
            "max_abs",
            "max_dim",
            "median_abs",
        )
        if not self._residual_rows:
            return pd.DataFrame({c: [] for c in cols})
        return pd.DataFrame({c: np.concatenate([r[c] for r in self._residual_rows]) for c in cols})

    @property
    def examples(self) -> pd.DataFrame:
        return pd.DataFrame(self._examples, columns=["example", "tower", "n_tokens", "roles"])

    def pattern(
        self, example: int, layer: int, head: int, *, tower: str = "lm", step: int = 0
    ) -> AttentionRows:
        for rows in self.patterns:
            if (rows.example, rows.tower, rows.step, rows.layer, rows.head) == (
                example,
                tower,
                step,
                layer,
                head,
            ):
                return rows
        raise SelectionError(
            f"no pattern was recorded for example {example}, {tower} layer {layer} head {head}, step {step}; "
            "select it with capture(..., patterns=Select(...))"
        )

    def z(self, layer: int, *, tower: str = "lm", step: int = 0) -> torch.Tensor:
        """Head outputs of `layer` stacked over examples: [example, query, head, d_head]."""
        found = [h.z for h in self.head_outputs if (h.tower, h.step, h.layer) == (tower, step, layer)]
        if not found:
            raise SelectionError(f"no head outputs recorded for {tower} layer {layer} step {step}")
        return torch.stack(found)

    def _repr_html_(self) -> str:
        stats = self.head_stats
        summary = (
            f"<b>headlab Record</b>: {len(self._examples)} example-tower passes, {len(stats)} head-stat rows, "
            f"{len(self.patterns)} attention-row sets, {len(self.head_outputs)} head-output sets"
        )
        if len(stats):
            pivot = stats[stats.stat == "entropy"].pivot_table(index="layer", columns="head", values="value")
            summary += "<br>mean entropy (nats) by layer x head:" + pivot.round(3).to_html()
        return summary
