"""What one fused attention call computes: `FusedSpec` (score side, statistics, output patches) in, and
`Attended` (output, logsumexp, statistics) out. Every backend (`kernels.fused`) takes and returns these, so
each is tested against the same reference.

Shapes: q [batch, head, q, d]; k [batch, kv_head, k, d]; v [batch, kv_head, k, d_v]; query row i sits at
key position k - q + i (bottom-right, as a decode step with a KV cache needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.errors import InputError


@dataclass(frozen=True, kw_only=True)
class Distance:
    """Attention-weighted distance moments: sum_j a_ij w_j f_ij and sum_j a_ij w_j f_ij^2.

    query_pos [batch, q] and key_pos [batch, k] (1-D: f = q_pos - k_pos, signed), or [batch, q, 2] and
    [batch, k, 2] (2-D grids: f = Euclidean distance); key_weight [batch, k] (None = 1) restricts the sums,
    e.g. to patch keys for the ViT mean attention distance.
    """

    query_pos: torch.Tensor
    key_pos: torch.Tensor
    key_weight: torch.Tensor | None = None

    @property
    def dims(self) -> int:
        return 1 if self.key_pos.dim() == 2 else self.key_pos.shape[-1]


@dataclass(frozen=True, kw_only=True)
class ScoreBoost:
    """PAI's score-dependent boost (PAINT): s_ij <- s_ij + coef_j * |s_ij| on the query rows `rows`.

    coef [batch or 1, head or 1, k] float: each key's coefficient (0 = untouched); rows [batch or 1, q] bool:
    the query rows it applies to (None: every row). Applied after scale, soft-cap and `bias`, before the
    masks (a masked key stays masked). Not an additive bias: it depends on the score itself, so the SDPA
    and Triton backends cannot apply it (`fused.pick_backend` routes such specs to "tiled" / "flex").
    """

    coef: torch.Tensor
    rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.coef.dim() != 3:
            raise InputError(
                f"ScoreBoost: coef must be [batch|1, head|1, k], got shape {tuple(self.coef.shape)}"
            )
        if self.rows is not None and (self.rows.dim() != 2 or self.rows.dtype != torch.bool):
            raise InputError("ScoreBoost: rows must be a boolean [batch|1, q] tensor (or None for every row)")


@dataclass(frozen=True, kw_only=True)
class FusedSpec:
    """One attention call. Score side, in order: scale * q.k, soft-cap, + `bias`, masks. Masks: `mask`
    (bool keep, broadcastable to [batch, head, q, k]; HF masks), `key_valid` [batch, k] (padding),
    `window` (|q_pos - k_pos| < window), `causal` (bottom-right) except between two different segments
    > 0 of `segments` = (query_seg [batch, q], key_seg [batch, k]) (PINE's bidirectional documents).
    Statistics: class masses for `key_class` [batch, 1 or head, k] (ints in [0, n_classes), -1 = none),
    class outputs (sum over the class of a_ij v_j) when `class_outputs`, entropy, distance moments.
    Output side: `head_scale` [head] or [batch, head] multiplies each head's output (VHR, head scaling).
    `boost` (`ScoreBoost`, PAINT): s <- s + coef |s| on chosen rows and keys, after the bias, before masks.
    """

    scale: float
    causal: bool = False
    mask: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    window: int | None = None
    softcap: float | None = None
    bias: torch.Tensor | None = None
    segments: tuple[torch.Tensor, torch.Tensor] | None = None
    key_class: torch.Tensor | None = None
    n_classes: int = 0
    class_outputs: bool = False
    entropy: bool = False
    distance: Distance | None = None
    head_scale: torch.Tensor | None = None
    boost: ScoreBoost | None = None

    def __post_init__(self) -> None:
        if (self.key_class is None) != (self.n_classes == 0):
            raise InputError("FusedSpec: give key_class together with n_classes >= 1 (or neither)")
        if self.class_outputs and self.key_class is None:
            raise InputError("FusedSpec: class_outputs needs key_class")
        if self.softcap is not None and self.softcap <= 0:
            raise InputError(f"FusedSpec: softcap must be positive, got {self.softcap}")
        if self.window is not None and self.window < 1:
            raise InputError(f"FusedSpec: window must be >= 1, got {self.window}")
        if self.head_scale is not None and self.head_scale.dim() not in (1, 2):
            raise InputError("FusedSpec: head_scale must be [head] or [batch, head]")
        if self.mask is not None and self.mask.dtype != torch.bool:
            raise InputError(
                "FusedSpec: mask must be boolean (True = may attend); put additive masks in bias"
            )

    def scale_output(self, out: torch.Tensor) -> torch.Tensor:
        """out [batch, head, q, d_v] times head_scale (the torch backends' epilogue)."""
        if self.head_scale is None:
            return out
        scale = self.head_scale.to(out)
        return out * (scale[None] if scale.dim() == 1 else scale)[..., None, None]


@dataclass(frozen=True)
class Attended:
    """What a fused call returns; statistics are float32 and None where not asked for."""

    out: torch.Tensor  # [batch, head, q, d_v], in v's dtype (float32 from the reference)
    lse: torch.Tensor  # [batch, head, q] float32; -inf for a row that sees no key
    class_mass: torch.Tensor | None = None  # [batch, head, q, class]
    class_out: torch.Tensor | None = None  # [batch, head, q, class, d_v]
    entropy: torch.Tensor | None = None  # [batch, head, q]; 0 for a row that sees no key
    distance: torch.Tensor | None = None  # [batch, head, q, 2]: sum a w f and sum a w f^2


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise InputError naming the bad sizes (the kernels assume these)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"q, k, v must be [batch, head, tokens, dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise InputError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if q.shape[1] % k.shape[1]:
        raise InputError(f"{q.shape[1]} query heads cannot share {k.shape[1]} key/value heads evenly")
