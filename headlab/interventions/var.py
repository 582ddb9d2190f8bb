"""VAR: Visual Attention Redistribution (Kang et al., "See What You Are Told: Visual Attention Sink in Large
Multimodal Models", ICLR 2025; official code MICV-yonsei/VisAttnSink, whose semantics headlab follows).

1. Sink dimensions D: the hidden dimensions where the BOS token carries massive activations (given, or found
   by `find_sink_dims`). Sink score of a token entering layer l: phi(x) = max_{d in D} |x_d| / RMS(x), RMS
   without the learned gain, in fp32, eps 1e-6. Sinks of layer l: phi > tau (tau = 20, strict as the code),
   all token types (BOS and text sinks too), computed on the prefill and frozen for decoding.
2. Image-centric rows, per (layer, head, query): the row's image mass m_V >= 0.2 (`summ`) and the ratio
   test. Code (default): visual-sink share m_{S and I} / m_V <= rho; paper: non-sink share >= rho
   (`ratio="paper"`); they agree only at rho = 0.5. Queries: prefill rows after the last image token, and
   each decode step's new token. The last layer is skipped; layers without sinks are untouched.
3. Redistribution on selected rows (code convention, `p` = fraction KEPT on the sinks): every sink key
   (visual and text) keeps p of its attention, and the freed mass (1 - p) m_S goes to the non-sink image
   keys N in proportion to their attention: a_j += (1 - p) m_S a_j / m_N. `p_means="moved"` reads p as the
   paper summaries do (sinks keep 1 - p). Applied exactly through group masses and outputs
   (o' = o + (1 - p) m_S (o_N / m_N - o_S / m_S)), never the [q, k] pattern.

Departure: the official code needs eager attention and batch size 1; headlab runs any batch, fused.
Layers: the code computes sinks for layers 2..L-1 and skips the last; `layers=` overrides (tiny models).

Counts (read-only): a bound VAR counts what it saw and did (`VARPatch.take()` -> `SinkCounts`): per layer the
sink tokens (all types, and the image tokens among them) and the largest phi of a prefill, and the attention
rows it redistributed. Counting never changes an edit. Note phi <= sqrt(d) for a hidden size d (one
dimension cannot exceed the RMS times sqrt(d)), so a model with d <= tau^2 (d <= 400 at tau = 20) has no
sink at all and VAR leaves it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from headlab.errors import InputError, SelectionError
from headlab.inputs import IMAGE_INPUTS, TOKEN_INPUTS
from headlab.interventions.core import AttentionCall, GroupEdit, Intervention, Patch
from headlab.loading import Family, LoadedModel, language_model_output
from headlab.probe.context import BatchContext

EPS = 1e-6
_INPUTS = ("input_ids", "attention_mask", "position_ids", *IMAGE_INPUTS, *TOKEN_INPUTS)


def sink_scores(hidden: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """phi(x) = max over `dims` of |x_d| / RMS(x) for hidden [..., d] (fp32)."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).add(EPS).sqrt()
    return (x[..., list(dims)] / rms).abs().amax(-1)


def sink_dims_from_states(states: Sequence[torch.Tensor], first: int = 0, *, top: int = 2) -> tuple[int, ...]:
    """The `top` hidden dimensions with the largest |activation| / RMS on token `first` (BOS) of example 0,
    averaged over the layer inputs after the first two (where massive activations live)."""
    layers = list(states[2:-1]) or list(states[1:]) or list(states)
    ratio = torch.stack(
        [(h[0, first].float() / h[0, first].float().pow(2).mean().add(EPS).sqrt()).abs() for h in layers]
    )
    return tuple(int(d) for d in ratio.mean(0).topk(top).indices.tolist())


@torch.no_grad()
def find_sink_dims(lm: LoadedModel, inputs: Mapping, *, top: int = 2) -> tuple[int, ...]:
    """Sink dimensions of `lm` from the BOS token's massive activations on `inputs` (first example)."""
    out = language_model_output(lm.model(**inputs, output_hidden_states=True))
    mask = inputs.get("attention_mask")
    return sink_dims_from_states(
        out.hidden_states, 0 if mask is None else int(mask[0].float().argmax()), top=top
    )


@dataclass(frozen=True)
class VAR(Intervention):
    """Redistribute attention from sink tokens to the image in image-centric rows (official-code defaults)."""

    dims: Sequence[int] | None = None  # sink dimensions; None = found on the first prefill (find_sink_dims)
    tau: float = 20.0
    summ: float = 0.2
    rho: float = 0.5
    p: float = 0.6
    p_means: str = "kept"  # "kept" (code) or "moved" (paper summaries)
    ratio: str = "code"  # "code": visual-sink share <= rho; "paper": non-sink share >= rho
    layers: Sequence[int] | None = None  # default 2 .. L-2 (the code's range minus the last layer)

    def bind(self, lm: LoadedModel) -> Patch:
        if lm.family is not Family.LVLM or lm.image_token_id is None:
            raise SelectionError("VAR needs a vision-language model (image tokens to redistribute to)")
        if self.p_means not in ("kept", "moved") or self.ratio not in ("code", "paper"):
            raise SelectionError("VAR: p_means is 'kept' or 'moved', ratio is 'code' or 'paper'")
        if not 0.0 <= self.p <= 1.0:
            raise SelectionError(f"VAR: p must lie in [0, 1], got {self.p}")
        n = lm.tower("lm").n_layers
        layers = tuple(self.layers) if self.layers is not None else tuple(range(2, n - 1))
        if any(not 0 <= layer < n for layer in layers):
            raise SelectionError(f"VAR layers {layers} out of range: the language model has {n} layers")
        return VARPatch(self, lm, layers)


@dataclass
class SinkCounts:
    """What a bound VAR saw and did over some passes (module docstring, "Counts"). Per layer it acts on:
    `sinks`, the tokens entering it with phi > tau (every token type, BOS included), `visual_sinks` the
    image tokens among them, `max_phi` the largest phi of a token entering it. `prefills`: the prefill
    passes seen; `rows`: the (example, head, query) attention rows redistributed, over all layers and steps;
    `width`: the hidden size d (phi <= sqrt(d))."""

    prefills: int = 0
    rows: int = 0
    width: int = 0
    sinks: dict[int, int] = field(default_factory=dict)
    visual_sinks: dict[int, int] = field(default_factory=dict)
    max_phi: dict[int, float] = field(default_factory=dict)

    @classmethod
    def merged(cls, parts: Sequence[SinkCounts]) -> SinkCounts:
        """The counts of several rows (or passes) together."""
        out = cls(
            prefills=sum(p.prefills for p in parts),
            rows=sum(p.rows for p in parts),
            width=max((p.width for p in parts), default=0),
        )
        for p in parts:
            for layer, n in p.sinks.items():
                out.sinks[layer] = out.sinks.get(layer, 0) + n
            for layer, n in p.visual_sinks.items():
                out.visual_sinks[layer] = out.visual_sinks.get(layer, 0) + n
            for layer, phi in p.max_phi.items():
                out.max_phi[layer] = max(out.max_phi.get(layer, 0.0), phi)
        return out

    def add_prefill(self, layer: int, phi: torch.Tensor, sink: torch.Tensor, image: torch.Tensor) -> None:
        """One layer input of a prefill: its valid tokens' phi, sink flags and image flags (bool, [n])."""
        self.sinks[layer] = self.sinks.get(layer, 0) + int(sink.sum())
        self.visual_sinks[layer] = self.visual_sinks.get(layer, 0) + int((sink & image).sum())
        if phi.numel():
            self.max_phi[layer] = max(self.max_phi.get(layer, 0.0), float(phi.detach().max()))


class VARPatch(Patch):
    def __init__(self, spec: VAR, lm: LoadedModel, layers: tuple[int, ...]) -> None:
        self.spec, self.lm, self.layers = spec, lm, layers
        self.dims = tuple(spec.dims) if spec.dims is not None else None
        self.sinks: dict[int, list[torch.Tensor]] = {}  # layer -> per example: bool [n_tokens] (prefill)
        self.keep = spec.p if spec.p_means == "kept" else 1.0 - spec.p
        # read-only counters (module docstring) since the last take, per batch row of the passes seen
        self.counts: list[SinkCounts] = []
        self._rows: torch.Tensor | None = None  # [batch] redistributed rows, summed on the device until taken

    def take(self) -> SinkCounts:
        """The counts since the last take (or the bind), every batch row together; start counting again."""
        return SinkCounts.merged(self.take_rows())

    def take_rows(self) -> list[SinkCounts]:
        """The counts since the last take (or the bind), one per batch row (row b of every pass: e.g. one
        per question of a batch answered together); start counting again."""
        counts, self.counts = self.counts, []
        if self._rows is not None:
            for c, n in zip(counts, self._rows.tolist(), strict=False):
                c.rows += int(n)
            self._rows = None
        return counts

    def row_counts(self, b: int) -> SinkCounts:
        """The counts of batch row `b` (created on first use)."""
        while len(self.counts) <= b:
            self.counts.append(SinkCounts())
        return self.counts[b]

    def count_rows(self, selected: torch.Tensor) -> None:
        """Add the rows an edit selected (bool [b, h, q]) to each batch row's counts, without a device sync."""
        n = selected.flatten(1).sum(1)
        if self._rows is not None and len(self._rows) < len(n):
            self._rows = torch.nn.functional.pad(self._rows, (0, len(n) - len(self._rows)))
        if self._rows is None:
            self._rows = n
        else:
            self._rows = self._rows.to(n.device)
            self._rows[: len(n)] += n
        for b in range(len(n)):
            self.row_counts(b)

    def touches(self, tower: str, layer: int) -> bool:
        return tower == "lm" and layer in self.layers

    def input_layers(self) -> Sequence[int]:
        return self.layers

    def on_pass(self, runner, kwargs: dict) -> None:
        """On the first prefill without given dims: find them from this input's BOS (one side pass)."""
        if self.dims is not None:
            return
        inputs = {k: v for k, v in kwargs.items() if k in _INPUTS and v is not None}
        if "input_ids" not in inputs:
            raise InputError("VAR needs input_ids to find its sink dimensions; or pass VAR(dims=...)")
        out = language_model_output(runner.side_pass(**inputs, output_hidden_states=True, use_cache=False))
        mask = inputs.get("attention_mask")
        first = 0 if mask is None else int(mask[0].float().argmax())
        self.dims = sink_dims_from_states(out.hidden_states, first)

    def layer_input(self, tower: str, layer: int, hidden: torch.Tensor, ctx: BatchContext) -> None:
        if ctx.step > 0 or self.dims is None:
            return  # decode: the prefill's sinks stay
        phi = sink_scores(hidden, self.dims).cpu()  # [b, n]
        valid = ctx.key_valid[:, -hidden.shape[1] :].cpu()
        self.sinks[layer] = [phi[b][valid[b]] > self.spec.tau for b in range(hidden.shape[0])]
        for b, roles in enumerate(ctx.roles):
            counts = self.row_counts(b)
            counts.prefills += layer == self.layers[0]
            counts.width = hidden.shape[-1]
            image = torch.zeros(len(self.sinks[layer][b]), dtype=torch.bool)
            if "image" in roles.present():
                image[[p for p in roles.positions("image") if p < len(image)]] = True
            counts.add_prefill(layer, phi[b][valid[b]], self.sinks[layer][b], image)

    def edits(self, call: AttentionCall) -> list[GroupEdit]:
        sinks = self.sinks.get(call.layer)
        if sinks is None or not any(s.any() for s in sinks):
            return []
        return [_VAREdit(call, sinks, self)]


def _key_groups(call: AttentionCall, sinks: list[torch.Tensor]):
    """Bool [b, 1, n_k] groups: visual sinks, text sinks, non-sink image keys; and image-query rows."""
    ctx = call.ctx
    b, n_k = ctx.key_valid.shape
    image = torch.zeros(b, n_k, dtype=torch.bool)
    sink = torch.zeros(b, n_k, dtype=torch.bool)
    after_image = torch.zeros(b, call.n_q, dtype=torch.bool)
    for i, roles in enumerate(ctx.roles):
        img_pos = roles.positions("image") if "image" in roles.present() else []
        pos = ctx.key_pos[i]
        real = pos >= 0
        is_image = torch.zeros(len(roles), dtype=torch.bool)
        is_image[list(img_pos)] = True
        flags = torch.zeros(len(roles), dtype=torch.bool)
        flags[: len(sinks[i])] = sinks[i][: len(roles)]
        image[i, real] = is_image[pos[real]]
        sink[i, real] = flags[pos[real]]
        last_image = max(img_pos) if len(img_pos) else len(roles)
        after_image[i] = call.query_pos[i] > last_image
    return (sink & image)[:, None], (sink & ~image)[:, None], (image & ~sink)[:, None], after_image


class _VAREdit(GroupEdit):
    patch: VARPatch | None = None  # whose counts the selected rows are added to (none: not counted)

    def __init__(self, call: AttentionCall, sinks, patch: VARPatch) -> None:
        s_vis, s_txt, non_sink, rows = _key_groups(call, sinks)
        self.groups = (s_vis, s_txt, non_sink)
        self.rows = rows[:, None, :]  # [b, 1, q]
        self.spec, self.keep, self.patch = patch.spec, patch.keep, patch

    def _selected(self, m_svis, m_n):
        m_v = m_svis + m_n
        if self.spec.ratio == "code":
            ratio_ok = m_svis / (m_v + EPS) <= self.spec.rho
        else:
            ratio_ok = m_n / m_v.clamp(min=EPS) >= self.spec.rho
        return self.rows.to(m_n.device) & (m_v >= self.spec.summ) & ratio_ok & (m_n > 0)

    def factors(self, mass, rest):
        m_svis, m_stxt, m_n = mass
        on = self._selected(m_svis, m_n)
        if self.patch is not None:
            self.patch.count_rows(on)
        sink_f = torch.where(on, self.keep, 1.0)
        gain = 1.0 + (1.0 - self.keep) * (m_svis + m_stxt) / m_n.clamp(min=1e-30)
        return [sink_f, sink_f, torch.where(on, gain, 1.0)], torch.ones_like(rest)

    def reference(self, probs: torch.Tensor) -> torch.Tensor:
        """The official code's loop on explicit rows [b, h, q, k]."""
        s_vis, s_txt, non_sink = (g[:, 0] for g in self.groups)
        out = probs.clone()
        b, h, n_q, _ = probs.shape
        for i in range(b):
            image = s_vis[i] | non_sink[i]
            sink = s_vis[i] | s_txt[i]
            for head in range(h):
                for q in range(n_q):
                    if not self.rows[i, 0, q]:
                        continue
                    row = probs[i, head, q]
                    summ = row[image].sum()
                    portion = row[s_vis[i]].sum() / (summ + EPS)
                    share_ok = (
                        portion <= self.spec.rho
                        if self.spec.ratio == "code"
                        else row[non_sink[i]].sum() / max(summ, EPS) >= self.spec.rho
                    )
                    mass_n = row[non_sink[i]].sum()
                    if summ < self.spec.summ or not share_ok or mass_n <= 0:
                        continue
                    if self.patch is not None:
                        self.patch.row_counts(i).rows += 1
                    omega = (1.0 - self.keep) * row[sink].sum()
                    new = row.clone()
                    new[sink] = self.keep * row[sink]
                    new[non_sink[i]] = row[non_sink[i]] + omega * row[non_sink[i]] / mass_n
                    out[i, head, q] = new
        return out
