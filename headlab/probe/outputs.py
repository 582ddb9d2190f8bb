"""The one head-output recorder: what each attention call's heads hand on to the output projection.

A head's output z is its softmax(QK^T)V slice before o_proj, [b, q, d_head] per head. `HeadOutputRecorder`
is an observer of the attention session (headlab.probe.session) that sees z after every edit of the open
intervene blocks, i.e. the outputs the model goes on with. Its users:
- `capture(head_outputs=Select(...))` turns each call into per-example `HeadOutputs` at the selected
  query positions (the `on_call` callback);
- `record_head_outputs(lm, ...)` keeps each layer's latest call (`latest`: z in call coordinates, with
  q and per-head k, v on request) and lays it out at example positions (`table`): resample ablation,
  activation patching and VHR's reference read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from headlab.kernels.reference import expand_kv
from headlab.loading import LoadedModel
from headlab.probe.call import AttentionCall
from headlab.probe.context import BatchContext
from headlab.probe.passes import PassContexts
from headlab.probe.session import Observer, in_session


@dataclass(frozen=True)
class TappedCall:
    """One recorded call: z [b, h, q, d] fp32 (detached), its batch context, and with `qkv` the call's q
    [b, h, q, d] and per-head k, v [b, h, k, d]."""

    ctx: BatchContext
    z: torch.Tensor
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class HeadOutputRecorder(Observer):
    """Records head outputs of `layers` of `tower` (every layer: None) after the edits of each call."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        tower: str,
        layers: Sequence[int] | None,
        qkv: bool = False,
        contexts: PassContexts | None = None,
        on_call: Callable[[int, TappedCall], None] | None = None,
    ) -> None:
        self.lm, self.tower, self.qkv = lm, tower, qkv
        self.layers = None if layers is None else frozenset(layers)
        self.contexts = contexts if contexts is not None else PassContexts(lm)
        self.owns_contexts = contexts is None  # a capture shares its own contexts and builds them itself
        self.on_call = on_call
        self.found: dict[int, TappedCall] = {}

    def on_model_call(self, module, args, kwargs) -> None:
        if self.owns_contexts:
            self.contexts.on_model_call(module, args, kwargs)

    def wants_output(self, call: AttentionCall) -> bool:
        return call.tower == self.tower and (self.layers is None or call.layer in self.layers)

    def observed(self, call: AttentionCall, out: torch.Tensor) -> None:
        if not self.wants_output(call):
            return
        ctx = self.contexts.call_context(call)
        tapped = TappedCall(ctx, out.detach().float())
        if self.qkv:
            tapped = TappedCall(
                ctx,
                tapped.z,
                call.q.detach(),
                expand_kv(call.k, call.n_heads).detach(),
                expand_kv(call.v, call.n_heads).detach(),
            )
        if self.on_call is not None:
            self.on_call(call.layer, tapped)
        else:
            self.found[call.layer] = tapped

    def latest(self, layer: int) -> TappedCall:
        return self.found[layer]

    # each layer's latest call in call coordinates: z [b, h, q, d]; with qkv, q [b, h, q, d], k, v [b, h, k, d]
    @property
    def z(self) -> dict[int, torch.Tensor]:
        return {layer: t.z for layer, t in self.found.items()}

    @property
    def q(self) -> dict[int, torch.Tensor]:
        return {layer: t.q for layer, t in self.found.items()}

    @property
    def k(self) -> dict[int, torch.Tensor]:
        return {layer: t.k for layer, t in self.found.items()}

    @property
    def v(self) -> dict[int, torch.Tensor]:
        return {layer: t.v for layer, t in self.found.items()}

    def table(self, layer: int) -> torch.Tensor:
        """[b, h, n_tokens, d] head outputs of `layer`'s latest call at example positions (zeros beyond an
        example's length)."""
        tapped = self.found[layer]
        z, ctx = tapped.z, tapped.ctx
        n = max(ctx.lengths)
        table = torch.zeros(z.shape[0], z.shape[1], n, z.shape[-1])
        pos = ctx.key_pos[:, -z.shape[2] :]
        for b in range(z.shape[0]):
            real = pos[b] >= 0
            table[b, :, pos[b][real]] = z[b][:, real].cpu()
        return table


@contextmanager
def record_head_outputs(
    lm: LoadedModel, *, tower: str = "lm", layers: Sequence[int] | None = None, qkv: bool = False
) -> Iterator[HeadOutputRecorder]:
    """Record head outputs (after any edits of open intervene blocks) of every forward pass in the block."""
    recorder = HeadOutputRecorder(lm, tower=tower, layers=layers, qkv=qkv)
    with ExitStack() as stack:
        stack.enter_context(in_session(lm, recorder))
        yield recorder
