"""`capture(lm, ...)`: record per-head attention statistics (all heads, fused, O(n) memory) and the
selected patterns, head outputs and residuals of every forward pass run inside the block.

Lifetimes: on enter, the model's configs are switched to the "headlab" attention function, each attention
module is tagged with its (tower, layer) and this probe, and hooks are added (a pre-hook on the model that
reads input_ids / attention_mask / KV-cache length to build each pass's token roles, and pre-hooks on the
selected layers for residuals). On exit, also after an exception, all of it is removed and the model is as
it was. Observing changes nothing: the output is the same attention computed by a fused kernel whose
extra value columns carry the statistics (equal to plain SDPA to float tolerance).
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
from headlab.kernels.spec import FusedSpec
from headlab.loading import Family, LoadedModel
from headlab.probe import stats as S
from headlab.probe.attention import keep_mask, plain_attention, switched_to_headlab
from headlab.probe.context import BatchContext, text_context
from headlab.probe.record import AttentionRows, CompactAttention, HeadOutputs, Record, ResidualRatios
from headlab.probe.roles import TokenRoles, grid_roles, text_roles
from headlab.probe.select import Select, Stats


def _bias_rows(mask, rows: torch.Tensor, n_q: int, n_k: int, causal: bool, batch_index: int) -> torch.Tensor:
    """Additive float32 bias [len(rows), n_k] for query rows `rows` (indices within the call) of one example;
    only these rows are built (never the [q, k] mask)."""
    bias = torch.zeros(len(rows), n_k)
    keep = keep_mask(mask)
    if keep is not None:
        m = keep[batch_index if keep.shape[0] > 1 else 0, 0]  # [q or 1, k]
        m = m[-n_q:][rows] if m.shape[0] != 1 else m.expand(len(rows), n_k)
        bias = bias.masked_fill(~m, float("-inf"))
    if causal:  # query row r sits at key position n_k - n_q + r
        beyond = torch.arange(n_k)[None, :] > (n_k - n_q + rows)[:, None]
        bias = bias.masked_fill(beyond, float("-inf"))
    return bias


class Probe:
    """One capture session over a LoadedModel: builds batch contexts and serves every attention call."""

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
        self._pass = 0
        self._next_example = 0
        self._pending: dict[str, BatchContext] = {}
        self._active: dict[str, BatchContext] = {}
        self._roles_override: list[TokenRoles] | None = None
        self._vision_examples: tuple[int, ...] = ()

    # ----- batch contexts -------------------------------------------------------------------------------
    def use_roles(self, roles: Sequence[TokenRoles]) -> None:
        """Roles for the examples of the next prefill pass (caller-given segments, flagged tokens)."""
        self._roles_override = list(roles)

    def _new_examples(self, n: int) -> tuple[int, ...]:
        ids = tuple(range(self._next_example, self._next_example + n))
        self._next_example += n
        return ids

    def _log_examples(self, ctx: BatchContext) -> None:
        for ex, r in zip(ctx.examples, ctx.roles, strict=True):
            self.record._examples.append(
                {"example": ex, "tower": ctx.tower, "n_tokens": len(r), "roles": ",".join(r.present())}
            )

    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the whole model: the token roles of this pass."""
        self._pass += 1
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if self.lm.family is Family.VIT:
            pixels = kwargs.get("pixel_values", ids)
            self._vision_examples = self._new_examples(pixels.shape[0]) if pixels is not None else ()
            return
        if ids is None:
            return  # inputs_embeds only: roles fall back to the default text roles at the first layer
        past = past_length(kwargs)
        mask = kwargs.get("attention_mask")
        n_total = past + ids.shape[1]
        valid = mask.bool() if mask is not None else torch.ones(ids.shape[0], n_total, dtype=torch.bool)
        self._check_length(n_total)
        if past and "lm" in self._active:
            prev = self._active["lm"]
            n_new = ids.shape[1]
            roles = tuple(r.extended(n_new) for r in prev.roles)
            self._pending["lm"] = BatchContext(
                tower="lm",
                step=prev.step + 1,
                pass_id=self._pass,
                examples=prev.examples,
                roles=roles,
                key_valid=valid.cpu(),
            )
            return
        if past:
            raise InputError(
                f"this forward pass continues a KV cache of {past} tokens that was built outside the headlab "
                "block; open capture()/intervene() before the prefill (e.g. run generate() inside the block)"
            )
        examples = self._new_examples(ids.shape[0])
        roles, self._roles_override = self._roles_override, None
        ctx = text_context(
            ids,
            valid,
            examples=examples,
            pass_id=self._pass,
            image_token_id=self.lm.image_token_id,
            roles=None if roles is None else tuple(roles),
        )
        self._pending["lm"] = ctx
        self._log_examples(ctx)
        if self.lm.family is Family.LVLM and kwargs.get("pixel_values") is not None:
            per_image = self.lm.model.config.image_seq_length
            counts = [
                len(r.positions("image")) // per_image if "image" in r.present() else 0 for r in ctx.roles
            ]
            self._vision_examples = tuple(
                ex for ex, c in zip(examples, counts, strict=True) for _ in range(c)
            )

    def _check_length(self, n: int) -> None:
        limit = self.lm.tower("lm").max_positions
        if limit is not None and n > limit and not self.allow_long:
            raise InputError(
                f"the input has {n} tokens but {self.lm.model_type} was trained on at most {limit}; shorten it, "
                "or pass allow_long=True to capture() if the model's positions extrapolate (e.g. RoPE)"
            )

    def context(self, tower: str, batch: int, n_tokens: int) -> BatchContext:
        """The batch context of the current pass through `tower` (built on first use in the pass)."""
        if tower in self._pending:
            self._active[tower] = self._pending.pop(tower)
        ctx = self._active.get(tower)
        if ctx is None or ctx.pass_id != self._pass or ctx.batch != batch:
            ctx = self._default_context(tower, batch, n_tokens)
            self._active[tower] = ctx
            self._log_examples(ctx)
        return ctx

    def _default_context(self, tower: str, batch: int, n_tokens: int) -> BatchContext:
        info = self.lm.tower(tower)
        if tower == "vision":
            examples = (
                self._vision_examples if len(self._vision_examples) == batch else self._new_examples(batch)
            )
            roles = tuple(grid_roles(info.prefix_tokens, info.grid, n_tokens) for _ in range(batch))
        else:
            examples = self._new_examples(batch)
            roles = tuple(text_roles([0] * n_tokens) for _ in range(batch))
        return BatchContext(
            tower=tower,
            step=0,
            pass_id=self._pass,
            examples=examples,
            roles=roles,
            key_valid=torch.ones(batch, n_tokens, dtype=torch.bool),
        )

    # ----- the attention call ---------------------------------------------------------------------------
    def attend(self, module, q, k, v, mask, *, scaling=None, is_causal=None, **kwargs):
        tower, layer = module._headlab_site
        softcap = kwargs.get("softcap")
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))  # also in the mask
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        batch, n_k = q.shape[0], k.shape[2]
        want_stats = self.stats is not None and (self.stats.towers is None or tower in self.stats.towers)
        want_rows = self._selected(self.patterns, tower, layer)
        want_z = self._selected(self.head_outputs, tower, layer)
        want_compact = self._selected(self.compact, tower, layer)
        if not (want_stats or want_rows or want_z or want_compact):
            return plain_attention(module, q, k, v, mask, scaling=scale, is_causal=is_causal, **kwargs)
        ctx = self.context(tower, batch, n_k).fit_keys(n_k)
        if want_stats:
            out, lse = self._attend_with_stats(ctx, layer, q, k, v, mask, scale, causal, softcap, window)
        else:
            spec = FusedSpec(scale=scale, causal=causal, mask=keep_mask(mask), softcap=softcap, window=window)
            att = fused_attention(q, k, v, spec)
            out, lse = att.out, att.lse
        if want_rows:
            self._record_rows(ctx, layer, q, k, lse, mask, scale, causal, softcap)
        if want_z:
            self._record_z(ctx, layer, out)
        if want_compact and ctx.step == 0:
            self._record_compact(ctx, layer, q, k, lse, scale, causal, window, softcap)
        return out.to(v.dtype).transpose(1, 2).contiguous(), None

    def _selected(self, sel: Select | None, tower: str, layer: int) -> bool:
        n_layers = self.lm.tower(tower).n_layers
        return sel is not None and sel.tower == tower and layer in sel.layer_ids(n_layers)

    def _attend_with_stats(self, ctx, layer, q, k, v, mask, scale, causal, softcap, window):
        spec = self.stats
        keep = keep_mask(mask)
        alpha_pos = S.alpha_keys(ctx, spec.first_k) if "alpha" in spec.which and ctx.step == 0 else None
        if self.engine == "reference":
            ref = naive_attention(q, k, v, mask=mask, scale=scale, causal=causal, softcap=softcap)
            per_query = S.from_probs(ref.probs, ctx, spec, causal=causal, alpha_pos=alpha_pos)
            out, lse = ref.out, ref.lse
        else:
            fspec = S.fused_spec(
                ctx,
                spec,
                n_q=q.shape[2],
                scale=scale,
                causal=causal,
                keep=keep,
                softcap=softcap,
                window=window,
            )
            att = fused_attention(q, k, v, fspec)
            out, lse, per_query = att.out, att.lse, S.from_attended(att, ctx, fspec)
            if alpha_pos is not None and alpha_pos.shape[1]:
                per_query.alpha = S.alpha_from_lse(
                    q, k, lse, keep, scale=scale, causal=causal, ctx=ctx, alpha_pos=alpha_pos, softcap=softcap
                )
        rows = S.reduce(per_query, ctx, spec, layer=layer, causal=causal, alpha_pos=alpha_pos, keep=keep)
        self.record._stat_chunks.append(rows)
        return out, lse

    def _record_rows(self, ctx, layer, q, k, lse, mask, scale, causal, softcap):
        sel = self.patterns
        heads = sel.head_ids(q.shape[1])
        k_full = expand_kv(k, q.shape[1])
        n_q, n_k = q.shape[2], k.shape[2]
        for b, example in enumerate(ctx.examples):
            positions, idx = ctx.call_queries(b, n_q, sel.queries)
            if not idx:
                continue
            rows = torch.tensor(idx)
            bias = _bias_rows(mask, rows, n_q, n_k, causal, b)  # [q_sel, k]
            valid = ctx.key_valid[b]
            for h in heads:
                scores = attention_scores(q[b, h, rows], k_full[b, h], scale=scale, softcap=softcap)
                probs = rows_from_lse(scores, lse[b, h, rows], bias=bias)[:, valid]
                self.record.patterns.append(
                    AttentionRows(example, ctx.tower, ctx.step, layer, h, tuple(positions), probs)
                )

    def _record_z(self, ctx, layer, out):
        sel = self.head_outputs
        heads = list(sel.head_ids(out.shape[1]))
        queries = sel.queries if sel.queries is not None else (-1,)
        for b, example in enumerate(ctx.examples):
            positions, idx = ctx.call_queries(b, out.shape[2], queries)
            if idx:
                z = out[b][heads][:, idx].transpose(0, 1).detach().float().cpu()  # [q, head, d_head]
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
            hidden = args[0] if args else kwargs["hidden_states"]
            self._record_residual(tower, layer, hidden)

        return hook

    def _record_residual(self, tower: str, layer: int, hidden: torch.Tensor) -> None:
        batch, n_q, _ = hidden.shape
        ctx = self.context(tower, batch, n_q)
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
    tagged: list[nn.Module] = []
    with ExitStack() as stack:
        stack.enter_context(switched_to_headlab(lm.model))
        handle = lm.model.register_forward_pre_hook(probe.on_model_call, with_kwargs=True)
        stack.callback(handle.remove)
        for tower, modules in lm.attention_modules.items():
            for layer, module in enumerate(modules):
                module._headlab_site, module._headlab_probe = (tower, layer), probe
                tagged.append(module)
        stack.callback(_untag, tagged)
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


def _untag(modules: list[nn.Module]) -> None:
    for m in modules:
        if hasattr(m, "_headlab_probe"):
            delattr(m, "_headlab_probe")
        if hasattr(m, "_headlab_site") and not hasattr(m, "_headlab_runner"):  # intervene() still uses it
            delattr(m, "_headlab_site")
