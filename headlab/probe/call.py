"""One attention call, described once: what every handler of the session (captures, interventions) sees.

The session builds an `AttentionCall` from the arguments transformers hands the attention function: post-
RoPE q [b, h, q, d] and k, v [b, kv, k, d] (GQA: kv heads are shared by h // kv query heads), the mask as
booleans (True = may attend; transformers' mask is the truth: headlab never re-applies causality over it,
`is_causal_call`), the scale, whether the call is causal, a score bias the mask carries (BEiT's relative
position bias), the soft-cap and the sliding window. The keys are the last n_k token columns of the pass
and the queries the last n_q keys (the session drops a static cache's unfilled slots first; a
sliding-window cache may have evicted `key_start` columns before the first key: see headlab.probe.keys). Each block then sees the call with its own batch context (`with_context`): which
examples the rows are, their token roles and each key's example position.

Explicit scores and rows come from the one rebuild primitive (`headlab.kernels.rebuild`); the unedited
output and logsumexp come from one fused call (`plain`, computed at most once per call and context).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from headlab.kernels.fused import fused_attention
from headlab.kernels.rebuild import attention_scores
from headlab.kernels.reference import naive_attention
from headlab.kernels.spec import FusedSpec
from headlab.probe.context import BatchContext


def keep_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean view (True = may attend) of a transformers attention mask (boolean or additive: a key is
    kept where the additive mask is finite, above half the dtype's minimum)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def score_bias(mask: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """The score bias an additive mask carries besides keep / drop (BEiT's relative position bias: finite
    values other than 0), float32 and 0 where a key is dropped; None for a mask that carries none."""
    if mask is None or mask.dtype == torch.bool:
        return None
    bias = torch.where(keep, mask.float(), 0.0)
    return bias if bool(bias.ne(0).any()) else None


def is_causal_call(flag: bool | None, module: nn.Module, keep: torch.Tensor | None, n_q: int) -> bool:
    """Whether a call is causal: the caller's `is_causal`, else the module's; but a given mask is the truth,
    as it is for transformers' eager and SDPA attention (SDPA's `is_causal` only stands in for a missing
    mask). So a mask that lets some query see a key after it (PaliGemma's prefix, Gemma 3's image tokens
    attending both ways) makes the call non-causal; the mask then says everything."""
    causal = bool(flag if flag is not None else getattr(module, "is_causal", True))
    if not causal or keep is None or n_q == 1:
        return causal
    for seen, answer in _MASKS_SEEN:  # every layer of a pass gets the same mask (or one per window type)
        if seen() is keep:
            return answer
    n_k = keep.shape[-1]
    later = torch.ones(n_q, n_k, dtype=torch.bool, device=keep.device).triu(n_k - n_q + 1)
    answer = not bool((keep[..., -n_q:, :] & later).any())
    _MASKS_SEEN.append((weakref.ref(keep), answer))
    return answer


# the last masks is_causal_call read (weakly: a long context's mask is not kept alive past its pass)
_MASKS_SEEN: deque[tuple[weakref.ref, bool]] = deque(maxlen=4)


@dataclass(eq=False)
class AttentionCall:
    """One attention call as the handlers see it (q [b, h, q, d]; k, v [b, kv, k, d], post-RoPE)."""

    module: nn.Module
    tower: str
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None  # boolean keep mask, broadcastable to [b, h, q, k]
    scale: float
    causal: bool
    ctx: BatchContext | None
    kwargs: dict = field(default_factory=dict)
    softcap: float | None = None  # attention logit soft-cap (Gemma 2)
    raw_mask: torch.Tensor | None = None  # the mask exactly as transformers passed it (may be additive)
    window: int | None = None  # sliding window (already in the mask; naming it lets kernels skip blocks)
    bias: torch.Tensor | None = None  # a score bias the mask carries (BEiT), added to the scores
    head_offset: int = 0  # global index of the call's first head (a tensor-parallel rank holds a share)
    key_start: int = 0  # token columns before the first key (evicted by a sliding-window cache)

    @classmethod
    def build(
        cls, module: nn.Module, q, k, v, mask, *, scaling=None, is_causal=None, key_start: int = 0, **kwargs
    ) -> AttentionCall:
        """The call transformers made to the attention function of `module` (tagged with its site), with its
        keys already mapped to token columns (`headlab.probe.keys.call_keys`)."""
        tower, layer = module._headlab_site
        keep = keep_mask(mask)
        return cls(
            module=module,
            tower=tower,
            layer=layer,
            q=q,
            k=k,
            v=v,
            mask=keep,
            scale=scaling if scaling is not None else q.shape[-1] ** -0.5,
            causal=is_causal_call(is_causal, module, keep, q.shape[2]),
            ctx=None,
            kwargs=kwargs,
            softcap=kwargs.get("softcap"),
            raw_mask=mask,
            bias=score_bias(mask, keep),
            window=kwargs.get("sliding_window", getattr(module, "sliding_window", None)),
            key_start=key_start,
        )

    def with_context(self, ctx: BatchContext) -> AttentionCall:
        """This call seen by one block (its batch context); `plain` is shared when already computed."""
        view = dataclasses.replace(self, ctx=ctx)
        if "plain" in self.__dict__:
            view.__dict__["plain"] = self.__dict__["plain"]
        return view

    @property
    def n_heads(self) -> int:
        return self.q.shape[1]

    @property
    def n_q(self) -> int:
        return self.q.shape[2]

    @property
    def step(self) -> int:
        return self.ctx.step

    @cached_property
    def query_pos(self) -> torch.Tensor:
        """[b, n_q] example positions of the call's queries (-1 for padding)."""
        return self.ctx.key_pos[:, -self.n_q :]

    @cached_property
    def plain(self):
        """(out [b, h, q, d_v] fp32, lse [b, h, q]) of the unedited attention (computed once, fused)."""
        att = fused_attention(self.q, self.k, self.v, self.spec())
        return att.out.float(), att.lse

    def spec(self, **stats) -> FusedSpec:
        """This call's scores and masks as a FusedSpec, with the statistics `stats` asked for."""
        return FusedSpec(
            scale=self.scale,
            causal=self.causal,
            mask=self.mask,
            softcap=self.softcap,
            window=self.window,
            bias=self.bias,
            **stats,
        )

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Explicit scores [..., q, k] of some queries and keys as this call forms them (scale, soft-cap)."""
        return attention_scores(q, k, scale=self.scale, softcap=self.softcap)

    def probs(self) -> torch.Tensor:
        """The explicit [b, h, q, k] pattern (reference paths and single-row decode steps only)."""
        mask = self.mask if self.bias is None else self.raw_mask  # the additive mask carries the bias
        return naive_attention(
            self.q, self.k, self.v, mask=mask, scale=self.scale, causal=self.causal, softcap=self.softcap
        ).probs
