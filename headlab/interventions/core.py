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
- `replace(call)`: compute the attention itself (PINE: per-query positions and segment masks).
- `on_pass(runner, kwargs)`: run before each forward pass of the model (VHR's first-step selection).
- `layer_input(tower, layer, hidden, ctx)`: see the residual stream entering a layer (VAR's sink tokens).

On exit the model is as it was, also after an exception. A `capture` opened inside `intervene` records the
attention the model computed before the edits (statistics, patterns) next to the edited outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn
from torch.nn import functional as F

from headlab.errors import SelectionError
from headlab.kernels.fused import fused_attention
from headlab.kernels.rebuild import attention_scores, rows_from_lse
from headlab.kernels.reference import expand_kv, naive_attention
from headlab.kernels.spec import FusedSpec
from headlab.loading import LoadedModel
from headlab.probe.attention import keep_mask, switched_to_headlab
from headlab.probe.capture import Probe
from headlab.probe.context import BatchContext
from headlab.probe.record import Record


@dataclass(eq=False)
class AttentionCall:
    """One attention call as the patches see it (q [b, h, q, d]; k, v [b, kv, k, d], post-RoPE)."""

    module: nn.Module
    tower: str
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    causal: bool
    ctx: BatchContext
    kwargs: dict = field(default_factory=dict)
    softcap: float | None = None  # attention logit soft-cap (Gemma 2)

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
        """This call's scores and masks as a FusedSpec, with the statistics `stats` asked for (the sliding
        window is in the mask already; naming it lets a kernel skip the key blocks outside it)."""
        window = self.kwargs.get("sliding_window", getattr(self.module, "sliding_window", None))
        return FusedSpec(
            scale=self.scale, causal=self.causal, mask=self.mask, softcap=self.softcap, window=window, **stats
        )

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Explicit scores [..., q, k] of some queries and keys as this call forms them (scale, soft-cap)."""
        return attention_scores(q, k, scale=self.scale, softcap=self.softcap)

    def probs(self) -> torch.Tensor:
        """The explicit [b, h, q, k] pattern (reference paths and single-row decode steps only)."""
        return naive_attention(
            self.q, self.k, self.v, mask=self.mask, scale=self.scale, causal=self.causal, softcap=self.softcap
        ).probs


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

    def on_pass(self, runner: Runner, kwargs: dict) -> None:
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


def grouped_attention(call: AttentionCall, edits: Sequence[GroupEdit]) -> torch.Tensor:
    """Attention with `edits` applied in order, exactly, from atom masses and outputs: [b, h, q, d_v] fp32.

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
        return call.plain[0]
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


def _as(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).expand(like.shape[:-1])


def reference_attention(call: AttentionCall, edits: Sequence[GroupEdit]) -> torch.Tensor:
    """The oracle: explicit probabilities, each edit's paper rule on the rows, then probs @ V."""
    probs = call.probs()
    for edit in edits:
        probs = edit.reference(probs)
    return probs @ expand_kv(call.v, call.n_heads).float()


class Runner:
    """Serves the attention calls of a model inside `intervene`."""

    def __init__(self, lm: LoadedModel, patches: list[Patch], engine: str) -> None:
        if engine not in ("fused", "reference"):
            raise SelectionError(f"engine must be 'fused' or 'reference', got {engine!r}")
        self.lm, self.patches, self.engine = lm, patches, engine
        self.contexts = Probe(
            lm, Record(), stats=None, patterns=None, head_outputs=None, residuals=None, allow_long=True
        )
        self.calibrating = False  # True while a patch runs its own forward pass from on_pass

    def on_model_call(self, module, args, kwargs) -> None:
        if not self.calibrating:  # a patch's own passes (VHR's selection) run first, then this pass's roles
            for p in self.patches:
                p.on_pass(self, kwargs)
        self.contexts.on_model_call(module, args, kwargs)

    def side_pass(self, **inputs):
        """Run the model on `inputs` for a patch's own purposes (e.g. VHR's selection pass): this runner
        serves it (patches see `runner.calibrating`), a capture open around it does not record it."""
        self.calibrating = True
        try:
            self.contexts.on_model_call(self.lm.model, (), inputs)
            with torch.no_grad():
                return self.lm.model.forward(**inputs)  # forward(): the model-level hooks stay out
        finally:
            self.calibrating = False

    def layer_hook(self, tower: str, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            ctx = self.contexts.context(tower, hidden.shape[0], hidden.shape[1])
            for p in self.patches:
                if layer in p.input_layers() and p.tower == tower:
                    p.layer_input(tower, layer, hidden, ctx)

        return hook

    def attend(self, module, q, k, v, mask, *, scaling=None, is_causal=None, **kwargs):
        tower, layer = module._headlab_site
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        ctx = self.contexts.context(tower, q.shape[0], k.shape[2]).fit_keys(k.shape[2])
        keep = keep_mask(mask)
        call = AttentionCall(
            module, tower, layer, q, k, v, keep, scale, causal, ctx, kwargs, kwargs.get("softcap")
        )
        active = [p for p in self.patches if p.touches(tower, layer)]
        out = None
        for p in active:
            out = p.replace(call)
            if out is not None:
                break
        edits = [e for p in active for e in p.edits(call)]
        if out is not None and edits:
            raise SelectionError(
                "an attention-replacing intervention (PINE) cannot be combined with ACT/VAR edits"
            )
        scales = [p.head_scale(call) for p in active] if out is None and not edits else []
        if scales and self.engine == "fused" and all(s is not None for s in scales):
            # only head scales: one fused call applies their product in its epilogue
            product = torch.stack([s.expand(call.q.shape[0], -1).float() for s in scales]).prod(0)
            out = fused_attention(call.q, call.k, call.v, call.spec(head_scale=product)).out.float()
        else:
            if out is None:
                out = (
                    reference_attention(call, edits)
                    if self.engine == "reference"
                    else grouped_attention(call, edits)
                )
            for p in active:
                out = p.transform(call, out)
        probe = getattr(module, "_headlab_probe", None)
        if probe is not None and not self.calibrating:  # a capture records the attention before the edits
            probe.attend(module, q, k, v, mask, scaling=scaling, is_causal=is_causal, **kwargs)
        return out.to(v.dtype).transpose(1, 2).contiguous(), None


@contextmanager
def intervene(lm: LoadedModel, *interventions: Intervention, engine: str = "fused") -> Iterator[Runner]:
    """Apply `interventions` (in order) to every forward pass and `generate` step inside the block.

        with hl.intervene(lm, hl.VHR(alpha=2.0), hl.VAR(p=0.6, rho=0.5)):
            out = lm.model.generate(**inputs)

    engine: "fused" (exact, no [q, k] pattern) or "reference" (explicit patterns, the oracle).
    """
    if not interventions:
        raise SelectionError("intervene() needs at least one intervention")
    patches = [i.bind(lm) for i in interventions]
    runner = Runner(lm, patches, engine)
    tagged: list[nn.Module] = []
    with ExitStack() as stack:
        stack.enter_context(switched_to_headlab(lm.model))
        handle = lm.model.register_forward_pre_hook(runner.on_model_call, with_kwargs=True)
        stack.callback(handle.remove)
        for tower, modules in lm.attention_modules.items():
            for layer, module in enumerate(modules):
                if any(p.touches(tower, layer) for p in patches):
                    module._headlab_site, module._headlab_runner = (tower, layer), runner
                    tagged.append(module)
        stack.callback(_untag, tagged)
        for p in patches:
            for layer in p.input_layers():
                h = lm.layer_modules[p.tower][layer].register_forward_pre_hook(
                    runner.layer_hook(p.tower, layer), with_kwargs=True
                )
                stack.callback(h.remove)
        yield runner


def _untag(modules: list[nn.Module]) -> None:
    for m in modules:
        if hasattr(m, "_headlab_runner"):
            delattr(m, "_headlab_runner")
        if hasattr(m, "_headlab_site") and not hasattr(m, "_headlab_probe"):
            delattr(m, "_headlab_site")
