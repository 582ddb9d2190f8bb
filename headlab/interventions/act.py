"""ACT, the Attention Calibration Technique (Yu et al., "Unveiling and Harnessing Hidden Attention Sinks:
Training-Free Attention Calibration", ICML 2024; official code GATECH-EIC/ACT, `models/*_modelling_aug.py`).

Attention sinks are not only the first token: later tokens can also draw a large share of attention from
every query after them ("hidden sinks"), and damping them in the right heads helps accuracy. For one head
of one prefill call, with A [q, k] its post-softmax pattern:

- received attention: a_j = mean of A[i, j] over the real queries i that can see key j (column means of
  the causal pattern; the code's `A.sum(0) / torch.arange(N, 0, -1)`, the same statistic as Gu et al.'s
  alpha). In a decode step (q = 1) this is the current row, as in the code.
- sinks: S = {j : a_j > tau}; the FIRST element of S (normally token 0, the usual sink) is dropped and the
  rest, S', are the hidden sinks that get calibrated (the code's `indices[1:]`).
- calibration, per query row i (m_S' = sum_{j in S'} A[i, j], rest = 1 - m_S'):
      A'[i, j] = beta * A[i, j]                               for j in S'
      A'[i, j] = A[i, j] * (1 + (1 - beta) * m_S' / rest)     otherwise (token 0 included),
  i.e. each hidden sink keeps beta of its attention and the freed mass goes to the other keys in
  proportion to their attention; rows still sum to 1. Row 0 is reset to A'[0, 0] = 1.
- defaults as shipped: tau = 0.1 (env THRES), beta = 0.4 (env BETA); calibrated heads come from an offline
  search (`search_heads`) and only layers 2 .. n_layers - 2 are touched (the code's `signal in range(2, 31)`
  for 32-layer Llama-2: not the first two layers and not the last).

How headlab applies it: `ACT(heads=...)` binds to a `Patch` whose `edits(call)` return ONE `GroupEdit` per
attention call, the hidden sinks S' as a key group [batch, head, k] (empty for heads that are not
calibrated). The runtime applies it exactly from group masses and outputs (`grouped_attention`): the group
keeps `beta` of its mass and the other keys are scaled by 1 + (1 - beta) m_S' / rest, which is the rule
above. Detection in the fused engine never builds a [q, k] pattern: attention rows are rebuilt in query tiles
from q, k and the row logsumexp of the unedited attention and their column sums accumulated (O(tile * k)
memory). The reference engine (`intervene(..., engine="reference")`) detects and calibrates on explicit
rows with the code's index operations (the oracle; it shares no code with the fused path).

Departures from the official code, all deliberate:
- any batch: every example gets its own detection and calibration (the code calibrates batch element 0
  only, `attention_map[0]`, and is run with batch size 1); only real (non-padding) queries and keys count.
- the number of queries that see key j comes from the attention mask actually used (causal, padding,
  sliding window); for plain causal prefill it is the code's N - j, in a decode step 1. A chunked prefill
  (1 < q < k, which the code's broadcast cannot handle) averages over the call's own queries.
- rows with no attention outside S' are left unchanged (the code divides 0 by 0 there).
- row 0 is reset only for the query at example position 0, where it is a no-op for causal attention (that
  row sees key 0 alone, which is never calibrated). The code's literal `[0, 0] = 1` would also hit the
  current row of a cached decode step (q = 1) and leave it summing to more than 1; headlab does not
  reproduce that. ACT is defined for causal towers only.
- computed in float32 (the code calibrates the half-precision pattern).
- detection reads the model's unedited attention, also when ACT is composed after another edit.

Shapes: q [batch, head, q, d], k/v [batch, kv_head, k, d] (GQA: query head h reads kv head h // group).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from headlab.errors import SelectionError, UnsupportedModelError
from headlab.interventions.core import AttentionCall, GroupEdit, Intervention, Patch
from headlab.kernels.augmented import attention_with_lse
from headlab.kernels.rebuild import rows_from_lse
from headlab.kernels.reference import additive_mask
from headlab.loading import LoadedModel, Tower

Head = tuple[int, int]  # (layer, head)

TAU = 0.1  # the shipped scripts' THRES, on the received-attention score a_j
BETA = 0.4  # the shipped scripts' BETA: the share of attention a hidden sink keeps
_QUERY_TILE = 128


def code_layers(n_layers: int) -> tuple[int, ...]:
    """The layers the official code calibrates: all but the first two and the last (2 .. n_layers - 2)."""
    return tuple(range(2, n_layers - 1))


def resolve_layers(info: Tower, layers: Collection[int] | None) -> tuple[int, ...]:
    """The layers ACT calibrates: the given ones sorted and checked against the tower, or `code_layers` when None."""
    if layers is None:
        return code_layers(info.n_layers)
    out = tuple(sorted({int(x) for x in layers}))
    bad = [x for x in out if not 0 <= x < info.n_layers]
    if bad:
        raise SelectionError(
            f"layers {bad} are out of range: the {info.name} tower has {info.n_layers} layers"
        )
    return out


# ----------------------------------------------------------------------------------------------- detection


def _visible(call: AttentionCall, heads: list[int], start: int, stop: int) -> torch.Tensor:
    """[batch or 1, heads or 1, stop - start, k] bool: query rows start..stop of the call may see key j."""
    n_q, n_k = call.n_q, call.k.shape[2]
    device = call.q.device
    rows = torch.arange(start, stop, device=device)
    keep = torch.ones(1, 1, stop - start, n_k, dtype=torch.bool, device=device)
    if call.causal:  # bottom-right: query row r sits at key position n_k - n_q + r
        keep = keep & (torch.arange(n_k, device=device)[None, :] <= (n_k - n_q + rows)[:, None])
    if call.mask is not None:
        m = call.mask.bool()
        if m.shape[-2] != 1:
            m = m[..., -n_q:, :][..., start:stop, :]
        keep = keep & (m[:, heads] if m.shape[1] != 1 else m)
    return keep


def received_attention(
    call: AttentionCall, heads: Sequence[int] | None = None, *, tile: int = _QUERY_TILE
) -> torch.Tensor:
    """a [batch, len(heads), k] fp32: the mean attention key j receives from the call's real queries that can
    see it (0 for keys no real query sees, padding included), from the unedited logsumexp (`call.plain`).

    Prefill (as many queries as keys): the column sums come from ONE transposed fused attention: keys act as
    queries and queries as keys, with an extra coordinate carrying -lse_i / scale, so its scores are
    s_ij - lse_i = log A[i, j] and its logsumexp over i is log sum_i A[i, j] (sequences reversed so that the
    transposed causal mask is the ordinary one). Otherwise (decode steps, chunked prefill, soft-capped
    scores, which are not linear in q): rows rebuilt tile by tile as exp(s - lse), O(tile * k) memory."""
    heads = list(range(call.n_heads)) if heads is None else list(heads)
    if call.n_q == call.k.shape[2] and call.softcap is None:
        return _received_transposed(call, heads)
    batch, n_q, n_k = call.q.shape[0], call.n_q, call.k.shape[2]
    group = call.n_heads // call.k.shape[1]
    q = call.q[:, heads].float()  # [b, hs, q, d]
    k = call.k[:, [h // group for h in heads]].float()  # [b, hs, k, d]: each head's kv head
    lse = call.plain[1][:, heads].float()  # [b, hs, q]
    real = (call.query_pos >= 0).to(q.device)  # [b, q]: padding queries do not vote
    total = q.new_zeros(batch, len(heads), n_k)
    seen = q.new_zeros(batch, len(heads), n_k)
    for start in range(0, n_q, tile):
        stop = min(n_q, start + tile)
        keep = _visible(call, heads, start, stop) & real[:, None, start:stop, None]  # [b, hs|1, t, k]
        scores = call.scores(q[:, :, start:stop], k)  # [b, hs, t, k]
        probs = rows_from_lse(scores, lse[:, :, start:stop], keep=keep)
        total += probs.sum(2)
        seen += keep.sum(2)
    valid = call.ctx.key_valid.to(q.device)[:, None, :]
    return torch.where((seen > 0) & valid, total / seen.clamp(min=1), 0.0)


def _received_transposed(call: AttentionCall, heads: list[int]) -> torch.Tensor:
    n = call.n_q
    group = call.n_heads // call.k.shape[1]
    q = call.q[:, heads].float()
    k = call.k[:, [h // group for h in heads]].float()
    lse = call.plain[1][:, heads].float()
    device = q.device
    real = (call.query_pos >= 0).to(device)[:, None, :]  # [b, 1, i]: padding queries do not vote
    lse = torch.where(real & torch.isfinite(lse), lse, 0.0)
    as_queries = torch.cat([k, torch.ones_like(k[..., :1])], -1)  # key j asks ...
    as_keys = torch.cat([q, (-lse / call.scale)[..., None]], -1)  # ... every query i: s_ij - lse_i
    order = torch.arange(n, device=device)
    if call.mask is None:
        keep = None if bool(real.all()) else real[:, :, None, :]  # [b, 1, j, i]
        votes = real.float()
        seen = votes.flip(-1).cumsum(-1).flip(-1) if call.causal else votes.sum(-1, keepdim=True)
        seen = seen.expand(-1, len(heads), n)
    else:
        m = call.mask.bool()
        m = m[..., -n:, :] if m.shape[-2] not in (1, n) else m.expand(*m.shape[:-2], n, n)
        m = m[:, heads] if m.shape[1] != 1 else m
        keep = m.transpose(-1, -2) & real[:, :, None, :]  # [b, hs|1, j, i]
        causal = (order[None, :] >= order[:, None]) if call.causal else torch.ones(n, n, dtype=torch.bool)
        seen = (keep & causal.to(device)).sum(-1).float().expand(-1, len(heads), n)
    _, col_lse = attention_with_lse(
        as_queries.flip(2),
        as_keys.flip(2),
        torch.ones_like(as_keys[..., :1]).flip(2),
        mask=None if keep is None else keep.flip([2, 3]),
        scale=call.scale,
        causal=call.causal,  # reversed, "i >= j" is the ordinary lower-triangular mask
    )
    total = torch.exp(col_lse.flip(2))  # [b, hs, j]; keys nobody sees: exp(-inf) = 0
    valid = call.ctx.key_valid.to(device)[:, None, :]
    return torch.where((seen > 0) & valid, total / seen.clamp(min=1), 0.0)


def hidden_sinks(received: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """S' (bool, same shape): keys with a_j > tau along the last axis, minus the first such key."""
    sinks = received > tau
    first = sinks & (sinks.long().cumsum(-1) == 1)
    return sinks & ~first


# ----------------------------------------------------------------------------------------------- the edit


class _Calibration(GroupEdit):
    """One call's ACT edit: group = the hidden sinks of the calibrated heads (computed on first use)."""

    def __init__(self, patch: _ACTPatch, call: AttentionCall, heads: list[int]) -> None:
        self.patch, self.call, self.heads = patch, call, heads

    @cached_property
    def groups(self) -> tuple[torch.Tensor, ...]:
        call = self.call
        sinks = hidden_sinks(received_attention(call, self.heads), self.patch.tau)  # [b, hs, k]
        self.patch.tally(call, self.heads, sinks)
        group = torch.zeros(call.q.shape[0], call.n_heads, call.k.shape[2], dtype=torch.bool)
        group[:, self.heads] = sinks.cpu()
        return (group,)

    def factors(self, mass: list[torch.Tensor], rest: torch.Tensor):
        beta = self.patch.beta
        moved = rest > 0  # a row with nothing outside S' has nowhere to put the freed mass: unchanged
        sink = torch.where(moved, beta, 1.0)
        other = torch.where(moved, 1.0 + (1.0 - beta) * mass[0] / rest.clamp(min=1e-30), 1.0)
        return [sink], other

    def reference(self, probs: torch.Tensor) -> torch.Tensor:
        """The code's rule on explicit rows [b, h, q, k], per example and head (independent of `groups`)."""
        call, beta = self.call, self.patch.beta
        received = self._explicit_received()
        out = probs.clone()
        key_pos, query_pos = call.ctx.key_pos, call.query_pos
        found = torch.zeros(
            probs.shape[0], len(self.heads), probs.shape[-1], dtype=torch.bool, device=probs.device
        )
        for b in range(probs.shape[0]):
            for n, h in enumerate(self.heads):
                A = probs[b, h]  # [q, k]
                indices = torch.nonzero(received[b, h] > self.patch.tau).flatten()
                indices = indices[1:]  # the first sink (normally token 0) is never calibrated
                found[b, n, indices] = True
                available = A[:, indices].sum(1) * (1 - beta)  # [q]
                modified = A.clone()
                modified[:, indices] *= beta
                others = A.clone()
                others[:, indices] = 0
                rest = others.sum(1, keepdim=True)
                modified = modified + available[:, None] * others / rest
                modified = torch.where(rest > 0, modified, A)
                row0 = torch.nonzero(query_pos[b] == 0).flatten().tolist()
                if row0:  # the code's modified_head[0, 0] = 1, at example position 0
                    modified[row0[0], int(torch.nonzero(key_pos[b] == 0)[0, 0])] = 1.0
                out[b, h] = modified
        self.patch.tally(call, self.heads, found)
        return out

    def _explicit_received(self) -> torch.Tensor:
        """a [b, h, k] from the explicit unedited pattern: column sums over real queries / how many see j."""
        call = self.call
        probs = call.probs().float()  # [b, h, q, k]
        n_q, n_k = call.n_q, call.k.shape[2]
        bias = additive_mask(
            call.mask, n_q, n_k, causal=call.causal, dtype=torch.float32, device=probs.device
        )
        sees = torch.ones_like(probs, dtype=torch.bool) if bias is None else torch.isfinite(bias)
        real = (call.query_pos >= 0).to(probs.device)[:, None, :, None]  # [b, 1, q, 1]
        sees = (sees & real).expand_as(probs)
        counts = sees.sum(2)  # N - j for plain causal prefill (torch.arange(N, 0, -1)); 1 in a decode step
        sums = (probs * real).sum(2)
        valid = call.ctx.key_valid.to(probs.device)[:, None, :]
        return torch.where((counts > 0) & valid, sums / counts.clamp(min=1), 0.0)


class _ACTPatch(Patch):
    def __init__(self, tower: str, by_layer: dict[int, list[int]], tau: float, beta: float) -> None:
        self.tower, self.by_layer, self.tau, self.beta = tower, by_layer, tau, beta
        self.hidden: dict[Head, list[int]] = {}  # (layer, head) -> [prefill examples, hidden sinks found]

    def touches(self, tower: str, layer: int) -> bool:
        return tower == self.tower and layer in self.by_layer

    def edits(self, call: AttentionCall) -> list[GroupEdit]:
        return [_Calibration(self, call, self.by_layer[call.layer])]

    def tally(self, call: AttentionCall, heads: list[int], sinks: torch.Tensor) -> None:
        """Count hidden sinks per prefill example (read by `search_heads`)."""
        if call.step != 0:
            return
        per_head = sinks.sum(-1).sum(0).tolist()  # [hs]
        for h, found in zip(heads, per_head, strict=True):
            counts = self.hidden.setdefault((call.layer, h), [0, 0])
            counts[0] += sinks.shape[0]
            counts[1] += int(found)


@dataclass(frozen=True, kw_only=True)
class ACT(Intervention):
    """Calibrate the hidden attention sinks of `heads` [(layer, head), ...] (Yu et al., ICML 2024).

    tau: threshold on the received-attention score a_j (absolute, as the code's THRES; not a multiple of
    uniform). beta: the share of attention each hidden sink keeps. layers: the layers ACT may touch; None =
    the official code's (not the first two, not the last: `code_layers`); a head outside them is an error,
    so models with fewer than four layers need `layers=` explicitly. The head set normally comes from
    `search_heads(...).kept`; no heads = no change. See the module docstring for the exact rule.

        with hl.intervene(lm, ACT(heads=((5, 3), (7, 0)))):
            logits = lm.model(**inputs).logits
    """

    heads: Collection[Head]
    layers: Collection[int] | None = None
    tau: float = TAU
    beta: float = BETA
    tower: str = "lm"

    def __post_init__(self) -> None:
        try:
            heads = tuple(sorted({(int(layer), int(head)) for layer, head in self.heads}))
        except (TypeError, ValueError):
            raise SelectionError(f"ACT heads must be (layer, head) pairs, got {self.heads!r}") from None
        object.__setattr__(self, "heads", heads)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        if not self.tau >= 0:
            raise SelectionError(f"ACT tau must be >= 0 (it thresholds a mean attention), got {self.tau}")
        if not 0 <= self.beta <= 1:
            raise SelectionError(f"ACT beta must lie in [0, 1] (the share a sink keeps), got {self.beta}")

    def bind(self, lm: LoadedModel) -> Patch:
        info = lm.tower(self.tower)
        if not info.causal:
            raise UnsupportedModelError(
                f"ACT calibrates causal attention; the {self.tower} tower is not causal"
            )
        allowed = resolve_layers(info, self.layers)
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            if not (0 <= layer < info.n_layers and 0 <= head < info.n_heads):
                raise SelectionError(
                    f"head ({layer}, {head}) is out of range: the {self.tower} tower has {info.n_layers} "
                    f"layers x {info.n_heads} heads"
                )
            if layer not in allowed:
                raise SelectionError(
                    f"head ({layer}, {head}) is in layer {layer}, outside the layers ACT calibrates here "
                    f"({list(allowed)}; by default the official code's: not the first two, not the last); "
                    f"pass layers=... to allow it, e.g. layers=range({info.n_layers})"
                )
            by_layer.setdefault(layer, []).append(head)
        return _ACTPatch(self.tower, by_layer, self.tau, self.beta)
