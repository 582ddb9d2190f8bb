"""PAINT: Paying Attention to INformed Tokens (Arif et al., arXiv 2501.12206; v1 "Fixing Imbalanced Attention
to Mitigate In-Context Hallucination of LVLM"; official code hasanar1f/PAINT, `modPAI/`, whose semantics
headlab follows), and PAI's text-only-branch logit refinement (`PAICFG`) it runs with.

1. Dual-stream token selection, once per image, in the vision tower (CLIP ViT): the CLS query row's
   attention to the patch tokens, summed over heads. Local tokens L: the top floor(ratio * n_patches) patches
   by it in the FIRST ViT layer (ratio 0.25). Summary tokens S: the patches whose CLS attention in the
   PENULTIMATE ViT layer (index -2) exceeds Q3 + 1.5 IQR (quartiles with linear interpolation, numpy's
   default, as the code's `np.percentile`). Then L := L minus S. headlab reads the CLS rows inside the
   model's own pass (the attention call of those two layers: one query row, O(k) per head; no eager
   attention, no output_attentions); `paint_tokens` gets the same sets through a `capture` of the vision
   tower's CLS rows, and the tests check the two agree. Patch j is image token j of its example (LLaVA's
   "default" feature strategy drops the CLS feature; with "full" the image tokens start with the CLS one).
   A tower without a CLS token (SigLIP) has no CLS row: refused.
2. The boost, in the chosen language-model layers (code: 2 .. 31 of LLaMA-7B's 32, `default_layers` scales
   that to the model's depth), all heads, the LAST query row only (prefill: each row's last prompt token;
   decode: the current token): s <- s + alpha |s| for keys in L and s <- s + beta |s| for keys in S, on the
   pre-softmax scores (after the scale, before the mask). Defaults alpha 0.7, beta 0.3 (`chair_eval`'s; the
   repo's last CHAIR command uses alpha 0.9). Fused: every other row is the plain fused attention and only the
   last row is recomputed with the boost (`core.boosted_attention`); it composes exactly with VHR (output
   head scales) and VAR/ACT (group edits act on the boosted rows' masses).
3. `PAICFG(gamma=1.1, cutoff=0.1)`: a separate intervention (a switch of its own, as in PAI's code): a
   text-only branch (each prompt without its image tokens, left-padded, with its own KV cache, none of the
   block's patches acting in it: the boost is off) runs beside every forward pass, and the last position's
   logits become gamma (logp_img - logp_txt) + logp_txt, -inf where logp_img < max logp_img + log(cutoff)
   (adaptive plausibility). `generate` then picks from those.
4. headlab's design, NOT from the paper's code: `head_sensitivity=True` scales alpha per head by that head's
   visual sensitivity, its attention mass on the image tokens in the boosted (unboosted-score) row,
   normalised by the mean over the layer's heads: alpha_h = alpha * m_h / mean_h(m_h) (so the heads' mean
   alpha stays alpha; a layer whose rows put no mass on the image keeps alpha). The v1 abstract mentions
   "head-specific modulation by visual sensitivity"; the released code has none.

Departures: the official code handles batch size 1 and one image; headlab runs any left-padded batch, each
row with its own image's token sets and its own last query.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headlab.compat import cache_of, past_length, with_cache
from headlab.errors import InputError, SelectionError, UnsupportedModelError
from headlab.inputs import IMAGE_INPUTS, TOKEN_INPUTS
from headlab.interventions.core import AttentionCall, Intervention, Patch, Runner
from headlab.interventions.text_branch import drop_image_tokens, example_rows, left_padded
from headlab.kernels.fused import keep_rows
from headlab.kernels.reference import expand_kv
from headlab.kernels.spec import ScoreBoost
from headlab.loading import Family, LoadedModel

_IQR_FENCE = 1.5


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The code's LLaMA-7B layers 2 .. 31 of 32, scaled to `n_layers` (start = round(2 n / 32))."""
    return tuple(range(min(round(2 * n_layers / 32), n_layers - 1), n_layers))


def select_tokens(
    first: torch.Tensor, penultimate: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAINT's dual-stream selection from CLS attention to the patches [..., n_patches] of the first and the
    penultimate ViT layer: (local, summary) boolean masks [..., n_patches], disjoint."""
    n = first.shape[-1]
    top = first.float().topk(math.floor(ratio * n), dim=-1).indices
    local = torch.zeros(first.shape, dtype=torch.bool, device=first.device).scatter_(-1, top, True)
    x = penultimate.float()
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], device=x.device), dim=-1, keepdim=True)
    summary = x > q3 + _IQR_FENCE * (q3 - q1)
    return local & ~summary, summary


@dataclass(frozen=True)
class PAINT(Intervention):
    """Boost the last query row's scores toward PAINT's local (alpha) and summary (beta) image tokens.

    Defaults: the official `chair_eval` (alpha 0.7, beta 0.3, ratio 0.25; the repo's last CHAIR command uses
    alpha 0.9). layers: language-model layers (None: `default_layers`). head_sensitivity: headlab's per-head
    alpha (module docstring, point 4; not from the paper's code). After a pass, the bound patch's `latest`
    holds the (local, summary) patch indices of each image of the vision tower's last run, and `tokens` those
    of each example (block example id) of the last prefill."""

    alpha: float = 0.7
    beta: float = 0.3
    ratio: float = 0.25
    layers: Sequence[int] | None = None
    head_sensitivity: bool = False

    def bind(self, lm: LoadedModel) -> Patch:
        if lm.family is not Family.LVLM or lm.image_token_id is None or not _has_vision(lm):
            raise SelectionError(
                "PAINT needs a vision-language model with a vision tower (image tokens to boost)"
            )
        vision = lm.tower("vision")
        if vision.prefix_tokens - vision.register_tokens < 1:
            raise UnsupportedModelError(
                f"PAINT selects image tokens by the CLS token's attention in the vision tower, and the vision "
                f"tower of {lm.model_type} has no CLS token (a SigLIP-style tower: every token is a patch); use "
                "a model with a CLIP-style tower (LLaVA, LLaVA-1.5), or VHR / VAR"
            )
        if vision.n_layers < 2:
            raise UnsupportedModelError(
                "PAINT reads the first and the penultimate vision layer; this tower has one"
            )
        if not 0.0 < self.ratio <= 1.0:
            raise SelectionError(f"PAINT: ratio must lie in (0, 1], got {self.ratio}")
        if self.alpha < 0 or self.beta < 0:
            raise SelectionError(f"PAINT: alpha and beta must be >= 0, got {self.alpha}, {self.beta}")
        n = lm.tower("lm").n_layers
        layers = tuple(self.layers) if self.layers is not None else default_layers(n)
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad:
            raise SelectionError(f"PAINT layers {bad} out of range: the language model has {n} layers")
        return PAINTPatch(self, lm, frozenset(layers))


class PAINTPatch(Patch):
    def __init__(self, spec: PAINT, lm: LoadedModel, layers: frozenset[int]) -> None:
        self.spec, self.lm, self.layers = spec, lm, layers
        n_vision = lm.tower("vision").n_layers
        self.vision_layers = (0, n_vision - 2)
        self._first: torch.Tensor | None = None  # [images, n_patches] CLS rows of the first vision layer
        self.latest: list[tuple[torch.Tensor, torch.Tensor]] = []  # per image of the last vision run
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # example -> (local, summary) indices
        self._positions: dict[int, tuple | None] = {}  # example -> their example positions (None: no image)
        self._coef: tuple[tuple, torch.Tensor] | None = None  # (pass key, [b, 1, k]) of the last LM call

    def touches(self, tower: str, layer: int) -> bool:
        if tower == "vision":
            return layer in self.vision_layers
        return tower == "lm" and layer in self.layers

    # ----- vision tower: the CLS rows ---------------------------------------------------------------------
    def transform(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if call.tower == "vision":
            self._see_vision(call)
        return out

    def head_scale(self, call: AttentionCall) -> torch.Tensor | None:
        """1 for every head of the boosted layers (PAINT scales no output; a VHR beside it folds in)."""
        return None if call.tower == "vision" else torch.ones(1, call.n_heads, device=call.q.device)

    def _see_vision(self, call: AttentionCall) -> None:
        ctx = call.ctx
        if ctx.tiled:
            raise UnsupportedModelError(
                f"the vision tower of {self.lm.model_type} sees an image as several tiles or windows (or an example "
                "has several images); PAINT selects tokens from one CLS row per image: use a one-image LLaVA-style "
                "model"
            )
        cls = ctx.roles[0].positions("cls")[0]
        patches = torch.tensor(ctx.roles[0].positions("patch"), device=call.q.device)
        if call.n_q != call.k.shape[2]:
            raise UnsupportedModelError("PAINT expects the vision tower's queries to be all of its tokens")
        probs = cls_attention(call, cls)[:, patches]  # [images, n_patches]
        if call.layer == self.vision_layers[0]:  # a new run of the vision tower
            self._first, self.latest = probs, []
        if call.layer == self.vision_layers[1] and self._first is not None:
            local, summary = select_tokens(self._first, probs, self.spec.ratio)
            self.latest = [
                (lo.nonzero().flatten().cpu(), su.nonzero().flatten().cpu())
                for lo, su in zip(local, summary, strict=True)
            ]
            self._first = None

    # ----- language model: the boost -----------------------------------------------------------------------
    def score_boost(self, call: AttentionCall) -> ScoreBoost | None:
        if call.tower != "lm":
            return None
        ctx = call.ctx
        key = (ctx.pass_id, ctx.step, call.k.shape[2], tuple(ctx.examples))
        if self._coef is None or self._coef[0] != key:
            self._coef = (key, self._key_coefficients(call).to(call.q.device))
        coef = self._coef[1].to(call.q.device)  # [b, 2, k]: alpha's and beta's keys
        last = call.query_pos.argmax(-1)  # each row's last real query (prefill: last prompt token)
        rows = torch.zeros(call.q.shape[0], call.n_q, dtype=torch.bool, device=call.q.device)
        rows[torch.arange(len(last)), last.to(call.q.device)] = True
        alpha = torch.full((call.q.shape[0], 1), self.spec.alpha, device=call.q.device)
        if self.spec.head_sensitivity:
            alpha = self.spec.alpha * head_sensitivity(call, last, coef.sum(1) > 0)  # [b, h]
        per_key = alpha[:, :, None] * coef[:, :1] + self.spec.beta * coef[:, 1:]  # [b, 1|h, k]
        return ScoreBoost(coef=per_key, rows=rows)

    def _key_coefficients(self, call: AttentionCall) -> torch.Tensor:
        """[b, 2, k] float: 1 at each row's local keys (channel 0) and summary keys (channel 1)."""
        ctx = call.ctx
        if ctx.step == 0:  # prefill: the last vision run's images, in order, go to the rows holding images
            holders = [ex for ex, r in zip(ctx.examples, ctx.roles, strict=True) if "image" in r.present()]
            if holders and len(holders) != len(self.latest):
                raise InputError(
                    f"PAINT: this pass has {len(holders)} rows with image tokens but the vision tower's last run "
                    f"saw {len(self.latest)} images; give each prompt one image, with its pixel_values, inside "
                    "the intervene block"
                )
            # a prefill starts new examples: the earlier ones are done with (decode steps continue these)
            self.tokens, self._positions = dict(zip(holders, self.latest, strict=False)), {}
        out = torch.zeros(call.q.shape[0], 2, call.k.shape[2])
        for b, example in enumerate(ctx.examples):
            if ctx.step == 0 or example not in self._positions:
                self._positions[example] = self._example_positions(example, ctx.roles[b])
            chosen = self._positions[example]
            if chosen is None:
                continue  # a text-only row: nothing to boost
            for channel, positions in enumerate(chosen):
                out[b, channel] = torch.isin(ctx.key_pos[b], positions).float()
        return out

    def _example_positions(self, example: int, roles) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The example positions of an example's (local, summary) image tokens; None without an image."""
        if "image" not in roles.present():
            return None
        if example not in self.tokens:
            raise InputError(
                f"PAINT saw no vision-tower selection for example {example}: run the model with its image "
                "inputs (pixel_values) inside the intervene block, the prefill before any decode step"
            )
        image = torch.tensor(roles.positions("image"))
        local, summary = self.tokens[example]
        n = int(torch.cat([local, summary]).max()) + 1 if len(local) + len(summary) else 0
        offset = _patch_offset(len(image), self.lm, n)
        return image[offset + local], image[offset + summary]


def _has_vision(lm: LoadedModel) -> bool:
    return any(t.name == "vision" for t in lm.towers)


def _patch_offset(n_image_tokens: int, lm: LoadedModel, at_least: int) -> int:
    """Image token of patch 0: 0 when the image tokens are the patches (LLaVA's "default" strategy), the
    tower's prefix when they start with its CLS feature ("full"); anything else is refused."""
    vision = lm.tower("vision")
    n_patches = vision.grid[0] * vision.grid[1] if vision.grid is not None else None
    if n_patches is None or n_image_tokens not in (n_patches, n_patches + vision.prefix_tokens):
        raise UnsupportedModelError(
            f"{lm.model_type} turns an image into {n_image_tokens} tokens, not one per vision patch "
            f"({n_patches}); PAINT maps CLS-selected patches one to one onto image tokens (LLaVA, LLaVA-1.5)"
        )
    if at_least > n_patches:
        raise InputError(f"PAINT selected patch {at_least - 1} of an image with {n_patches} patches")
    return n_image_tokens - n_patches


def cls_attention(call: AttentionCall, cls: int) -> torch.Tensor:
    """[b, k] the CLS query row's attention probabilities, summed over heads, from the call's q and k (one
    row per head: scale, soft-cap, bias and mask as the call has them)."""
    q = call.q[:, :, cls : cls + 1]  # [b, h, 1, d]
    k = expand_kv(call.k, call.n_heads)
    scores = call.scores(q, k)  # [b, h, 1, k]
    if call.bias is not None:
        bias = call.bias.float()
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        scores = scores + (bias if bias.shape[2] == 1 else bias[..., cls : cls + 1, :])
    keep = keep_rows(call.spec(), torch.tensor([cls]), call.n_q, call.k.shape[2], call.q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1).nan_to_num(0.0).sum(1)[:, 0]


def head_sensitivity(call: AttentionCall, last: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[b, h] each head's attention mass on the image keys `image` [b, k] in row `last` [b], before the boost,
    divided by the mean over the heads (1 where the mean is 0): headlab's per-head alpha factor."""
    batch = torch.arange(call.q.shape[0], device=call.q.device)
    q = call.q[batch, :, last.to(call.q.device)][:, :, None]  # [b, h, 1, d]
    scores = call.scores(q, expand_kv(call.k, call.n_heads))
    unique, which = torch.unique(last, return_inverse=True)
    keep = keep_rows(call.spec(), unique.cpu(), call.n_q, call.k.shape[2], call.q.device)
    if keep is not None:
        keep = keep.expand(len(batch), -1, -1, -1)[batch, :, which.to(call.q.device)][:, :, None]
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)[:, :, 0]  # [b, h, k]
    mass = (probs * image.to(probs)[:, None]).sum(-1)
    mean = mass.mean(-1, keepdim=True)
    return torch.where(mean > 0, mass / mean.clamp(min=1e-30), 1.0)


# ------------------------------------------------------------------------------ selection through a capture


@torch.no_grad()
def paint_tokens(lm: LoadedModel, inputs, *, ratio: float = 0.25) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each image's (local, summary) patch indices, from a `capture` of the vision tower's CLS rows in the
    first and penultimate layers (the recorded rows, summed over heads): PAINT's selection without PAINT."""
    from headlab.probe.capture import capture
    from headlab.probe.select import Select

    vision = lm.tower("vision")
    if vision.prefix_tokens - vision.register_tokens < 1:
        raise UnsupportedModelError(f"the vision tower of {lm.model_type} has no CLS token to select with")
    layers = (0, vision.n_layers - 2)
    with capture(lm, stats=None, patterns=Select(tower="vision", layers=layers, queries=[0])) as rec:
        lm.model(**inputs)
    rows: dict[int, dict[int, torch.Tensor]] = {}
    for r in rec.patterns:
        if r.tower == "vision":
            per = rows.setdefault(r.example, {})
            per[r.layer] = per.get(r.layer, 0) + r.probs[0]
    n_prefix = vision.prefix_tokens
    out = []
    for example in sorted(rows):
        first, penult = rows[example][layers[0]][n_prefix:], rows[example][layers[1]][n_prefix:]
        local, summary = select_tokens(first, penult, ratio)
        out.append((local.nonzero().flatten(), summary.nonzero().flatten()))
    return out


# ------------------------------------------------------------------------------------------- PAI's CFG


@dataclass(frozen=True)
class PAICFG(Intervention):
    """PAI's text-only-branch logit refinement (module docstring, point 3): gamma 1.1, cutoff 0.1.

    The last position's logits of every forward pass in the block become gamma (logp_img - logp_txt) +
    logp_txt, -inf where logp_img < max logp_img + log(cutoff); the text branch runs with none of the block's
    patches (no boost, no VHR). Inputs must be left-padded (as `generate` needs)."""

    gamma: float = 1.1
    cutoff: float = 0.1

    def bind(self, lm: LoadedModel) -> Patch:
        if lm.family is not Family.LVLM or lm.image_token_id is None:
            raise SelectionError("PAICFG needs a vision-language model (a prompt to remove the image from)")
        if not 0.0 < self.cutoff <= 1.0:
            raise SelectionError(f"PAICFG: cutoff must lie in (0, 1], got {self.cutoff}")
        return PAICFGPatch(self, lm)


def refine(logp_img: torch.Tensor, logp_txt: torch.Tensor, gamma: float, cutoff: float) -> torch.Tensor:
    """PAI's refined log-probs [..., vocab] from the two branches' log-probs (module docstring, point 3)."""
    out = gamma * (logp_img - logp_txt) + logp_txt
    floor = logp_img.max(-1, keepdim=True).values + math.log(cutoff)
    return out.masked_fill(logp_img < floor, float("-inf"))


class PAICFGPatch(Patch):
    def __init__(self, spec: PAICFG, lm: LoadedModel) -> None:
        self.spec, self.lm = spec, lm
        self._text: dict | None = None  # the text branch: cache, attention mask, next positions, contexts
        self._logp_txt: torch.Tensor | None = None

    def touches(self, tower: str, layer: int) -> bool:
        return False

    def on_pass(self, runner: Runner, kwargs: dict) -> None:
        from headlab.probe.passes import PassContexts

        if runner.session is not None and len(runner.session.editors) > 1:
            raise SelectionError(
                "PAICFG runs its text branch beside the block's passes and needs to be in the only open "
                "intervene block; put every intervention into one intervene(...)"
            )
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None:
            raise InputError("PAICFG needs input_ids (the text branch drops the image tokens from them)")
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.dim() != 2:
            raise InputError("PAICFG needs a 2-D attention mask (left-padded rows)")
        if past_length(kwargs) == 0:
            if not bool(mask[:, -1].bool().all()):
                raise InputError(
                    "PAICFG needs left-padded inputs (every row's last token last), as generate does"
                )
            rows = [drop_image_tokens(row, self.lm.image_token_id) for row in example_rows(kwargs, mask)]
            pad = self.lm.tokenizer.pad_token_id or 0
            batch = left_padded(rows, pad=pad, mask_dtype=mask.dtype)
            batch = {k: v.to(ids.device) for k, v in batch.items()}
            self._text = {"contexts": PassContexts(self.lm), "cache": None}
            self._text["mask"] = batch["attention_mask"]
            self._text["next"] = batch["position_ids"][:, -1:] + 1
            self._run_text(runner, batch)
            return
        if self._text is None:
            raise InputError("PAICFG saw a decode step without its prefill; run generate() inside the block")
        new, text = ids, self._text  # a decode step's new tokens
        ones = torch.ones(len(ids), new.shape[1], dtype=text["mask"].dtype, device=ids.device)
        text["mask"] = torch.cat([text["mask"], ones], 1)
        positions = text["next"] + torch.arange(new.shape[1], device=ids.device)[None]
        text["next"] = positions[:, -1:] + 1
        self._run_text(
            runner,
            {"input_ids": new, "attention_mask": text["mask"], "position_ids": positions},
        )

    def _run_text(self, runner: Runner, batch: dict) -> None:
        text = self._text
        extra = with_cache(text["cache"]) if text["cache"] is not None else {}
        with runner.aside(text["contexts"]):
            out = runner.side_pass(**batch, **extra, use_cache=True)
        # no patch acted, so nothing asked for the branch's context: make it the one its next step continues
        text["contexts"].context("lm", *text["mask"].shape)
        text["cache"] = cache_of(out)
        self._logp_txt = torch.log_softmax(out.logits[:, -1].float(), -1)

    def on_output(self, runner: Runner, kwargs: dict, output) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None:  # the block's context of this pass, for its next decode step (no patch may ask)
            runner.contexts.context("lm", ids.shape[0], past_length(kwargs) + ids.shape[1])
        if self._logp_txt is None:
            return
        logits = output.logits
        logp_img = torch.log_softmax(logits[:, -1].float(), -1)
        refined = refine(logp_img, self._logp_txt.to(logp_img.device), self.spec.gamma, self.spec.cutoff)
        logits = logits.clone()
        logits[:, -1] = refined.to(logits.dtype)
        output["logits"] = logits
        self._logp_txt = None


# ------------------------------------------------------------------------------------------- the oracle


@torch.no_grad()
def paint_reference(lm: LoadedModel, inputs, spec: PAINT = PAINT()) -> torch.Tensor:
    """The oracle: PAINT literally, one example at a time without padding: the token sets from a capture of
    the vision tower's CLS rows (`paint_tokens`), the boost on explicit scores of the last row (the reference
    engine). Returns the last-position logits [batch, vocab]."""
    from headlab.interventions.core import intervene

    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    extra = {k: v for k, v in inputs.items() if k in IMAGE_INPUTS}
    per_token = {k: v for k, v in inputs.items() if k in TOKEN_INPUTS}
    logits = []
    for b, (ids, m) in enumerate(zip(inputs["input_ids"], mask, strict=True)):
        keep = m.bool()
        row = {"input_ids": ids[keep][None], **{k: v[b][keep][None] for k, v in per_token.items()}}
        row.update({k: v[b : b + 1] for k, v in extra.items()})
        ((local, summary),) = paint_tokens(lm, row, ratio=spec.ratio)
        with intervene(lm, _GivenTokens(spec, local, summary), engine="reference"):
            logits.append(lm.model(**row).logits[0, -1])
    return torch.stack(logits)


@dataclass(frozen=True)
class _GivenTokens(Intervention):
    """PAINT with its token sets given (the oracle's): no vision-tower selection."""

    spec: PAINT
    local: torch.Tensor
    summary: torch.Tensor

    def bind(self, lm: LoadedModel) -> Patch:
        patch = self.spec.bind(lm)
        patch.vision_layers = ()  # the vision tower is not read: the sets are given
        patch.latest = [(self.local.cpu(), self.summary.cpu())]
        return patch
