"""The batch contexts of a block's forward passes: which examples each pass carries, and their token roles.

Every capture and intervene block keeps one `PassContexts`. The session calls `on_model_call` from its
forward pre-hook on the whole model (once per pass, `generate` decode steps included); attention calls and
layer hooks then ask `context(tower, batch, n_tokens)` for the pass's context of a tower, built on first
use. Example ids are the block's own (0, 1, ... in the order the block saw them), so a capture opened
inside an intervene block numbers its examples from 0 as it would alone.

A decode step (a KV cache built inside the block) extends the previous context's roles by the new tokens;
a cache built outside the block is refused: its tokens have no roles. Which token columns are real comes
from the forward's attention mask (`headlab.probe.keys.token_validity`: 2-D, or the 4-D masks generate()
builds for static caches). A context covers every token column of its pass, also those a sliding-window
cache has evicted; each attention call sees it through `BatchContext.fit_keys`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from headlab.compat import past_length
from headlab.errors import InputError
from headlab.loading import Family, LoadedModel
from headlab.probe.context import BatchContext, text_context
from headlab.probe.keys import token_validity
from headlab.probe.roles import TokenRoles, grid_roles, text_roles


class PassContexts:
    """Batch contexts of the passes one block sees; `on_new(ctx)` hears of every new context."""

    def __init__(self, lm: LoadedModel, on_new: Callable[[BatchContext], None] | None = None) -> None:
        self.lm, self.on_new = lm, on_new
        self._pass = 0
        self._next_example = 0
        self._pending: dict[str, BatchContext] = {}
        self._active: dict[str, BatchContext] = {}
        self._roles_override: list[TokenRoles] | None = None
        self._vision_examples: tuple[int, ...] = ()

    def use_roles(self, roles: Sequence[TokenRoles]) -> None:
        """Roles for the examples of the next prefill pass (caller-given segments, flagged tokens)."""
        self._roles_override = list(roles)

    def _new_examples(self, n: int) -> tuple[int, ...]:
        ids = tuple(range(self._next_example, self._next_example + n))
        self._next_example += n
        return ids

    def _announce(self, ctx: BatchContext) -> None:
        if self.on_new is not None:
            self.on_new(ctx)

    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pass of the whole model begins: the token roles of its language-model tokens."""
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
        if past:
            self._pending["lm"] = self._decode_step(past, ids.shape[1], mask)
            return
        valid = token_validity(mask, batch=ids.shape[0], past=0, n_new=ids.shape[1], previous=None)
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
        self._announce(ctx)
        if self.lm.family is Family.LVLM and kwargs.get("pixel_values") is not None:
            per_image = self.lm.tokens_per_image
            counts = [
                len(r.positions("image")) // per_image if "image" in r.present() else 0 for r in ctx.roles
            ]
            self._vision_examples = tuple(
                ex for ex, c in zip(examples, counts, strict=True) for _ in range(c)
            )

    def _decode_step(self, past: int, n_new: int, mask) -> BatchContext:
        prev = self._active.get("lm")
        if prev is None:
            raise InputError(
                f"this forward pass continues a KV cache of {past} tokens that was built outside the headlab "
                "block; open capture()/intervene() before the prefill (e.g. run generate() inside the block)"
            )
        valid = token_validity(mask, batch=prev.batch, past=past, n_new=n_new, previous=prev.key_valid)
        return BatchContext(
            tower="lm",
            step=prev.step + 1,
            pass_id=self._pass,
            examples=prev.examples,
            roles=tuple(r.extended(n_new) for r in prev.roles),
            key_valid=valid.cpu(),
        )

    def context(self, tower: str, batch: int, n_tokens: int) -> BatchContext:
        """The batch context of the current pass through `tower` (built on first use in the pass)."""
        if tower in self._pending:
            self._active[tower] = self._pending.pop(tower)
        ctx = self._active.get(tower)
        if ctx is None or ctx.pass_id != self._pass or ctx.batch != batch:
            ctx = self._default_context(tower, batch, n_tokens)
            self._active[tower] = ctx
            self._announce(ctx)
        return ctx

    def _default_context(self, tower: str, batch: int, n_tokens: int) -> BatchContext:
        info = self.lm.tower(tower)
        if tower == "vision":
            examples = (
                self._vision_examples if len(self._vision_examples) == batch else self._new_examples(batch)
            )
            roles = tuple(
                grid_roles(info.prefix_tokens, info.grid, n_tokens, registers=info.register_tokens)
                for _ in range(batch)
            )
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
