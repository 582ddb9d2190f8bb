"""VHR: Vision-aware Head Reinforcement (He et al., "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", ACL 2025), with the VHD metric it is built on.

VHD of head (l, i) at a generation step: the Euclidean distance between the head's output (before o_proj)
at the last position with the image and without it (the image tokens removed from the sequence, not
blanked). VHR, at the first generation step only, layer by layer inside one forward pass:
1. VHD for every head of layer l;
2. outlier rule: VHD := 0 where VHD > mean + std AND TA > mean + std, TA = ||head output without image||^2
   (std over the layer's heads, population std: the paper does not say which; `unbiased_std=True` switches);
3. select the heads with VHD strictly above the layer's median (the top half);
4. multiply their outputs by alpha, then go on to layer l+1, whose VHD is computed on reinforced states.
The selection is then frozen: the selected heads are scaled at every position of the prefill and at every
decode step (KV-cache consistency, as the paper argues).

Both branches are scaled alike during selection (the paper does not say; the method notes recommend it as
the default). Then the text-only branch at layer l depends on the selection below l, so the two branches
must advance in lockstep: headlab runs one side pass over a batch holding each example twice (with the
image, and its text alone, left-padded with its own position ids) before the real prefill, which then
recomputes the with-image rows under the frozen selection: the first step costs about three prefills.
With `scale_text_branch=False` (only the image branch is scaled) the text branch is independent of the
selection: one text-only side pass records its head outputs, and the selection happens inside the real
prefill itself, so the first step costs one prefill plus one text-only pass, the paper's stated cost. Layers: the paper's {1} plus the last 14 of 32 (LLaVA-1.5-7B), scaled to the model's depth by
`default_layers`; pass `layers=` to choose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headlab.compat import past_length
from headlab.errors import InputError, SelectionError
from headlab.inputs import IMAGE_INPUTS, TOKEN_INPUTS
from headlab.interventions.core import AttentionCall, Intervention, Patch, Runner
from headlab.interventions.text_branch import drop_image_tokens, example_rows, left_padded
from headlab.loading import Family, LoadedModel


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The paper's LLaVA-1.5 layers ({1} and the last 14 of 32) scaled to `n_layers`."""
    early = round(n_layers / 32)
    late = max(1, round(14 * n_layers / 32))
    return tuple(sorted({min(early, n_layers - 1), *range(n_layers - late, n_layers)}))


def _median(x: torch.Tensor) -> torch.Tensor:
    """The median over the last axis (mean of the two middle values for an even count)."""
    s = x.sort(-1).values
    n = s.shape[-1]
    return s[..., n // 2] if n % 2 else (s[..., n // 2 - 1] + s[..., n // 2]) / 2


def select_heads(
    vhd: torch.Tensor, ta: torch.Tensor, *, outliers: bool = True, unbiased_std: bool = False
) -> torch.Tensor:
    """VHR's per-layer selection: vhd, ta [..., heads] -> bool [..., heads] (outlier rule, then > median)."""
    vhd = vhd.clone()
    if outliers:
        hot = (vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True, unbiased=unbiased_std)) & (
            ta > ta.mean(-1, keepdim=True) + ta.std(-1, keepdim=True, unbiased=unbiased_std)
        )
        vhd = torch.where(hot, 0.0, vhd)
    return vhd > _median(vhd)[..., None]


@dataclass(frozen=True)
class VHR(Intervention):
    """Reinforce the vision-aware heads of `layers` by `alpha` (paper defaults: alpha 2, outlier rule on).

    After the block, `selected` on the returned patch holds the frozen selection (layer -> [batch, heads])
    and `vhd` the divergences it was made from."""

    alpha: float = 2.0
    layers: Sequence[int] | None = None
    outliers: bool = True
    unbiased_std: bool = False
    scale_text_branch: bool = True

    def bind(self, lm: LoadedModel) -> Patch:
        if lm.family is not Family.LVLM or lm.image_token_id is None:
            raise SelectionError("VHR needs a vision-language model (image tokens to remove)")
        n = lm.tower("lm").n_layers
        layers = tuple(self.layers) if self.layers is not None else default_layers(n)
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad:
            raise SelectionError(f"VHR layers {bad} out of range: the language model has {n} layers")
        return VHRPatch(self, lm, set(layers))


class VHRPatch(Patch):
    def __init__(self, spec: VHR, lm: LoadedModel, layers: set[int]) -> None:
        self.spec, self.lm, self.layers = spec, lm, layers
        self.selected: dict[int, torch.Tensor] = {}  # layer -> [batch, heads] bool, frozen
        self.vhd: dict[int, torch.Tensor] = {}
        self._pairs = 0  # during the side pass: examples B (rows 0..B-1 with image, B..2B-1 without)
        self._text_only = False  # during the text-only side pass (scale_text_branch=False)
        self._text_last: dict[int, torch.Tensor] = {}  # layer -> [B, h, d] text-branch outputs
        self._selecting = False  # the real prefill selects (scale_text_branch=False)

    def touches(self, tower: str, layer: int) -> bool:
        return tower == "lm" and layer in self.layers

    def on_pass(self, runner: Runner, kwargs: dict) -> None:
        if past_length(kwargs) > 0:
            return  # decode step: the selection stays frozen
        ids = kwargs.get("input_ids")
        extra = {k: v for k, v in kwargs.items() if k in IMAGE_INPUTS and v is not None}
        if ids is None or not extra:
            raise InputError(
                "VHR selects heads from input_ids with the image inputs (pixel_values, or the encoder "
                "outputs generate() passes), with vs without the image"
            )
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        lockstep = self.spec.scale_text_branch
        with_img = example_rows(kwargs, mask)  # each row's tokens, and what goes with each token
        text = [drop_image_tokens(row, self.lm.image_token_id) for row in with_img]
        rows = with_img + text if lockstep else text
        batch = left_padded(rows, pad=self.lm.tokenizer.pad_token_id or 0, mask_dtype=mask.dtype)
        if self.lm.multimodal_positions:  # M-RoPE: the model's own index, from the mask
            del batch["position_ids"]
        self.selected, self.vhd, self._text_last = {}, {}, {}
        self._pairs, self._text_only = (len(ids), False) if lockstep else (0, True)
        try:
            runner.side_pass(
                **{k: v.to(ids.device) for k, v in batch.items()},
                use_cache=False,
                **(extra if lockstep else {}),
            )
        finally:
            self._pairs, self._text_only = 0, False
        self._selecting = not lockstep

    def _select(self, layer: int, with_img: torch.Tensor, without: torch.Tensor) -> torch.Tensor:
        vhd = (with_img - without).norm(dim=-1)  # [B, h]
        ta = without.pow(2).sum(-1)
        chosen = select_heads(vhd, ta, outliers=self.spec.outliers, unbiased_std=self.spec.unbiased_std)
        self.selected[layer], self.vhd[layer] = chosen, vhd
        return chosen

    def transform(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        b = self._pairs
        if self._text_only:  # text-only side pass: remember the last position, change nothing
            self._text_last[call.layer] = out[:, :, -1]
            return out
        if b:  # the lockstep selection pass: out [2B, h, q, d]
            chosen = self._select(call.layer, out[:b, :, -1], out[b:, :, -1])
            rows = torch.cat([chosen, chosen])
        elif self._selecting and call.step == 0:  # selection inside the real prefill
            last = call.query_pos.argmax(-1)  # each row's last real query
            with_img = out[torch.arange(out.shape[0]), :, last]  # [B, h, d]
            rows = self._select(call.layer, with_img, self._text_last[call.layer])
            if call.layer == max(self.layers):
                self._selecting = False
        else:
            return out * self.head_scale(call).to(out)[:, :, None, None]
        scale = torch.where(rows, self.spec.alpha, 1.0).to(out)  # [rows, h]
        return out * scale[:, :, None, None]

    def head_scale(self, call: AttentionCall) -> torch.Tensor | None:
        """[B, h] alpha on the selected heads, once the selection is made (None while selecting)."""
        if self._text_only or self._pairs or (self._selecting and call.step == 0):
            return None
        chosen = self.selected.get(call.layer)
        if chosen is None:
            raise InputError("VHR saw no selection pass; run the model with its image inputs first")
        if chosen.shape[0] != call.q.shape[0]:
            raise InputError(
                f"VHR selected heads for a batch of {chosen.shape[0]} but this pass has {call.q.shape[0]} rows"
            )
        return torch.where(chosen.to(call.q.device), self.spec.alpha, 1.0)


@torch.no_grad()
def vhr_reference(lm: LoadedModel, inputs, spec: VHR) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The oracle: VHR literally, one example at a time without padding, explicit attention patterns.

    For each selected layer in order: run the example with its image and its text alone (separately), with
    the heads chosen so far scaled, read that layer's head outputs at the last position, select. Then run the
    example with every chosen head scaled. Returns (last-position logits [batch, vocab], layer -> [batch,
    heads] selection)."""
    from headlab.interventions.core import intervene
    from headlab.interventions.heads import HeadScale
    from headlab.probe.outputs import record_head_outputs

    layers = sorted(spec.layers if spec.layers is not None else default_layers(lm.tower("lm").n_layers))
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    extra = {k: v for k, v in inputs.items() if k in IMAGE_INPUTS}
    per_token = {k: v for k, v in inputs.items() if k in TOKEN_INPUTS}
    single = len(inputs["input_ids"]) == 1  # image inputs as they are (Qwen2-VL's are not batch-major)
    logits, chosen = [], {layer: [] for layer in layers}
    for b, (ids, m) in enumerate(zip(inputs["input_ids"], mask, strict=True)):
        keep = m.bool()
        with_img = {"input_ids": ids[keep][None], **{k: v[b][keep][None] for k, v in per_token.items()}}
        text = {k: v[with_img["input_ids"] != lm.image_token_id][None] for k, v in with_img.items()}
        image_inputs = extra if single else {k: v[b : b + 1] for k, v in extra.items()}
        heads: list[tuple[int, int]] = []
        for layer in layers:
            outs = []
            for row, more, scaled in ((with_img, image_inputs, True), (text, {}, spec.scale_text_branch)):
                plan = [HeadScale(tuple(heads), factor=spec.alpha)] if heads and scaled else []
                with (
                    intervene(lm, *plan, engine="reference") if plan else contextlib.nullcontext(),
                    record_head_outputs(lm, layers=[layer]) as rec,
                ):
                    lm.run({**row, **more})
                outs.append(rec.table(layer)[0, :, -1])  # [heads, d]: after the scaling (observed)
            vhd = (outs[0] - outs[1]).norm(dim=-1)
            sel = select_heads(
                vhd, outs[1].pow(2).sum(-1), outliers=spec.outliers, unbiased_std=spec.unbiased_std
            )
            chosen[layer].append(sel)
            heads += [(layer, h) for h in sel.nonzero().flatten().tolist()]
        plan = [HeadScale(tuple(heads), factor=spec.alpha)] if heads else []
        if plan:
            with intervene(lm, *plan, engine="reference"):
                logits.append(lm.model(**with_img, **image_inputs).logits[0, -1])
        else:
            logits.append(lm.model(**with_img, **image_inputs).logits[0, -1])
    return torch.stack(logits), {layer: torch.stack(s) for layer, s in chosen.items()}
