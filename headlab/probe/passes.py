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

import bisect
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from headlab.compat import past_length
from headlab.errors import InputError
from headlab.loading import Family, LoadedModel
from headlab.probe.context import BatchContext, text_context
from headlab.probe.keys import token_validity
from headlab.probe.roles import IMAGE_NEWLINE, TokenRoles, grid_roles, text_roles


class PassContexts:
    """Batch contexts of the passes one block sees; `on_new(ctx)` hears of every new context."""

    def __init__(self, lm: LoadedModel, on_new: Callable[[BatchContext], None] | None = None) -> None:
        self.lm, self.on_new = lm, on_new
        self._pass = 0
        self._next_example = 0
        self._pending: dict[str, BatchContext] = {}
        self._active: dict[str, BatchContext] = {}
        self._roles_override: list[TokenRoles] | None = None
        self._vision_units = VisionUnits((), None)  # LVLMs: the example of each image (or tile) of a pass
        self._unannounced: BatchContext | None = None  # a prefill context waiting for its image newlines
        # (tower, layer) -> (its last call in this pass, tokens of the layer's calls before it, its tokens)
        self._calls: dict[tuple[str, int], tuple[object, int, int]] = {}

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
        if self._unannounced is not None:  # the last pass never reached the language model's attention
            self._announce(self._unannounced)
            self._unannounced = None
        self._pass += 1
        self._calls.clear()
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if self.lm.family is Family.VIT:
            pixels = kwargs.get("pixel_values", ids)
            examples = self._new_examples(pixels.shape[0]) if pixels is not None else ()
            self._vision_units = VisionUnits(examples, None)
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
        if self.lm.adapter.image_newline_attr is None:
            self._announce(ctx)
        else:  # announced when the language model first uses it, its image-newline tokens marked
            self._unannounced = ctx
        pixels = kwargs.get("pixel_values")
        if self.lm.family is Family.LVLM and torch.is_tensor(pixels):
            self._vision_units = vision_units(pixels, ctx, kwargs.get("image_grid_thw"))

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

    def call_context(self, call) -> BatchContext:
        """The batch context an attention call (`headlab.probe.call.AttentionCall`) sees: its pass's context
        of its tower, over the call's keys. A vision tower that runs one call per image, or per window of an
        image, in each layer (Qwen2-VL, Qwen2.5-VL) gets the context of that call's tokens: the calls of a
        layer cover the images' tokens in order, so the tokens before a call say which image it is."""
        key = (call.tower, call.layer)
        n_k = call.k.shape[2]
        last = self._calls.get(key)
        if last is None or last[0] is not call:
            self._calls[key] = (call, 0 if last is None else last[1] + last[2], n_k)
        offset = self._calls[key][1]
        return self.context(call.tower, call.q.shape[0], n_k, offset=offset).fit_keys(n_k)

    def context(self, tower: str, batch: int, n_tokens: int, *, offset: int = 0) -> BatchContext:
        """The batch context of the current pass through `tower` (built on first use in the pass); vision
        contexts are per call shape: `offset` tokens of the layer's earlier calls, `n_tokens` of this one."""
        if tower in self._pending:
            ctx = self._pending.pop(tower)
            if ctx is self._unannounced:
                ctx, self._unannounced = self._with_newlines(ctx), None
                self._announce(ctx)
            self._active[tower] = ctx
        key = (tower, offset, n_tokens) if tower == "vision" else tower
        ctx = self._active.get(key)
        if ctx is None or ctx.pass_id != self._pass or ctx.batch != batch:
            ctx = self._default_context(tower, batch, n_tokens, offset)
            self._active[key] = ctx
            self._announce(ctx)
        return ctx

    def _with_newlines(self, ctx: BatchContext) -> BatchContext:
        """The prefill context with LLaVA-NeXT's image-newline tokens marked, from the columns where the
        language model's input is the model's newline vector (`Session.newline_columns`)."""
        from headlab.probe.session import session_of

        session = session_of(self.lm)
        columns = None if session is None else session.newline_columns
        if columns is None or len(columns) != ctx.batch:
            return ctx
        roles = tuple(
            r.with_role(IMAGE_NEWLINE, ctx.key_pos[b, cols].tolist())
            for b, (r, cols) in enumerate(zip(ctx.roles, columns, strict=True))
        )
        return dataclasses.replace(ctx, roles=roles)

    def _default_context(self, tower: str, batch: int, n_tokens: int, offset: int) -> BatchContext:
        info = self.lm.tower(tower)
        partial = False
        if tower == "vision":
            units = self._vision_units
            if units.tokens is not None and batch == 1:  # one call per image or window (Qwen2-VL)
                ends = list(itertools.accumulate(units.tokens))
                unit = bisect.bisect_right(ends, offset)
                fits = unit < len(ends) and offset + n_tokens <= ends[unit]
                examples = (units.examples[unit],) if fits else self._new_examples(1)
                partial = fits and n_tokens < units.tokens[unit]
            elif len(units.examples) == batch:  # one row per image or tile
                examples = units.examples
            else:
                examples = self._new_examples(batch)
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
            partial=partial,
        )


class VisionUnits(NamedTuple):
    """The images (or tiles) of an LVLM pass in the order its vision tower sees them: the example of each,
    and, where the vision tower packs them into one sequence (Qwen2-VL), the patch tokens of each."""

    examples: tuple[int, ...]
    tokens: tuple[int, ...] | None


def vision_units(pixels: torch.Tensor, ctx: BatchContext, grid_thw: torch.Tensor | None) -> VisionUnits:
    """The images, or tiles of images, of an LVLM pass in the order its vision tower sees them.

    Each example's images are its runs of image tokens, in example order. Pixels of shape [rows, tiles, C,
    H, W] (LLaVA-NeXT, LLaVA-OneVision, Idefics3: an image split into tiles, all-zero tiles padding the
    batch) give each row's real tiles to the row's example (rows are the examples that hold images). Qwen2-
    VL's `image_grid_thw` gives each image's patch tokens. A count that does not fit gives no units: the
    vision tower's rows then get examples of their own."""
    images = [
        (ex, _runs(r.positions("image")) if "image" in r.present() else 0)
        for ex, r in zip(ctx.examples, ctx.roles, strict=True)
    ]
    holders = [(ex, n) for ex, n in images if n]
    if pixels.dim() == 5:
        tiles = pixels.flatten(2).ne(0).any(-1).sum(-1).tolist()
        if len(tiles) != len(holders):
            return VisionUnits((), None)
        return VisionUnits(
            tuple(ex for (ex, _), t in zip(holders, tiles, strict=True) for _ in range(t)), None
        )
    examples = tuple(ex for ex, n in holders for _ in range(n))
    if grid_thw is None:
        return VisionUnits(examples, None)
    tokens = tuple(int(t * h * w) for t, h, w in grid_thw.tolist())
    return VisionUnits(examples, tokens) if len(tokens) == len(examples) else VisionUnits((), None)


def _runs(positions: list[int]) -> int:
    """How many runs of consecutive positions `positions` (sorted) holds."""
    return sum(1 for i, p in enumerate(positions) if i == 0 or p != positions[i - 1] + 1)
