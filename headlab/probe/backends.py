"""Two more capture backends for users who live there: TransformerLens 4's TransformerBridge and nnsight.

Both run the model with eager attention and hand headlab full [q, k] patterns and per-head outputs z;
headlab turns them into the same `Record` as `capture` (statistics through the explicit-pattern reference,
`stats.from_probs`, the oracle the fused engine is tested against). They hold O(layers * heads * n^2)
memory, as those tools do, so they are for cross-checking and for workflows built on them, not for long
context. Text LLMs (the language-model tower) only.

    rec = capture_transformer_lens(lm, inputs)               # TransformerBridge.run_with_cache
    rec = capture_nnsight(lm, inputs, remote=False)          # nnsight LanguageModel.trace(...).save()

`remote=True` runs the nnsight trace on NDIF (needs an NDIF API key and a hub-hosted model: pass an
nnsight model of it as `model=`, e.g. `LanguageModel("<hub id>")`); the flag is passed through unchanged.
The `lm` then only describes the model (its towers, head counts, module paths): `hl.describe` of a weightless
skeleton built from the config on the meta device serves (README "Remote models on NDIF").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from headlab.errors import UnsupportedModelError
from headlab.loading import Family, LoadedModel
from headlab.probe import stats as S
from headlab.probe.context import BatchContext, text_context
from headlab.probe.record import AttentionRows, HeadOutputs, Record
from headlab.probe.select import Select, Stats

_OUT_PROJ = ("o_proj", "c_proj", "out_proj")


def record_from_patterns(
    lm: LoadedModel,
    ctx: BatchContext,
    probs: list[torch.Tensor],
    z: list[torch.Tensor],
    *,
    stats: Stats | None,
    patterns: Select | None,
    head_outputs: Select | None,
) -> Record:
    """A Record from explicit per-layer patterns [batch, head, q, k] and head outputs [batch, q, head, d]."""
    record = Record()
    for ex, r in zip(ctx.examples, ctx.roles, strict=True):
        record._examples.append(
            {"example": ex, "tower": "lm", "n_tokens": len(r), "roles": ",".join(r.present())}
        )
    n_q = ctx.n_keys
    alpha_pos = S.alpha_keys(ctx, stats.first_k) if stats is not None and "alpha" in stats.which else None
    for layer, (p, zl) in enumerate(zip(probs, z, strict=True)):
        p = p.float() * ctx.key_valid[:, None, None, :]  # pads are never attended
        if stats is not None:
            per_query = S.from_probs(p, ctx, stats, causal=True, alpha_pos=alpha_pos)
            record._stat_chunks.append(
                S.reduce(per_query, ctx, stats, layer=layer, causal=True, alpha_pos=alpha_pos, keep=None)
            )
        for b, example in enumerate(ctx.examples):
            valid = ctx.key_valid[b]
            if patterns is not None and layer in patterns.layer_ids(len(probs)):
                positions, idx = ctx.call_queries(b, n_q, patterns.queries)
                for h in patterns.head_ids(p.shape[1]):
                    rows = p[b, h][idx][:, valid]
                    record.patterns.append(AttentionRows(example, "lm", 0, layer, h, tuple(positions), rows))
            if head_outputs is not None and layer in head_outputs.layer_ids(len(probs)):
                queries = head_outputs.queries if head_outputs.queries is not None else (-1,)
                positions, idx = ctx.call_queries(b, n_q, queries)
                heads = head_outputs.head_ids(zl.shape[2])
                sel = zl[b][idx][:, list(heads)].detach().float()
                record.head_outputs.append(HeadOutputs(example, "lm", 0, layer, heads, tuple(positions), sel))
    return record


def _check(lm: LoadedModel) -> None:
    if lm.family is not Family.LLM:
        raise UnsupportedModelError(
            f"the TransformerLens and nnsight backends cover text LLMs; {lm.model_type} is a {lm.family.value} "
            "model: use headlab.capture, which covers every tower"
        )


def capture_transformer_lens(
    lm: LoadedModel,
    inputs: Mapping[str, torch.Tensor],
    *,
    stats: Stats | None = Stats(),
    patterns: Select | None = None,
    head_outputs: Select | None = None,
    bridge=None,
) -> Record:
    """Capture through TransformerLens 4 (`run_with_cache` on hook_pattern and hook_z).

    `bridge`: an existing TransformerBridge of the same model; by default one is booted from `lm.source`
    (the bridge swaps submodules in place, so it never wraps `lm.model` itself).
    """
    _check(lm)
    from transformer_lens.model_bridge import TransformerBridge

    if bridge is None:
        bridge = TransformerBridge.boot_transformers(lm.source, tokenizer=lm.tokenizer, device="cpu")
    names = [f"blocks.{i}.attn.hook_{k}" for i in range(lm.n_layers) for k in ("pattern", "z")]
    mask = inputs.get("attention_mask")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(
            inputs["input_ids"], attention_mask=mask, names_filter=lambda n: n in names
        )
    probs = [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(lm.n_layers)]
    z = [cache[f"blocks.{i}.attn.hook_z"] for i in range(lm.n_layers)]
    ctx = text_context(inputs["input_ids"], mask, examples=tuple(range(len(inputs["input_ids"]))), pass_id=0)
    return record_from_patterns(lm, ctx, probs, z, stats=stats, patterns=patterns, head_outputs=head_outputs)


def _envoy(root, path: str):
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def capture_nnsight(
    lm: LoadedModel,
    inputs: Mapping[str, torch.Tensor],
    *,
    stats: Stats | None = Stats(),
    patterns: Select | None = None,
    head_outputs: Select | None = None,
    remote: bool = False,
    model=None,
) -> Record:
    """Capture through nnsight: one `trace` saving every layer's attention weights and o_proj input.

    The model runs with eager attention inside the trace (switched back afterwards).
    """
    _check(lm)
    from nnsight import NNsight

    names = {m: n for n, m in lm.model.named_modules()}
    attn_paths = [names[m] for m in lm.attention_modules["lm"]]
    proj = next(c for c in _OUT_PROJ if hasattr(lm.attention_modules["lm"][0], c))
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        # NNsight passes the inputs to forward unchanged (LanguageModel would re-derive position ids).
        wrapped = model if model is not None else NNsight(lm.model)
        saved_z, saved_p = [], []
        with torch.no_grad(), wrapped.trace(**inputs, remote=remote):
            for path in attn_paths:
                attn = _envoy(wrapped, path)
                saved_z.append(getattr(attn, proj).input.save())  # o_proj runs before the module returns
                saved_p.append(attn.output[1].save())
    finally:
        lm.model.set_attn_implementation(before)
    if any(p is None for p in saved_p):
        raise UnsupportedModelError(
            "the traced model returned no attention weights: it ran with SDPA or flash attention, which do "
            "not compute them; pass an nnsight model loaded with attn_implementation='eager' as model= (on "
            "NDIF, a deployment that serves eager attention)"
        )
    batch, n = inputs["input_ids"].shape
    z = [t.reshape(batch, n, lm.n_heads, lm.head_dim) for t in saved_z]
    ctx = text_context(
        inputs["input_ids"], inputs.get("attention_mask"), examples=tuple(range(batch)), pass_id=0
    )
    return record_from_patterns(
        lm, ctx, list(saved_p), z, stats=stats, patterns=patterns, head_outputs=head_outputs
    )
