"""What a capture records: frozen, keyword-only specifications.

- `Stats`: per-head statistics for ALL heads of a tower (cheap, fused, O(n) memory).
- `Select`: which (layer, head, query) to record in full: attention rows, head outputs, residuals.

Query positions are example coordinates (0 = first real token); negative positions count from the end of
the example (-1 = last token). `None` means "all".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from headlab.errors import SelectionError

STAT_NAMES = ("mass", "entropy", "distance", "alpha")


@dataclass(frozen=True, kw_only=True)
class Stats:
    """Per-head statistics computed inside fused attention for every head of `tower`.

    which: any of "mass" (attention mass per role), "entropy" (nats), "distance" (mean and RMS attended
        distance: 1-D over text, 2-D over the patch grid), "alpha" (received-attention score of the first
        `first_k` keys and of flagged tokens, Gu et al.; prefill passes only, where every key is present).
        Every statistic describes the row the model computed: in a decode step whose sliding-window cache
        evicted keys, those keys get no attention (a role all of whose tokens were evicted has mass 0), as
        in eager attention, where the window hides them.
    queries: query positions averaged over (None = every real query). The last token is always reported
        separately (stat names ending in "_last").
    roles: role names to report mass for (None = every role present); asking for a role that no example
        of a batch has is an error.
    towers: which towers to compute them for (None = all).
    offsets: key offsets D >= 0 whose offset mass is reported as stat "offset", role "d:D": the sum over the
        selected real queries i of A[i, i - D] (the offset histogram D(D) of methods/longctx.md 5; queries
        with no key at i - D add nothing). Each entry is rebuilt exactly from q_i . k_(i-D) and the row
        logsumexp: O(n * len(offsets)) per head, never the [n, n] pattern. RazorAttention's echo and
        induction scores are sums of it (headlab.analyses.retrieval). Empty (the default): not computed.
    """

    which: tuple[str, ...] = STAT_NAMES
    queries: Sequence[int] | None = None
    first_k: int = 4
    roles: tuple[str, ...] | None = None
    towers: tuple[str, ...] | None = None
    offsets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.which) - set(STAT_NAMES)
        if unknown:
            raise SelectionError(f"unknown statistics {sorted(unknown)}; choose from {STAT_NAMES}")
        if self.first_k < 0:
            raise SelectionError(f"first_k must be >= 0, got {self.first_k}")
        bad = [d for d in self.offsets if isinstance(d, bool) or not isinstance(d, int) or d < 0]
        if bad:
            raise SelectionError(f"offsets must be integers >= 0 (key i - D for query i), got {bad}")


@dataclass(frozen=True, kw_only=True)
class Select:
    """A selection of layers, heads and query positions of one tower (None = all)."""

    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    queries: Sequence[int] | None = None
    tower: str = "lm"

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        return _checked("layer", self.layers, n_layers)

    def head_ids(self, n_heads: int) -> tuple[int, ...]:
        return _checked("head", self.heads, n_heads)


def _checked(what: str, chosen: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if chosen is None:
        return tuple(range(n))
    out = []
    for i in chosen:
        if not -n <= i < n:
            raise SelectionError(f"{what} {i} is out of range: the tower has {n} {what}s (0..{n - 1})")
        out.append(i % n)
    return tuple(out)


def resolve_queries(queries: Sequence[int] | None, length: int) -> list[int]:
    """Example-coordinate query positions for an example of `length` tokens (negatives from the end)."""
    if queries is None:
        return list(range(length))
    out = []
    for q in queries:
        if not -length <= q < length:
            raise SelectionError(f"query position {q} is out of range for an example of {length} tokens")
        out.append(q % length)
    return out
