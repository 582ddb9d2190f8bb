"""The intervention runtime: `intervene(lm, *interventions)` and what each intervention plugs into.

An intervention is a frozen dataclass with its paper's defaults. `bind(lm)` turns it into a `Patch` that the
headlab attention function consults on every attention call of the layers it touches. A patch can:

- `edits(call)`: post-softmax redistributions between key groups (ACT, VAR). Each `GroupEdit` names disjoint
  key groups and, per query row, a factor for each group and one for the other keys. They are applied
  exactly without the [q, k] pattern: keys are split into atoms (the intersections of every edit's groups),
  ONE fused attention with the atoms as key classes (`kernels.fused_attention`: Triton on CUDA, augmented
  values through SDPA on the CPU) returns each atom's mass and output (sum_j a_ij v_j), and each
  edit rescales atoms in turn, so edits of several interventions compose in order (`grouped_attention`).
  Every edit also has `reference(probs)`, the paper's rule written on explicit rows (the oracle).
- `transform(call, out)`: edits of the head outputs before o_proj (VHR, head ablation and scaling); a
  patch whose transform is a per-head factor also says so in `head_scale(call)`, and when every patch of a
  call does, the runner folds the factors into the fused kernel's epilogue (one pass, no extra op).
- `replace(call)`: compute the attention itself (PINE: per-query positions and segment masks); it needs
  every key, so a decode step whose sliding-window cache evicted keys is refused for such a patch.
- `score_boost(call)`: PAI's pre-softmax boost s <- s + c_j |s| on some query rows (PAINT), a
  `kernels.spec.ScoreBoost`. When it names at most one row per batch row (PAINT's last query), every other
  row comes from the plain fused call and only the boosted rows are recomputed explicitly (O(k) per head);
  group edits then act on the boosted rows' atom masses and outputs, and head scales multiply after, so
  PAINT composes exactly with VAR/ACT and VHR. Two boosting patches on one call, or a boost with an
  attention-replacing patch (PINE), are refused.
- `on_pass(runner, kwargs)`: run before each forward pass of the model (VHR's first-step selection).
- `on_output(runner, kwargs, output)`: see (and edit) the model's output of each forward pass (PAI's CFG
  logit refinement); side passes are not shown.

An intervene block is an `Editor` of the model's attention session (headlab.probe.session): the session
builds each `AttentionCall` once and runs captures' observers before and after these edits. A patch's own
passes go through `Runner.side_pass`; a branch with a KV cache of its own (PAI's text-only branch) runs them
inside `Runner.aside(contexts)`, where no patch of the block acts and the branch's passes are tracked apart.
- `layer_input(tower, layer, hidden, ctx)`: see the residual stream entering a layer (VAR's sink tokens).

On exit the model is as it was, also after an exception. A `capture` opened inside or around `intervene`
records the attention the model computed before the edits (statistics, patterns, compact attention) and
the head outputs after them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from torch.nn import functional as F

from headlab.errors import SelectionError, UnsupportedModelError
from headlab.kernels.fused import fused_attention, keep_rows
from headlab.kernels.rebuild import rows_from_lse
from headlab.kernels.reference import expand_kv, naive_attention
from headlab.kernels.spec import FusedSpec, ScoreBoost
from headlab.loading import LoadedModel
from headlab.probe.call import AttentionCall
from headlab.probe.context import BatchContext
from headlab.probe.passes import PassContexts
from headlab.probe.session import Editor, Session, in_session


class GroupEdit:
    """A post-softmax redistribution between disjoint key groups, exact in group masses and outputs.

    `groups`: bool tensors [b, 1 or h, n_k] (disjoint). `factors(mass)` gets each group's current mass
    [b, h, q] (and `rest`, the mass on the other keys) and returns a factor per group plus one for the rest
    (tensors broadcastable to [b, h, q]); every key of a group is multiplied by its group's factor.
    `reference(probs)` applies the paper's rule to explicit rows [b, h, q, k] (the oracle).
    """

    groups: tuple[torch.Tensor, ...] = ()

    def factors(self, mass: list[torch.Tensor], rest: torch.Tensor):
        raise NotImplementedError

    def reference(self, probs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Patch:
    """What one bound intervention does; every hook is optional."""

    tower: str = "lm"

    def touches(self, tower: str, layer: int) -> bool:
        return tower == self.tower

    def edits(self, call: AttentionCall) -> list[GroupEdit]:
        return []

    def transform(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        return out

    def head_scale(self, call: AttentionCall) -> torch.Tensor | None:
        """[b or 1, h] factors when this call's `transform` is exactly out * factor per head (None
        otherwise): the runner then folds them into the fused kernel and skips `transform`."""
        return None

    def replace(self, call: AttentionCall) -> torch.Tensor | None:
        return None

    def score_boost(self, call: AttentionCall) -> ScoreBoost | None:
        """A pre-softmax boost of this call's scores (PAINT), or None (module docstring)."""
        return None

    def on_pass(self, runner: Runner, kwargs: dict) -> None:
        return None

    def on_output(self, runner: Runner, kwargs: dict, output) -> None:
        """Called with the model's output after each forward pass of the block (not its side passes)."""
        return None

    def input_layers(self) -> Sequence[int]:
        return ()

    def layer_input(self, tower: str, layer: int, hidden: torch.Tensor, ctx: BatchContext) -> None:
        return None


class Intervention:
    """Base of the intervention dataclasses: `bind(lm)` -> Patch."""

    def bind(self, lm: LoadedModel) -> Patch:
        raise NotImplementedError


_EXPLICIT_SHARE = 0.25  # grouped keys up to this share of all keys: their probabilities are rebuilt
_TILE = 256  # query rows per explicit tile


def grouped_attention(
    call: AttentionCall, edits: Sequence[GroupEdit], boost: ScoreBoost | None = None
) -> torch.Tensor:
    """Attention with `edits` applied in order, exactly, from atom masses and outputs: [b, h, q, d_v] fp32.
    With a `boost` (PAINT), the boosted rows' atom masses and outputs are those of the boosted scores.

    Atoms are the key sets with the same membership in every edit's groups; atom 0 holds the keys in no
    group. Two exact ways to get each atom's mass and output, picked by the share of grouped keys:
    - few grouped keys (sinks, an image span; the usual case): the plain fused attention gives the output
      and the row logsumexp; the grouped keys' probabilities are rebuilt from it in query tiles (O(tile x
      grouped) memory) and atom 0 is the remainder (mass 1 - the others, output o - the others);
    - otherwise: ONE fused attention with the atoms as key classes, returning their masses and outputs.
    """
    b, h, n_k = call.q.shape[0], call.n_heads, call.k.shape[2]
    device = call.q.device
    groups = [g.to(device).expand(b, h, n_k) for e in edits for g in e.groups]
    if not groups:
        return call.plain[0] if boost is None else boosted_attention(call, boost)
    if len(groups) > 20:
        raise SelectionError(f"{len(groups)} key groups in one attention call; headlab supports up to 20")
    code = torch.zeros(b, h, n_k, dtype=torch.long, device=device)
    for i, g in enumerate(groups):
        code |= g.long() << i
    atoms, atom_of = torch.unique(torch.cat([code.new_zeros(1), code.flatten()]), return_inverse=True)
    atom_of = atom_of[1:].view(b, h, n_k)  # atoms[0] == 0: the keys in no group
    grouped = (code != 0).flatten(0, 1).any(0).nonzero().flatten()  # key indices in any group
    if len(grouped) <= _EXPLICIT_SHARE * n_k:
        atom_mass, atom_out = _atoms_from_rows(call, grouped, atom_of[..., grouped], len(atoms))
    else:
        atom_mass, atom_out = _atoms_fused(call, atom_of, len(atoms))
    if boost is not None:
        atom_mass, atom_out = _boosted_atoms(call, boost, atom_of, len(atoms), atom_mass, atom_out)
    first = 0
    for edit in edits:
        member = [((atoms >> (first + i)) & 1).bool() for i in range(len(edit.groups))]  # [A] each
        first += len(edit.groups)
        mass = [(atom_mass * m).sum(-1) for m in member]
        rest_atoms = ~torch.stack(member).any(0)
        per_group, rest = edit.factors(mass, (atom_mass * rest_atoms).sum(-1))
        factor = _as(rest, atom_mass)[..., None] * rest_atoms
        for m, f in zip(member, per_group, strict=True):
            factor = factor + _as(f, atom_mass)[..., None] * m
        atom_mass = atom_mass * factor
        atom_out = atom_out * factor[..., None]
    return atom_out.sum(-2)


def _atoms_fused(call: AttentionCall, atom_of: torch.Tensor, n_atoms: int):
    """Atom masses [b, h, q, A] and outputs [b, h, q, A, d]: one fused call with the atoms as key classes."""
    att = fused_attention(
        call.q, call.k, call.v, call.spec(key_class=atom_of, n_classes=n_atoms, class_outputs=True)
    )
    return att.class_mass, att.class_out


def _atoms_from_rows(call: AttentionCall, keys: torch.Tensor, atom_of: torch.Tensor, n_atoms: int):
    """Atom masses [b, h, q, A] and outputs [b, h, q, A, d] with the grouped `keys`' probabilities rebuilt
    from the plain attention's logsumexp; atom 0 is what the plain row has left."""
    out, lse = call.plain
    h, n_q, n_k = call.n_heads, call.n_q, call.k.shape[2]
    k = expand_kv(call.k, h)[:, :, keys].float()
    v = expand_kv(call.v, h)[:, :, keys].float()
    onehot = F.one_hot(atom_of, n_atoms).float()
    onehot[..., 0] = 0.0  # atom 0 comes from the remainder
    mask = call.mask
    if mask is not None and mask.shape[-2] not in (1, n_q):
        mask = mask[..., -n_q:, :]
    q_pos = torch.arange(n_k - n_q, n_k, device=keys.device)
    b = out.shape[0]
    mass = out.new_zeros(b, h, n_q, n_atoms)
    outs = out.new_zeros(b, h, n_q, n_atoms, out.shape[-1])
    finite = torch.isfinite(lse)
    for t0 in range(0, n_q, _TILE):
        t1 = min(n_q, t0 + _TILE)
        scores = call.scores(call.q[:, :, t0:t1], k)  # [b, h, t, g]
        allowed = finite[:, :, t0:t1, None].expand_as(scores)
        if mask is not None:
            allowed = allowed & (mask[..., keys] if mask.shape[-2] == 1 else mask[..., t0:t1, :][..., keys])
        if call.causal:
            allowed = allowed & (keys[None, :] <= q_pos[t0:t1, None])
        probs = rows_from_lse(scores, lse[:, :, t0:t1], keep=allowed)
        mass[:, :, t0:t1] = probs @ onehot
        outs[:, :, t0:t1] = torch.einsum("bhtg,bhga,bhgd->bhtad", probs, onehot, v)
    mass[..., 0] = finite.float() - mass.sum(-1)
    outs[..., 0, :] = out - outs.sum(-2)
    return mass, outs


def boosted_rows(call: AttentionCall, boost: ScoreBoost) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row index [b], has a boosted row [b]) when `boost` names at most one query row per batch row (PAINT's
    last query); None when some batch row has several (then the whole call is computed with the boost)."""
    b, n_q = call.q.shape[0], call.n_q
    rows = torch.ones(1, n_q, dtype=torch.bool) if boost.rows is None else boost.rows
    rows = rows.to(call.q.device).expand(b, n_q)
    if bool((rows.sum(-1) > 1).any()):
        return None
    return rows.long().argmax(-1), rows.any(-1)


def _row_spec(call: AttentionCall, boost: ScoreBoost, index: torch.Tensor, **extra) -> FusedSpec:
    """The spec of one query row per batch row (`index` [b] among the call's queries), its keys' masks and
    bias as the full call has them for that row, with the boost on it (a 1-row call sits at the last key,
    so causality is carried by the row's mask, not by `causal`)."""
    b, n_q, n_k, device = call.q.shape[0], call.n_q, call.k.shape[2], call.q.device
    unique, which = torch.unique(index, return_inverse=True)
    keep = keep_rows(call.spec(), unique, n_q, n_k, device)  # [b|1, h|1, U, k] or None
    batch = torch.arange(b, device=device)
    mask = None if keep is None else keep.expand(b, -1, -1, -1)[batch, :, which][:, :, None]
    bias = None
    if call.bias is not None:
        full = call.bias.float().to(device)
        full = full.reshape((1,) * (4 - full.dim()) + tuple(full.shape)).expand(b, -1, -1, -1)
        bias = full if full.shape[2] == 1 else full[..., -n_q:, :][batch, :, index][:, :, None]
    return FusedSpec(
        scale=call.scale,
        softcap=call.softcap,
        mask=mask,
        bias=bias,
        boost=ScoreBoost(coef=boost.coef),
        **extra,
    )


def _row_queries(call: AttentionCall, index: torch.Tensor) -> torch.Tensor:
    batch = torch.arange(call.q.shape[0], device=call.q.device)
    return call.q[batch, :, index][:, :, None]  # [b, h, 1, d]


def boosted_attention(
    call: AttentionCall, boost: ScoreBoost, head_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The output [b, h, q, d_v] fp32 of `call` with `boost` on its scores (and `head_scale` folded in):
    the plain fused call for every row, then only the boosted rows recomputed explicitly (O(k) per head;
    module docstring); a boost on several rows of one batch row computes the whole call with it."""
    spec = call.spec(head_scale=head_scale)
    picked = boosted_rows(call, boost)
    if picked is None:
        return fused_attention(call.q, call.k, call.v, replace(spec, boost=boost)).out.float()
    index, has = picked
    plain = call.plain[0] if head_scale is None else None  # the unscaled output is shared with observers
    out = plain if plain is not None else fused_attention(call.q, call.k, call.v, spec).out.float()
    if not bool(has.any()):
        return out
    row_spec = _row_spec(call, boost, index, head_scale=head_scale)
    row = fused_attention(_row_queries(call, index), call.k, call.v, row_spec, backend="tiled").out.float()
    out = out.clone()
    batch = torch.arange(out.shape[0], device=out.device)[has]
    out[batch, :, index[has]] = row[has, :, 0]
    return out


def _boosted_atoms(call, boost: ScoreBoost, atom_of, n_atoms: int, atom_mass, atom_out):
    """Atom masses and outputs with the boosted rows' replaced by those of the boosted scores."""
    picked = boosted_rows(call, boost)
    if picked is None:
        att = fused_attention(
            call.q,
            call.k,
            call.v,
            call.spec(key_class=atom_of, n_classes=n_atoms, class_outputs=True, boost=boost),
        )
        return att.class_mass, att.class_out
    index, has = picked
    if not bool(has.any()):
        return atom_mass, atom_out
    spec = _row_spec(call, boost, index, key_class=atom_of, n_classes=n_atoms, class_outputs=True)
    att = fused_attention(_row_queries(call, index), call.k, call.v, spec, backend="tiled")
    atom_mass, atom_out = atom_mass.clone(), atom_out.clone()
    batch = torch.arange(atom_mass.shape[0], device=atom_mass.device)[has]
    atom_mass[batch, :, index[has]] = att.class_mass[has, :, 0]
    atom_out[batch, :, index[has]] = att.class_out[has, :, 0]
    return atom_mass, atom_out


def _as(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).expand(like.shape[:-1])


def reference_attention(
    call: AttentionCall, edits: Sequence[GroupEdit], boost: ScoreBoost | None = None
) -> torch.Tensor:
    """The oracle: explicit probabilities (the `boost` on the explicit scores, PAINT), each edit's paper rule
    on the rows, then probs @ V."""
    if boost is None:
        probs = call.probs()
    else:
        mask = call.mask if call.bias is None else call.raw_mask
        rows = boost.rows
        probs = naive_attention(
            call.q,
            call.k,
            call.v,
            mask=mask,
            scale=call.scale,
            causal=call.causal,
            softcap=call.softcap,
            boost=ScoreBoost(
                coef=boost.coef, rows=None if rows is None else rows.expand(call.q.shape[0], -1)
            ),
        ).probs
    for edit in edits:
        probs = edit.reference(probs)
    return probs @ expand_kv(call.v, call.n_heads).float()


def edited_attention(call: AttentionCall, patches: Sequence[Patch], engine: str) -> torch.Tensor:
    """The output [b, h, q, d_v] fp32 of `call` under `patches` (those touching its layer, in order):
    a replacement (PINE) or the group edits (ACT, VAR) applied exactly, then the output transforms (VHR,
    head ablation), with pure head scales folded into one fused call when nothing else edits."""
    out = None
    for p in patches:
        out = _replacement(p, call)
        if out is not None:
            break
    edits = [e for p in patches for e in p.edits(call)]
    boost = _the_boost(call, patches, replaced=out is not None)
    if call.bias is not None and (out is not None or edits):
        raise UnsupportedModelError(
            f"{call.tower} layer {call.layer} adds a score bias (a relative position bias) to its scores; "
            "interventions that edit the attention rows (ACT, VAR, PINE) do not apply it yet: use head "
            "scaling / ablation or VHR there"
        )
    if out is not None and edits:
        raise SelectionError(
            "an attention-replacing intervention (PINE) cannot be combined with ACT/VAR edits"
        )
    scales = [p.head_scale(call) for p in patches] if out is None and not edits else []
    if scales and engine == "fused" and all(s is not None for s in scales):
        # only head scales: one fused call applies their product in its epilogue
        product = torch.stack([s.expand(call.q.shape[0], -1).float() for s in scales]).prod(0)
        if boost is not None:
            return boosted_attention(call, boost, head_scale=product)
        return fused_attention(call.q, call.k, call.v, call.spec(head_scale=product)).out.float()
    if out is None:
        if engine == "reference":
            out = reference_attention(call, edits, boost)
        else:
            out = grouped_attention(call, edits, boost)
    for p in patches:
        out = p.transform(call, out)
    return out


def _the_boost(call: AttentionCall, patches: Sequence[Patch], *, replaced: bool) -> ScoreBoost | None:
    """The one score boost of the call's patches (PAINT), or None; two, or one with PINE, are refused."""
    boosts = [b for b in (p.score_boost(call) for p in patches) if b is not None]
    if len(boosts) > 1:
        raise SelectionError(
            f"{len(boosts)} interventions boost the scores of {call.tower} layer {call.layer}; boosts do not "
            "compose (s + a|s| then + b|s'| is not s + (a+b)|s|): use one PAINT per intervene block"
        )
    if boosts and replaced:
        raise SelectionError(
            "an attention-replacing intervention (PINE) cannot be combined with a score boost (PAINT): PINE "
            "recomputes the scores with its own positions"
        )
    return boosts[0] if boosts else None


def _replacement(patch: Patch, call: AttentionCall) -> torch.Tensor | None:
    """`patch.replace(call)`. A patch that replaces the attention (PINE) recomputes it from the positions of
    every token, so a call whose sliding-window cache evicted the first tokens is refused."""
    if call.key_start and type(patch).replace is not Patch.replace:
        raise UnsupportedModelError(
            "an attention-replacing intervention (PINE) needs every token of the sequence, but the sliding "
            f"window KV cache of layer {call.layer} has evicted the first {call.key_start} token columns; keep "
            "prompt plus generated tokens within the window, or use a model without a sliding window"
        )
    return patch.replace(call)


class Runner(Editor):
    """An intervene block: its patches, as an editor of the model's attention session."""

    def __init__(self, lm: LoadedModel, patches: list[Patch], engine: str) -> None:
        if engine not in ("fused", "reference"):
            raise SelectionError(f"engine must be 'fused' or 'reference', got {engine!r}")
        if lm.tensor_parallel is not None:
            raise UnsupportedModelError(
                "this model is tensor parallel (each rank computes a share of the heads); headlab's "
                "interventions edit or select heads across the whole layer and do not run sharded yet: load it "
                "on one device, or spread it with device_map"
            )
        self.lm, self.patches, self.engine = lm, patches, engine
        self.contexts = PassContexts(lm)
        self.session: Session | None = None  # set by intervene() when the block enters the session
        self.suspended = False  # True during a branch run without the block's patches (`aside`)

    @property
    def calibrating(self) -> bool:
        """True while a patch runs its own forward pass (`side_pass`)."""
        return self.session is not None and self.session.calibrating

    def on_pass(self, kwargs: dict) -> None:
        if not self.calibrating:  # a patch's own passes (VHR's selection) run before this pass's contexts
            for p in self.patches:
                p.on_pass(self, kwargs)

    def on_model_call(self, module, args, kwargs) -> None:
        self.contexts.on_model_call(module, args, kwargs)

    def side_pass(self, **inputs):
        """Run the model on `inputs` for a patch's own purposes (e.g. VHR's selection pass): the editors
        serve it (patches see `runner.calibrating`), no capture records it."""
        return self.session.side_pass(**inputs)

    def view(self, call: AttentionCall) -> AttentionCall:
        return call.with_context(self.contexts.call_context(call))

    def active(self, call: AttentionCall) -> list[Patch]:
        if self.suspended:
            return []
        return [p for p in self.patches if p.touches(call.tower, call.layer)]

    @contextmanager
    def aside(self, contexts: PassContexts) -> Iterator[None]:
        """Side passes of a branch of their own (PAI's text-only branch): none of the block's patches acts,
        and the branch's passes are tracked by `contexts` (its own KV cache), not the block's."""
        saved = self.contexts, self.suspended
        self.contexts, self.suspended = contexts, True
        try:
            yield
        finally:
            self.contexts, self.suspended = saved

    def output_hook(self, module, args, kwargs, output):
        if not self.calibrating and not self.suspended:
            for p in self.patches:
                p.on_output(self, kwargs, output)
        return output

    def layer_hook(self, tower: str, layer: int):
        def hook(module, args, kwargs):
            if self.suspended:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            ctx = self.contexts.context(tower, hidden.shape[0], hidden.shape[1])
            for p in self.patches:
                if layer in p.input_layers() and p.tower == tower:
                    p.layer_input(tower, layer, hidden, ctx)

        return hook


@contextmanager
def intervene(lm: LoadedModel, *interventions: Intervention, engine: str = "fused") -> Iterator[Runner]:
    """Apply `interventions` (in order) to every forward pass and `generate` step inside the block.

        with hl.intervene(lm, hl.VHR(alpha=2.0), hl.VAR(p=0.6, rho=0.5)):
            out = lm.model.generate(**inputs)

    engine: "fused" (exact, no [q, k] pattern) or "reference" (explicit patterns, the oracle). Blocks
    nest: an inner block's patches apply after the outer one's; a capture opened inside or around the
    block records the attention before the edits and the head outputs after them.
    """
    if not interventions:
        raise SelectionError("intervene() needs at least one intervention")
    patches = [i.bind(lm) for i in interventions]
    runner = Runner(lm, patches, engine)
    with ExitStack() as stack:
        runner.session = stack.enter_context(in_session(lm, runner))
        if any(type(p).on_output is not Patch.on_output for p in patches):
            h = lm.model.register_forward_hook(runner.output_hook, with_kwargs=True)
            stack.callback(h.remove)
        for p in patches:
            for layer in p.input_layers():
                h = lm.layer_modules[p.tower][layer].register_forward_pre_hook(
                    runner.layer_hook(p.tower, layer), with_kwargs=True
                )
                stack.callback(h.remove)
        yield runner
