"""The batch context of one forward pass through one tower: which examples, which tokens are real, roles.

A `BatchContext` maps the padded [batch, key] axis of an attention call to example coordinates: row b is
example `examples[b]`; `key_valid[b, j]` says whether padded key j is a real token; `key_pos[b, j]` is its
example position (0 = first real token, -1 for padding); `key_role[b, j]` indexes `names` (-1 for padding).
Queries of a call are the LAST n_q keys (prefill: all of them; decode: the new tokens).

A pass's context covers all its token columns. An attention call whose KV cache evicted the oldest columns
(a sliding window) sees the context of its last n_k columns (`fit_keys`): `evicted[b]` real tokens of
example b come before its first key, and key positions stay example positions (key j of a decode step at
position 30 with a window of 8 is position 23 + j, not j).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from headlab.errors import InputError
from headlab.probe.roles import TokenRoles, text_roles
from headlab.probe.select import resolve_queries


@dataclass(frozen=True, kw_only=True, eq=False)
class BatchContext:
    tower: str
    step: int  # 0 = prefill, 1.. = decode steps
    pass_id: int
    examples: tuple[int, ...]
    roles: tuple[TokenRoles, ...]
    key_valid: torch.Tensor  # [batch, n_k] bool
    evicted: torch.Tensor | None = None  # [batch] long: real tokens before key 0 (None = 0)
    partial: bool = False  # the rows see part of their example's tokens (a window of a vision tower)

    def __post_init__(self) -> None:
        lengths = (self.key_valid.sum(-1) + self.n_evicted).tolist()
        for b, (n, r) in enumerate(zip(lengths, self.roles, strict=True)):
            if n != len(r):
                raise InputError(f"example {self.examples[b]} has {n} real tokens but roles for {len(r)}")

    @property
    def batch(self) -> int:
        return self.key_valid.shape[0]

    @cached_property
    def tiled(self) -> bool:
        """Whether a row is one of several of its example's in a pass: an LVLM vision tower over the tiles
        of an image, or over the windows of one (its statistics are then the mean over them)."""
        return self.partial or len(set(self.examples)) < len(self.examples)

    @property
    def n_keys(self) -> int:
        return self.key_valid.shape[1]

    @property
    def n_evicted(self) -> torch.Tensor:
        """[batch] long: each example's real tokens before the first key (evicted from a KV cache)."""
        return self.evicted if self.evicted is not None else torch.zeros(self.batch, dtype=torch.long)

    def fit_keys(self, n_k: int) -> BatchContext:
        """This context seen by an attention call over its LAST n_k token columns (a sliding-window cache
        evicted the others; n_k = n_keys: the context itself)."""
        if n_k == self.n_keys:
            return self
        if n_k > self.n_keys:
            raise InputError(
                f"attention saw {n_k} keys but the input has {self.n_keys} tokens; headlab maps the keys of "
                "dynamic, sliding-window, static and hybrid KV caches, not of this one"
            )
        dropped = self.key_valid[:, : self.n_keys - n_k].sum(-1)
        return BatchContext(
            tower=self.tower,
            step=self.step,
            pass_id=self.pass_id,
            examples=self.examples,
            roles=self.roles,
            key_valid=self.key_valid[:, -n_k:],
            evicted=self.n_evicted + dropped,
            partial=self.partial,
        )

    @cached_property
    def names(self) -> tuple[str, ...]:
        """The union of role names over the batch, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.roles:
            seen.update(dict.fromkeys(r.names))
        return tuple(seen)

    @cached_property
    def key_pos(self) -> torch.Tensor:
        """[batch, n_k] example position of each key (-1 for padding)."""
        pos = self.key_valid.long().cumsum(-1) - 1 + self.n_evicted[:, None]
        return torch.where(self.key_valid, pos, -1)

    @cached_property
    def key_role(self) -> torch.Tensor:
        """[batch, n_k] role of each key, an index into `names` (-1 for padding)."""
        out = torch.full(self.key_valid.shape, -1, dtype=torch.long)
        for b, (r, first) in enumerate(zip(self.roles, self.n_evicted.tolist(), strict=True)):
            remap = torch.tensor([self.names.index(n) for n in r.names], dtype=torch.long)
            out[b, self.key_valid[b]] = remap[r.tensor()[first:]]
        return out

    def key_index(self, positions: torch.Tensor) -> torch.Tensor:
        """[batch, a] key index of each example position in `positions` [batch, a] (-1 where the position
        is not among this call's keys: evicted, or -1 itself)."""
        hit = (self.key_pos[:, None, :] == positions[:, :, None]) & (positions[:, :, None] >= 0)
        return torch.where(hit.any(-1), hit.long().argmax(-1), -1)

    @cached_property
    def role_present(self) -> torch.Tensor:
        """[batch, n_roles] bool: example b has at least one token of role r."""
        present = torch.zeros(self.batch, len(self.names), dtype=torch.bool)
        for b, r in enumerate(self.roles):
            for n in r.present():
                present[b, self.names.index(n)] = True
        return present

    @cached_property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.roles]

    def call_queries(self, b: int, n_q: int, queries) -> tuple[list[int], list[int]]:
        """(example positions, indices within the call) of the selected queries of row b in a call whose
        queries are the last n_q keys; `queries` as in Select (None = all, negatives from the end)."""
        positions = resolve_queries(queries, self.lengths[b]) if queries is not None else None
        q_pos = self.key_pos[b, -n_q:].tolist()
        pairs = [(p, i) for i, p in enumerate(q_pos) if p >= 0 and (positions is None or p in positions)]
        return [p for p, _ in pairs], [i for _, i in pairs]


def text_context(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    examples: tuple[int, ...],
    pass_id: int,
    image_token_id: int | None = None,
    roles: tuple[TokenRoles, ...] | None = None,
) -> BatchContext:
    """The prefill context of a (padded) batch of token ids: roles from the ids unless given."""
    valid = (
        attention_mask.bool().cpu()
        if attention_mask is not None
        else torch.ones(input_ids.shape, dtype=torch.bool)
    )
    if roles is None:
        roles = tuple(
            text_roles(row[v].tolist(), image_token_id=image_token_id)
            for row, v in zip(input_ids.cpu(), valid[:, -input_ids.shape[1] :], strict=True)
        )
    elif len(roles) != input_ids.shape[0]:
        raise InputError(f"got roles for {len(roles)} examples but the batch has {input_ids.shape[0]}")
    return BatchContext(
        tower="lm", step=0, pass_id=pass_id, examples=examples, roles=tuple(roles), key_valid=valid
    )
