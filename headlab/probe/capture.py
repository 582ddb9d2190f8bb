"""`capture(lm, ...)`: record per-head attention statistics (all heads, fused, O(n) memory) and the
selected patterns, head outputs and residuals of every forward pass run inside the block.

Lifetimes: on enter, the capture joins the model's attention session (headlab.probe.session: the first
block switches the model to the "headlab" attention function, tags its attention modules and adds a
pre-hook on the model) as an observer, and adds pre-hooks on the selected layers for residuals. On exit,
also after an exception, all of it is removed and the model is as it was. Observing changes nothing: the
output is the same attention computed by a fused kernel whose extra value columns carry the statistics
(equal to plain SDPA to float tolerance). Inside an intervene block, statistics, rows and compact
attention are those of the attention before the edits; head outputs are those the model goes on with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from torch import nn

from headlab.compat import past_length
from headlab.errors import InputError, SelectionError
from headlab.kernels.fused import fused_attention
from headlab.kernels.rebuild import attention_scores, rows_from_lse
from headlab.kernels.reference import expand_kv, naive_attention
from headlab.loading import Family, LoadedModel
from headlab.probe import stats as S
from headlab.probe.call import AttentionCall
from headlab.probe.context import BatchContext
from headlab.probe.outputs import HeadOutputRecorder, TappedCall
from headlab.probe.passes import PassContexts
from headlab.probe.record import AttentionRows, CompactAttention, HeadOutputs, Record, ResidualRatios
from headlab.probe.roles import TokenRoles
from headlab.probe.select import Select, Stats
from headlab.probe.session import Observer, Session, in_session


def _bias_rows(call: AttentionCall, rows: torch.Tensor, batch_index: int) -> torch.Tensor:
    """Additive float32 bias [head or 1, len(rows), n_k] for query rows `rows` (indices within the call) of
    one example: -inf where a key is dropped, plus the call's score bias (BEiT's, per head); only these rows
    are built (never the [q, k] mask)."""
    n_q, n_k = call.n_q, call.k.shape[2]
    bias = torch.zeros(1, len(rows), n_k)
    if call.bias is not None:  # [head or 1, rows, k]
        extra = call.bias[batch_index if call.bias.shape[0] > 1 else 0].cpu()
        bias = (extra[:, -n_q:][:, rows] if extra.shape[1] != 1 else extra.expand(-1, len(rows), n_k)).clone()
    if call.mask is not None:
        m = call.mask[batch_index if call.mask.shape[0] > 1 else 0, 0]  # [q or 1, k]
        m = m[-n_q:][rows] if m.shape[0] != 1 else m.expand(len(rows), n_k)
        bias = bias.masked_fill(~m.cpu(), float("-inf"))
    if call.causal:  # query row r sits at key position n_k - n_q + r
        beyond = torch.arange(n_k)[None, :] > (n_k - n_q + rows)[:, None]
        bias = bias.masked_fill(beyond, float("-inf"))
    return bias


class Probe(Observer):
    """What one capture block records, as an observer of the model's attention session."""

    def __init__(
        self,
        lm: LoadedModel,
        record: Record,
        *,
        stats: Stats | None,
        patterns: Select | None,
        head_outputs: Select | None,
        residuals: Select | None,
        allow_long: bool,
        engine: str = "fused",
        compact: Select | None = None,
    ) -> None:
        if engine not in ("fused", "reference"):
            raise SelectionError(f"engine must be 'fused' or 'reference', got {engine!r}")
        self.lm, self.record, self.stats, self.engine = lm, record, stats, engine
        self.patterns, self.head_outputs, self.residuals, self.compact = (
            patterns,
            head_outputs,
            residuals,
            compact,
        )
        self.allow_long = allow_long
        for sel in (patterns, head_outputs, residuals, compact):
            if sel is not None:
                tower = lm.tower(sel.tower)
                sel.layer_ids(tower.n_layers)
                sel.head_ids(tower.n_heads)
        if stats is not None and stats.towers is not None:
            for t in stats.towers:
                lm.tower(t)
        self.contexts = PassContexts(lm, on_new=self._log_examples)
        self._outputs = (
            None
            if head_outputs is None
            else HeadOutputRecorder(
                lm,
                tower=head_outputs.tower,
                layers=head_outputs.layer_ids(lm.tower(head_outputs.tower).n_layers),
                contexts=self.contexts,
                on_call=self._record_z,
            )
        )
        self.session: Session | None = None  # set by capture() when the block enters the model's session

    # ----- batch contexts -------------------------------------------------------------------------------
    def use_roles(self, roles: Sequence[TokenRoles]) -> None:
        """Roles for the examples of the next prefill pass (caller-given segments, flagged tokens)."""
        self.contexts.use_roles(roles)

    def _log_examples(self, ctx: BatchContext) -> None:
        for ex, r in zip(ctx.examples, ctx.roles, strict=True):
            self.record._examples.append(
                {"example": ex, "tower": ctx.tower, "n_tokens": len(r), "roles": ",".join(r.present())}
            )

    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pass begins: check its length, then build its batch contexts."""
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if ids is not None and self.lm.family is not Family.VIT:
            self._check_length(past_length(kwargs) + ids.shape[1])
        self.contexts.on_model_call(module, args, kwargs)

    def _check_length(self, n: int) -> None:
        limit = self.lm.tower("lm").max_positions
        if limit is not None and n > limit and not self.allow_long:
            raise InputError(
                f"the input has {n} tokens but {self.lm.model_type} was trained on at most {limit}; shorten it, "
                "or pass allow_long=True to capture() if the model's positions extrapolate (e.g. RoPE)"
            )

    def _view(self, call: AttentionCall) -> AttentionCall:
        return call.with_context(self.contexts.call_context(call))

    # ----- the attention call ---------------------------------------------------------------------------
    def observe(self, call: AttentionCall):
        """Statistics, rows and compact attention of the unedited call; returns its (out, lse) if computed."""
        tower, layer = call.tower, call.layer
        want_stats = self.stats is not None and (self.stats.towers is None or tower in self.stats.towers)
        want_rows = self._selected(self.patterns, tower, layer)
        want_compact = self._selected(self.compact, tower, layer)
        if not (want_stats or want_rows or want_compact):
            return None
        if self.lm.tensor_parallel is not None:
            _check_tensor_parallel(want_rows or want_compact or self._outputs is not None)
        call = self._view(call)
        ctx, q, k, v = call.ctx, call.q, call.k, call.v
        if want_compact and ctx.step == 0:
            _check_rebuildable(self.lm, call)
        if ctx.tiled:
            self.record._tiled = True
            if want_rows or want_compact:
                raise SelectionError(
                    f"the {tower} tower of {self.lm.model_type} sees each image as several tiles (one row each), "
                    "and headlab keeps one pattern per example: select patterns / compact attention of the "
                    "language model (tower='lm'), or load the vision tower alone and capture the tiles"
                )
        scale, causal, softcap, window = call.scale, call.causal, call.softcap, call.window
        if want_stats:
            out, lse = self._attend_with_stats(call)
        else:
            att = fused_attention(q, k, v, call.spec())
            out, lse = att.out, att.lse
        if want_rows:
            self._record_rows(call, lse)
        if want_compact and ctx.step == 0:
            self._record_compact(ctx, layer, q, k, lse, scale, causal, window, softcap)
        return out, lse

    def wants_output(self, call: AttentionCall) -> bool:
        return self._outputs is not None and self._outputs.wants_output(call)

    def observed(self, call: AttentionCall, out: torch.Tensor) -> None:
        """Head outputs: the output the model goes on with (after any intervention's edits)."""
        if self._outputs is not None:
            self._outputs.observed(call, out)

    def _selected(self, sel: Select | None, tower: str, layer: int) -> bool:
        n_layers = self.lm.tower(tower).n_layers
        return sel is not None and sel.tower == tower and layer in sel.layer_ids(n_layers)

    def _attend_with_stats(self, call: AttentionCall):
        """(out, lse) of the call, and its statistics recorded (fused, or explicit for the reference)."""
        spec, ctx, q, k, v, keep = self.stats, call.ctx, call.q, call.k, call.v, call.mask
        alpha_pos = S.alpha_keys(ctx, spec.first_k) if "alpha" in spec.which and ctx.step == 0 else None
        if self.engine == "reference":
            ref = naive_attention(
                q, k, v, mask=call.raw_mask, scale=call.scale, causal=call.causal, softcap=call.softcap
            )
            per_query = S.from_probs(ref.probs, ctx, spec, causal=call.causal, alpha_pos=alpha_pos)
            out, lse = ref.out, ref.lse
        else:
            fspec = S.fused_spec(
                ctx,
                spec,
                n_q=call.n_q,
                scale=call.scale,
                causal=call.causal,
                keep=keep,
                bias=call.bias,
                softcap=call.softcap,
                window=call.window,
            )
            att = fused_attention(q, k, v, fspec)
            out, lse, per_query = att.out, att.lse, S.from_attended(att, ctx, fspec)
            if alpha_pos is not None and alpha_pos.shape[1]:
                per_query.alpha = S.alpha_from_lse(
                    q,
                    k,
                    lse,
                    keep,
                    scale=call.scale,
                    causal=call.causal,
                    ctx=ctx,
                    alpha_pos=alpha_pos,
                    softcap=call.softcap,
                    bias=call.bias,
                )
        if spec.offsets and self.engine != "reference":
            per_query.offset = S.offset_from_lse(
                q,
                k,
                lse,
                keep,
                scale=call.scale,
                ctx=ctx,
                offsets=tuple(spec.offsets),
                softcap=call.softcap,
                bias=call.bias,
            )
        rows = S.reduce(
            per_query,
            ctx,
            spec,
            layer=call.layer,
            causal=call.causal,
            alpha_pos=alpha_pos,
            keep=keep,
            head_offset=call.head_offset,
        )
        self.record._stat_chunks.append(rows)
        return out, lse

    def _record_rows(self, call: AttentionCall, lse: torch.Tensor):
        sel, ctx, q, k, layer = self.patterns, call.ctx, call.q, call.k, call.layer
        heads = sel.head_ids(q.shape[1])
        k_full = expand_kv(k, q.shape[1])
        n_q = call.n_q
        for b, example in enumerate(ctx.examples):
            positions, idx = ctx.call_queries(b, n_q, sel.queries)
            if not idx:
                continue
            rows = torch.tensor(idx)
            bias = _bias_rows(call, rows, b).to(q.device)  # [head or 1, q_sel, k]
            valid = ctx.key_valid[b]
            at = ctx.key_pos[b, valid].to(q.device)  # example positions of the real keys
            for h in heads:
                scores = attention_scores(q[b, h, rows], k_full[b, h], scale=call.scale, softcap=call.softcap)
                kept = rows_from_lse(scores, lse[b, h, rows], bias=bias[h if len(bias) > 1 else 0])[:, valid]
                # a row over every token of the example: keys a cache evicted get 0, as they get no attention
                probs = kept.new_zeros(len(idx), ctx.lengths[b]).index_copy_(1, at, kept)
                self.record.patterns.append(
                    AttentionRows(example, ctx.tower, ctx.step, layer, h, tuple(positions), probs)
                )

    def _record_z(self, layer: int, tapped: TappedCall) -> None:
        """Per-example head outputs of the selected heads and queries (default: the last) of one call."""
        sel, ctx, out = self.head_outputs, tapped.ctx, tapped.z
        heads = list(sel.head_ids(out.shape[1]))
        queries = sel.queries if sel.queries is not None else (-1,)
        for b, example in enumerate(ctx.examples):
            positions, idx = ctx.call_queries(b, out.shape[2], queries)
            if idx:
                z = out[b][heads][:, idx].transpose(0, 1).cpu()  # [q, head, d_head]
                self.record.head_outputs.append(
                    HeadOutputs(example, ctx.tower, ctx.step, layer, tuple(heads), tuple(positions), z)
                )

    def _record_compact(self, ctx, layer, q, k, lse, scale, causal, window, softcap):
        heads = self.compact.head_ids(q.shape[1])
        group = q.shape[1] // k.shape[1]
        for b, example in enumerate(ctx.examples):
            valid = ctx.key_valid[b]
            self.record.compact.append(
                CompactAttention(
                    example,
                    ctx.tower,
                    layer,
                    heads,
                    q[b, list(heads)][:, valid].detach().float().cpu(),
                    k[b][:, valid].detach().float().cpu(),
                    lse[b, list(heads)][:, valid].detach().float().cpu(),
                    float(scale),
                    causal,
                    window,
                    group,
                    softcap,
                )
            )

    # ----- residuals ------------------------------------------------------------------------------------
    def residual_hook(self, tower: str, layer: int):
        def hook(module, args, kwargs):
            if self.session is not None and self.session.calibrating:
                return  # an intervention's own pass (e.g. VHR's selection) is not recorded
            hidden = args[0] if args else kwargs["hidden_states"]
            self._record_residual(tower, layer, hidden)

        return hook

    def _record_residual(self, tower: str, layer: int, hidden: torch.Tensor) -> None:
        batch, n_q, _ = hidden.shape
        ctx = self.contexts.context(tower, batch, n_q)
        x = hidden.detach().float()
        abs_x = x.abs()
        rms = x.pow(2).mean(-1).sqrt()  # [batch, q]
        for b, example in enumerate(ctx.examples):
            positions, idx = ctx.call_queries(b, n_q, self.residuals.queries)
            if not idx:
                continue
            a, r = abs_x[b, idx], rms[b, idx]
            self.record._residual_rows.append(
                {
                    "example": np.full(len(idx), example),
                    "tower": np.full(len(idx), tower, dtype=object),
                    "step": np.full(len(idx), ctx.step),
                    "layer": np.full(len(idx), layer),
                    "position": np.asarray(positions),
                    "norm": x[b, idx].norm(dim=-1).cpu().numpy(),
                    "rms": r.cpu().numpy(),
                    "max_abs": a.max(-1).values.cpu().numpy(),
                    "max_dim": a.argmax(-1).cpu().numpy(),
                    "median_abs": a.median(-1).values.cpu().numpy(),
                }
            )
            self.record.residual_ratios.append(
                ResidualRatios(example, tower, ctx.step, layer, tuple(positions), (a / r[:, None]).cpu())
            )


@contextmanager
def capture(
    lm: LoadedModel,
    *,
    stats: Stats | None = Stats(),
    patterns: Select | None = None,
    head_outputs: Select | None = None,
    residuals: Select | None = None,
    roles: Sequence[TokenRoles] | None = None,
    allow_long: bool = False,
    engine: str = "fused",
    compact: Select | None = None,
) -> Iterator[Record]:
    """Record attention of every forward pass (and `generate` decode step) run inside the block.

        with hl.capture(lm, patterns=hl.Select(layers=[0], heads=[1])) as rec:
            lm.model(**inputs)
        rec.head_stats   # tidy DataFrame for all heads

    stats: per-head statistics for all heads (None to skip). patterns / head_outputs / residuals: what to
    record in full, for the selected layers, heads and query positions. roles: TokenRoles for the examples
    of the first pass (e.g. caller-given segments); for later passes call `rec.use_roles(...)` before them.
    allow_long: allow inputs longer than the model's trained context (for positions that extrapolate).
    compact: layers/heads whose compact attention (post-RoPE q, k and the row logsumexp) is kept, from which
    any of their patterns is rebuilt exactly (`rec.compact[i].rows(head)`, or later from a Store).
    engine: "fused" (default; O(n) memory) or "reference" (eager softmax(QK^T)V with full [q, k] patterns,
    the oracle the fused engine is tested against).
    """
    record = Record()
    probe = Probe(
        lm,
        record,
        stats=stats,
        patterns=patterns,
        head_outputs=head_outputs,
        residuals=residuals,
        allow_long=allow_long,
        engine=engine,
        compact=compact,
    )
    if roles is not None:
        probe.use_roles(roles)
    with ExitStack() as stack:
        probe.session = stack.enter_context(in_session(lm, probe))
        if residuals is not None:
            n_layers = lm.tower(residuals.tower).n_layers
            for layer in residuals.layer_ids(n_layers):
                module = lm.layer_modules[residuals.tower][layer]
                h = module.register_forward_pre_hook(
                    probe.residual_hook(residuals.tower, layer), with_kwargs=True
                )
                stack.callback(h.remove)
        record._probe = probe
        yield record


def _check_rebuildable(lm, call: AttentionCall) -> None:
    """Compact attention rebuilds rows from q, k, the logsumexp and the call's causal / window / full
    structure; a mask that is none of these over the real tokens (Gemma 3: an image's tokens attend both
    ways inside a causal sequence) cannot be rebuilt from them, so it is refused rather than stored wrong."""
    if call.bias is not None:
        raise SelectionError(
            f"compact attention cannot store {lm.model_type}'s {call.tower} layer {call.layer}: its scores carry a "
            "bias (a relative position bias) the store does not keep; select the rows with patterns= instead"
        )
    if call.causal or call.mask is None:
        return
    valid = call.ctx.key_valid.to(call.mask.device)
    real = valid[:, None, -call.n_q :, None] & valid[:, None, None, :]
    if bool((call.mask.expand(real.shape[0], -1, -1, -1) | ~real).all()):
        return  # every real query sees every real key: full attention, as stored
    raise SelectionError(
        f"compact attention cannot store {lm.model_type}'s {call.tower} layer {call.layer}: its mask is neither "
        "causal, windowed nor full (e.g. an image's tokens attend both ways inside a causal sequence), and "
        "the store rebuilds rows from those structures only; select the rows with patterns= instead"
    )


def _check_tensor_parallel(selected: bool) -> None:
    """Under tensor parallelism each rank computes its own heads: statistics need only their global head
    index; patterns, compact attention and head outputs would need the other ranks' heads."""
    if selected:
        raise SelectionError(
            "this model is tensor parallel: each rank computes only its own heads, so capture records per-head "
            "statistics (with global head indices; `Record.gathered()` joins the ranks'); capture patterns, "
            "compact attention or head outputs without tensor parallelism (one device, or device_map)"
        )
