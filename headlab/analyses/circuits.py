"""Circuit discovery on attention heads: activation, attribution and path patching, and circuit overlap.

Every method compares a clean and a corrupted prompt of the same length (`PatchingData`) through one metric,
the logit difference at the last real token:

    LD = logit(correct answer) - logit(counterfactual answer), averaged over the batch.

Tasks (`PAIR_TASKS`, from headlab.datasets.synthetic):
- `ioi`: clean = the IOI prompt ("When A and B went to the store, B gave a drink to" -> A); corrupted =
  Merullo et al.'s flipped prompt, the subject's second mention replaced by the IO ("..., A gave a drink
  to" -> B); correct = IO, counterfactual = S. (The dataset's ABC variant does not suit this metric: a model
  that only avoids the repeated subject keeps IO above S there; on the zoo LM LD(ABC) 11.9 > LD(clean) 9.2.)
- `colored_objects`: corrupted = the same scene asking about another object; correct = the asked color,
  counterfactual = the other object's color (the corrupted prompt's answer).
- `induction` (built here, `induction_pairs`): clean = "t1..tL t1..tj-1" (answer tj); corrupted = the same
  prompt with the query token's first occurrence t(j-1) swapped, in the first copy, with another first-copy
  token t(m) (m not in {j-1, j}); an induction circuit now continues with the token after t(j-1)'s new place,
  the counterfactual answer. The swap changes what the previous-token heads write at the key positions
  (which key is preceded by the query token), not the answer's value token, so both halves of the induction
  circuit (previous-token heads via K-composition, induction heads) carry the clean-vs-corrupted change.

A head's output z is its softmax(QK^T)V slice before o_proj, [batch, n, d_head] per head; all cached
tensors here are at the tensor positions of one padded batch, and clean and corrupted batches must
tokenize to the same shape and mask (checked), so position i of one run is position i of the other.

Scores (all normalised so that 1 = the whole clean-vs-corrupted LD change, 0 = none):
- denoising: run corrupted, patch in the clean value: (LD_patched - LD_corr) / (LD_clean - LD_corr);
- noising: run clean, patch in the corrupted value: (LD_patched - LD_clean) / (LD_corr - LD_clean).
Positions "all" patch every query position; "last" only the last real token (elsewhere the run's own
value is written back, an exact identity).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch

from headlab.analyses.patching_tasks import (
    DIRECTIONS,
    PAIR_TASKS,
    Pair,
    PatchingData,
    induction_pairs,
    logit_diff,
    normalised,
    patching_data,
)
from headlab.analyses.registry import Analysis, Option, store_model
from headlab.errors import SelectionError, UnsupportedModelError
from headlab.interventions.core import AttentionCall, Intervention, Patch, intervene
from headlab.kernels.augmented import attention_with_lse
from headlab.kernels.reference import expand_kv
from headlab.loading import LoadedModel
from headlab.probe.outputs import HeadOutputRecorder, record_head_outputs
from headlab.runs import distributed

__all__ = [  # the pairs and the metric live in patching_tasks; they are part of this module's API too
    "COMPONENTS",
    "DIRECTIONS",
    "METHODS",
    "PAIR_TASKS",
    "POSITIONS",
    "Baselines",
    "CircuitOverlap",
    "Head",
    "Overlap",
    "Pair",
    "PatchingData",
    "activation_patching",
    "attribution_patching",
    "baselines",
    "circuit_overlap",
    "extract_circuit",
    "induction_pairs",
    "logit_diff",
    "normalised",
    "overlap",
    "patching_data",
    "path_patching",
]

Head = tuple[int, int]  # (layer, head)
POSITIONS = ("all", "last")
COMPONENTS = ("q", "k", "v", "qkv")
TOWER = "lm"

# ---------------------------------------------------------------------------------------------- patches


@dataclass(frozen=True)
class _Bound(Intervention):
    patch: Patch

    def bind(self, lm: LoadedModel) -> Patch:
        return self.patch


class _SetHeads(Patch):
    """Writes given outputs {(layer, head): z [b, n, d]} in place of those heads' outputs."""

    def __init__(self, values: Mapping[Head, torch.Tensor]) -> None:
        self.values = values

    def touches(self, tower: str, layer: int) -> bool:
        return tower == TOWER and any(lay == layer for lay, _ in self.values)

    def transform(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for (layer, head), z in self.values.items():
            if layer == call.layer:
                out[:, head] = z.to(out)
        return out


class _Leaves(Patch):
    """Adds a zero leaf [b, h, n, d] that requires grad to every layer's head outputs: its gradient is
    dMetric/dz for every head from one backward pass."""

    def __init__(self) -> None:
        self.leaves: dict[int, torch.Tensor] = {}

    def transform(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        leaf = torch.zeros_like(out, requires_grad=True)
        self.leaves[call.layer] = leaf
        return out + leaf


class _Receiver(Patch):
    """Recomputes one head's attention with some of its q, k, v [b, n, d] taken from elsewhere (the
    sender-patched run); the layer's other heads are computed as usual."""

    def __init__(self, head: Head, given: Mapping[str, torch.Tensor]) -> None:
        self.head, self.given = head, given

    def touches(self, tower: str, layer: int) -> bool:
        return tower == TOWER and layer == self.head[0]

    def replace(self, call: AttentionCall) -> torch.Tensor:
        h = self.head[1]
        mine = {"q": call.q[:, h], "k": expand_kv(call.k, call.n_heads)[:, h]}
        mine["v"] = expand_kv(call.v, call.n_heads)[:, h]
        q, k, v = (self.given.get(c, mine[c])[:, None].float() for c in "qkv")  # [b, 1, n, d]
        out = call.plain[0].clone()  # [b, h, n, d] fp32
        out[:, h] = attention_with_lse(q, k, v, mask=call.mask, scale=call.scale, causal=call.causal)[0][:, 0]
        return out


@contextmanager
def _frozen_mlps(lm: LoadedModel, outputs: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Inside the block the MLPs of the given layers return the cached `outputs[layer]` [b, n, d_model]."""
    handles = []
    try:
        for layer, value in outputs.items():
            handles.append(_mlp(lm, layer).register_forward_hook(lambda m, a, o, v=value: v.to(o)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _mlp(lm: LoadedModel, layer: int) -> torch.nn.Module:
    module = lm.mlp_module(TOWER, layer)
    if module is None:
        raise UnsupportedModelError(
            f"path patching freezes MLPs through the decoder layer's `mlp` module; {lm.model_type} has none"
        )
    return module


def _forward(lm: LoadedModel, inputs: Mapping, *patches: Patch, grad: bool = False) -> torch.Tensor:
    """Logits [b, n, vocab] with `patches` applied; a no-op patch keeps every layer on headlab's attention
    so that patched and baseline runs share numerics."""
    with torch.set_grad_enabled(grad), intervene(lm, _Bound(Patch()), *map(_Bound, patches)):
        return lm.model(**inputs).logits


def _cache(lm: LoadedModel, inputs: Mapping, *, qkv: bool = False, mlps: bool = False):
    """(logits, the recorded head outputs (and q, k, v), {layer: MLP output}) of an unpatched run."""
    found, handles = {}, []
    if mlps:
        for layer in range(lm.tower(TOWER).n_layers):
            hook = lambda m, a, o, layer=layer: found.__setitem__(layer, o.detach())  # noqa: E731
            handles.append(_mlp(lm, layer).register_forward_hook(hook))
    try:
        with record_head_outputs(lm, tower=TOWER, qkv=qkv) as record:
            logits = _forward(lm, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return logits, record, found


def _all_heads(lm: LoadedModel, heads: Iterable[Head] | None) -> list[Head]:
    info = lm.tower(TOWER)
    every = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    if heads is None:
        return every
    heads = [tuple(h) for h in heads]
    bad = [h for h in heads if h not in every]
    if bad:
        raise SelectionError(f"heads {bad} are out of range: {info.n_layers} layers x {info.n_heads} heads")
    return heads


def _at(source: torch.Tensor, own: torch.Tensor, last: torch.Tensor, positions: str) -> torch.Tensor:
    """`source` [b, n, d] at the patched positions, the run's `own` values elsewhere."""
    if positions == "all":
        return source
    if positions != "last":
        raise SelectionError(f"positions must be one of {POSITIONS}, got {positions!r}")
    out, rows = own.clone(), torch.arange(own.shape[0])
    out[rows, last] = source[rows, last]
    return out


# --------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True, kw_only=True)
class Baselines:
    """Unpatched runs: logit differences and recorded head outputs of the clean and corrupted batches."""

    clean_ld: float
    corrupted_ld: float
    clean: HeadOutputRecorder
    corrupted: HeadOutputRecorder
    clean_mlps: dict


def baselines(lm: LoadedModel, data: PatchingData, *, qkv: bool = False) -> Baselines:
    clean_logits, clean, mlps = _cache(lm, data.clean, qkv=qkv, mlps=qkv)
    corrupted_logits, corrupted, _ = _cache(lm, data.corrupted)
    return Baselines(
        clean_ld=logit_diff(clean_logits, data).item(),
        corrupted_ld=logit_diff(corrupted_logits, data).item(),
        clean=clean,
        corrupted=corrupted,
        clean_mlps=mlps,
    )


def _runs(data: PatchingData, base: Baselines, direction: str):
    """(inputs to run, the run's own record, the record patched in) for a direction."""
    if direction == "denoising":
        return data.corrupted, base.corrupted, base.clean
    if direction == "noising":
        return data.clean, base.clean, base.corrupted
    raise SelectionError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def activation_patching(
    lm: LoadedModel,
    data: PatchingData,
    *,
    heads: Iterable[Head] | None = None,
    directions: Sequence[str] = DIRECTIONS,
    positions: Sequence[str] = ("all",),
) -> pd.DataFrame:
    """Patch each head's output alone (resample patching from the other run, at the same positions). Under
    torchrun each process patches its share of the heads (`runs.distributed`) and every process gets all rows.

    Returns one row per (layer, head, direction, positions): `patched_ld` and the normalised `score`,
    with the baselines `clean_ld` and `corrupted_ld`."""
    base, world, done = baselines(lm, data), distributed.current(), []
    sweep = [(d, pos, h) for d in directions for pos in positions for h in _all_heads(lm, heads)]
    for i, (direction, pos, (layer, head)) in world.sweep(sweep):  # data parallel: each rank its share
        inputs, own, other = _runs(data, base, direction)
        z = _at(other.z[layer][:, head], own.z[layer][:, head], data.last, pos)
        patched = logit_diff(_forward(lm, inputs, _SetHeads({(layer, head): z})), data).item()
        score = normalised(patched, base.clean_ld, base.corrupted_ld, direction)
        done.append((i, (layer, head, direction, pos, patched, score)))
    rows = world.collect(done)
    frame = pd.DataFrame(rows, columns=["layer", "head", "direction", "positions", "patched_ld", "score"])
    return frame.assign(clean_ld=base.clean_ld, corrupted_ld=base.corrupted_ld)


def attribution_patching(
    lm: LoadedModel,
    data: PatchingData,
    *,
    directions: Sequence[str] = DIRECTIONS,
    positions: Sequence[str] = ("all",),
) -> pd.DataFrame:
    """First-order activation patching of every head from one forward and one backward pass per direction.

    Denoising: gradient on the corrupted run, estimate dLD_h = sum_{b, positions, d} (z_clean - z_corr) *
    dLD/dz |corr (LD is the batch mean, so this is the mean effect); noising swaps the roles (gradient on
    the clean run, z_corr - z_clean). `score` is the estimate normalised as the activation-patching score."""
    base, rows = baselines(lm, data), []
    real = data.clean["attention_mask"].bool()  # [b, n]
    at_last = torch.zeros_like(real)
    at_last[torch.arange(len(real)), data.last] = True
    for direction in directions:
        inputs, own, other = _runs(data, base, direction)
        own_ld = base.corrupted_ld if direction == "denoising" else base.clean_ld
        leaves = _Leaves()
        metric = logit_diff(_forward(lm, inputs, leaves, grad=True), data)
        layers = sorted(leaves.leaves)
        grads = torch.autograd.grad(metric, [leaves.leaves[layer] for layer in layers])  # no param grads
        for layer, grad in zip(layers, grads, strict=True):
            effect = ((other.z[layer] - own.z[layer]) * grad.float()).sum(-1)  # [b, h, n]
            for pos in positions:
                keep = {"all": real, "last": at_last}.get(pos)
                if keep is None:
                    raise SelectionError(f"positions must be one of {POSITIONS}, got {pos!r}")
                per_head = (effect * keep[:, None]).sum((0, 2))  # [h]
                for head, estimate in enumerate(per_head.tolist()):
                    score = normalised(own_ld + estimate, base.clean_ld, base.corrupted_ld, direction)
                    rows.append((layer, head, direction, pos, estimate, score))
    frame = pd.DataFrame(rows, columns=["layer", "head", "direction", "positions", "estimate", "score"])
    return frame.assign(clean_ld=base.clean_ld, corrupted_ld=base.corrupted_ld)


def path_patching(
    lm: LoadedModel,
    data: PatchingData,
    *,
    senders: Iterable[Head] | None = None,
    components: Sequence[str] = ("q", "k", "v"),
    positions: str = "all",
) -> pd.DataFrame:
    """Sender -> receiver path patching (noising, after Wang et al. and Merullo et al.'s path_patching).

    For each sender head s (layer ls):
    1. sender run: the clean input with s's output replaced by its corrupted output (at `positions`),
       every other head of layers >= ls frozen at its clean output and every MLP of layers >= ls frozen
       at its clean output, so the residual stream entering a later layer is clean + s's corrupted-minus-
       clean write (via o_proj). Each later head's q, k, v are recorded from this run. The logits of this
       run give the direct path s -> residual -> unembedding (receiver "logits").
    2. for each receiver head r in a later layer and each component c (q, k, v or qkv): the clean input
       again, with r's attention recomputed from the recorded c (the rest of r's q/k/v and every other
       head clean); everything after r (later layers, MLPs, logits) is recomputed as usual.
    So path s -> r.c is: s's output -> o_proj -> residual stream -> r's c projection (RoPE included). Under
    torchrun each process runs its share of the senders (`runs.distributed`).
    `score` = noising (LD_patched - LD_clean) / (LD_corr - LD_clean): the share of the clean-vs-corrupted
    change carried by that path. Rows: sender `layer`, `head`, `receiver` ("L1H0" or "logits"),
    `receiver_layer` / `receiver_head` (missing for logits), `component`, `patched_ld`, `score`."""
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise SelectionError(f"components must be among {COMPONENTS}, got {bad}")
    base, world, done = baselines(lm, data, qkv=True), distributed.current(), []
    info = lm.tower(TOWER)
    for i, (ls, hs) in world.sweep(_all_heads(lm, senders)):  # data parallel: each rank its senders
        rows = []
        frozen = {
            (layer, head): base.clean.z[layer][:, head]
            for layer in range(ls, info.n_layers)
            for head in range(info.n_heads)
        }
        own = base.clean.z[ls][:, hs]
        frozen[ls, hs] = _at(base.corrupted.z[ls][:, hs], own, data.last, positions)
        mlps = {layer: base.clean_mlps[layer] for layer in range(ls, info.n_layers)}
        with _frozen_mlps(lm, mlps), record_head_outputs(lm, tower=TOWER, qkv=True) as record:
            direct = logit_diff(_forward(lm, data.clean, _SetHeads(frozen)), data).item()
        rows.append((ls, hs, "logits", pd.NA, pd.NA, "resid", direct))
        for lr in range(ls + 1, info.n_layers):
            for hr in range(info.n_heads):
                for c in components:
                    parts = "qkv" if c == "qkv" else c
                    given = {p: getattr(record, p)[lr][:, hr] for p in parts}
                    patched = _forward(lm, data.clean, _Receiver((lr, hr), given))
                    rows.append((ls, hs, f"L{lr}H{hr}", lr, hr, c, logit_diff(patched, data).item()))
        done.append((i, rows))
    columns = ["layer", "head", "receiver", "receiver_layer", "receiver_head", "component", "patched_ld"]
    frame = pd.DataFrame([row for rows in world.collect(done) for row in rows], columns=columns)
    frame["score"] = [normalised(m, base.clean_ld, base.corrupted_ld, "noising") for m in frame.patched_ld]
    return frame.assign(clean_ld=base.clean_ld, corrupted_ld=base.corrupted_ld)


# --------------------------------------------------------------------------------------------- circuits


def _head_scores(scores: pd.DataFrame | Mapping[Head, float], column: str) -> dict[Head, float]:
    if isinstance(scores, Mapping):
        return {tuple(h): float(s) for h, s in scores.items()}
    if column not in scores:
        raise SelectionError(f"the scores have no column {column!r}; they have {list(scores.columns)}")
    best = scores.groupby(["layer", "head"])[column].max()
    return {(int(layer), int(head)): float(s) for (layer, head), s in best.items()}


def extract_circuit(
    scores: pd.DataFrame | Mapping[Head, float],
    threshold: float | None = None,
    *,
    top: int | None = None,
    column: str = "score",
) -> frozenset[Head]:
    """The heads whose score reaches `threshold` (score >= threshold), or the `top` highest-scoring heads
    (Merullo et al. keep the top 2% per path-patching stage); exactly one of the two. A frame may hold
    several rows per head (directions, positions): a head's score is its largest `column` value."""
    if (threshold is None) == (top is None):
        raise SelectionError("extract_circuit needs exactly one of threshold= or top=")
    per_head = _head_scores(scores, column)
    if threshold is not None:
        return frozenset(h for h, s in per_head.items() if s >= threshold)
    if top < 0:
        raise SelectionError(f"top must be >= 0, got {top}")
    return frozenset(sorted(per_head, key=lambda h: (-per_head[h], h))[:top])


@dataclass(frozen=True, kw_only=True)
class Overlap:
    """Overlap of two circuits: `coefficient` = |A & B| / min(|A|, |B|) (Merullo et al.'s 78% = 25/32 is
    this, as both circuits have 32 heads), `iou` = |A & B| / |A | B|; NaN where the denominator is 0."""

    shared: int
    size_a: int
    size_b: int
    union: int
    coefficient: float
    iou: float


def overlap(a: Iterable[Head], b: Iterable[Head]) -> Overlap:
    a, b = set(a), set(b)
    shared, union, smaller = len(a & b), len(a | b), min(len(a), len(b))
    return Overlap(
        shared=shared,
        size_a=len(a),
        size_b=len(b),
        union=union,
        coefficient=shared / smaller if smaller else float("nan"),
        iou=shared / union if union else float("nan"),
    )


METHODS = {"activation": activation_patching, "attribution": attribution_patching}


@dataclass(frozen=True, kw_only=True)
class CircuitOverlap:
    """Per-head scores on two tasks (`scores`: layer, head, score_a, score_b, in_a, in_b), the circuits
    and their overlap."""

    scores: pd.DataFrame
    circuit_a: frozenset[Head]
    circuit_b: frozenset[Head]
    overlap: Overlap


def circuit_overlap(
    lm: LoadedModel,
    task_a: str,
    task_b: str,
    *,
    n: int = 32,
    seed: int = 0,
    threshold: float = 0.1,
    method: str = "activation",
    direction: str = "denoising",
    positions: str = "all",
) -> CircuitOverlap:
    """Patch every head on both tasks with `method` in one `direction`, keep the heads scoring >=
    `threshold` on each task as its circuit, and compare the circuits."""
    if method not in METHODS:
        raise SelectionError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    frames = []
    for task in (task_a, task_b):
        data = patching_data(lm, task, n, seed)
        frame = METHODS[method](lm, data, directions=(direction,), positions=(positions,))
        frames.append(frame.set_index(["layer", "head"])["score"])
    both = pd.concat(frames, axis=1, keys=["score_a", "score_b"]).reset_index()
    circuit_a = extract_circuit(both, threshold, column="score_a")
    circuit_b = extract_circuit(both, threshold, column="score_b")
    heads = list(zip(both["layer"], both["head"], strict=True))
    both["in_a"] = [h in circuit_a for h in heads]
    both["in_b"] = [h in circuit_b for h in heads]
    return CircuitOverlap(
        scores=both, circuit_a=circuit_a, circuit_b=circuit_b, overlap=overlap(circuit_a, circuit_b)
    )


# --------------------------------------------------------------------------------------------- analyses


_DATA_OPTIONS = {
    "task": Option(type=str, default="ioi", choices=tuple(PAIR_TASKS), help="clean/corrupted task"),
    "n": Option(type=int, default=32, ge=1, help="number of prompt pairs"),
    "seed": Option(type=int, default=0, ge=0, help="generator seed"),
}
_PATCH_OPTIONS = {
    **_DATA_OPTIONS,
    "directions": Option(
        type=str, default=DIRECTIONS, choices=DIRECTIONS, many=True, help="patching directions"
    ),
    "positions": Option(
        type=str,
        default=("all",),
        choices=POSITIONS,
        many=True,
        help="all (every query position), last (last token only)",
    ),
}


def _patching_run(method):
    def run(store, options: dict) -> pd.DataFrame:
        lm = store_model(store)
        data = patching_data(lm, options["task"], options["n"], options["seed"])
        frame = method(lm, data, directions=options["directions"], positions=options["positions"])
        return frame.assign(task=options["task"])

    return run


def _run_path(store, options: dict) -> pd.DataFrame:
    lm = store_model(store)
    data = patching_data(lm, options["task"], options["n"], options["seed"])
    frame = path_patching(lm, data, components=options["components"], positions=options["positions"])
    return frame.assign(task=options["task"])


def _run_overlap(store, options: dict) -> pd.DataFrame:
    result = circuit_overlap(
        store_model(store),
        options["task_a"],
        options["task_b"],
        n=options["n"],
        seed=options["seed"],
        threshold=options["threshold"],
        method=options["method"],
        direction=options["direction"],
    )
    o = result.overlap
    return result.scores.assign(
        task_a=options["task_a"], task_b=options["task_b"], overlap_coefficient=o.coefficient, iou=o.iou
    )


ANALYSES: dict[str, Analysis] = {
    "activation-patching": Analysis(
        name="activation-patching",
        description="per-head activation patching (denoising and noising) of the logit difference on clean/corrupted pairs",
        run=_patching_run(activation_patching),
        options=_PATCH_OPTIONS,
    ),
    "attribution-patching": Analysis(
        name="attribution-patching",
        description="per-head attribution patching: first-order estimate of activation patching from one backward pass",
        run=_patching_run(attribution_patching),
        options=_PATCH_OPTIONS,
    ),
    "path-patching": Analysis(
        name="path-patching",
        description="sender -> receiver (q/k/v) and sender -> logits path patching, noising score",
        run=_run_path,
        options={
            **_DATA_OPTIONS,
            "positions": Option(type=str, default="all", choices=POSITIONS, help="sender positions patched"),
            "components": Option(
                type=str, default=("q", "k", "v"), choices=COMPONENTS, many=True, help="receiver inputs"
            ),
        },
    ),
    "circuit-overlap": Analysis(
        name="circuit-overlap",
        description="circuits (heads with patching score >= threshold) on two tasks and their overlap coefficient and IoU",
        run=_run_overlap,
        options={
            "task_a": Option(type=str, default="ioi", choices=tuple(PAIR_TASKS), help="first task"),
            "task_b": Option(
                type=str, default="colored_objects", choices=tuple(PAIR_TASKS), help="second task"
            ),
            "n": Option(type=int, default=32, ge=1, help="number of prompt pairs per task"),
            "seed": Option(type=int, default=0, ge=0, help="generator seed"),
            "threshold": Option(
                type=float,
                default=0.1,
                ge=0,
                le=1,
                help="minimum normalised score of a circuit head (1 = the whole clean-vs-corrupted change)",
            ),
            "method": Option(type=str, default="activation", choices=tuple(METHODS), help="patching method"),
            "direction": Option(type=str, default="denoising", choices=DIRECTIONS, help="patching direction"),
        },
    ),
}
