"""Token roles: what each token of an example is (first token, image patch, text, segment k, CLS, ...).

Every captured example carries a `TokenRoles`: an int class per real token (padding excluded) and the
names of the classes. Statistics are reported per role name, so text, image and segment tokens are treated
alike. Vision tokens also carry their patch grid (rows, cols) and where it starts.

Conventions (stated once, used everywhere):
- positions are example coordinates: 0 is the example's first real token, whatever the padding side;
- "bos" is the role of position 0 in text towers, whether or not the tokenizer inserted a BOS token: it is
  the token every later query can see, which is what makes it a sink;
- LLaVA-style inputs: "image" = the expanded image tokens (input_ids == image_token_id), with the grid of
  the vision tower when the span is a full square grid; LLaVA-NeXT's image-newline tokens among them are
  "image_newline";
- vision towers: "cls" for the prefix tokens (CLS, DeiT's distillation token), "register" for register
  tokens (DINOv2 with registers: after the CLS, before the grid), "patch" for the grid; a tower without a
  CLS token (SigLIP) has only "patch";
- caller-given segments (PINE, lost-in-the-middle documents) become roles "segment_0", "segment_1", ...
  and override "text" on their spans.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from headlab.errors import InputError

BOS, TEXT, IMAGE, CLS, PATCH, ANSWER = "bos", "text", "image", "cls", "patch", "answer"
REGISTER = "register"
IMAGE_NEWLINE = "image_newline"


@dataclass(frozen=True, kw_only=True)
class TokenRoles:
    """Roles of one example's real tokens. `classes[p]` indexes `names`; `flagged` are extra positions
    whose received attention (alpha) is reported besides the first K keys."""

    classes: tuple[int, ...]
    names: tuple[str, ...]
    grid: tuple[int, int] | None = None
    grid_start: int = 0
    flagged: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if any(c < 0 or c >= len(self.names) for c in self.classes):
            raise InputError(f"role classes must index names {self.names}")
        if self.grid is not None and self.grid_start + self.grid[0] * self.grid[1] > len(self.classes):
            raise InputError(
                f"patch grid {self.grid} at {self.grid_start} does not fit {len(self.classes)} tokens"
            )

    def __len__(self) -> int:
        return len(self.classes)

    def positions(self, name: str) -> list[int]:
        """Positions with role `name`; an InputError if the example has none."""
        if name not in self.names:
            raise InputError(f"role {name!r} is absent from this input; its roles are {list(self.present())}")
        idx = self.names.index(name)
        return [p for p, c in enumerate(self.classes) if c == idx]

    def present(self) -> tuple[str, ...]:
        return tuple(n for i, n in enumerate(self.names) if i in set(self.classes))

    def extended(self, n_new: int, name: str = ANSWER) -> TokenRoles:
        """These roles plus `n_new` generated tokens of role `name` (decode steps)."""
        names = self.names if name in self.names else (*self.names, name)
        return TokenRoles(
            classes=self.classes + (names.index(name),) * n_new,
            names=names,
            grid=self.grid,
            grid_start=self.grid_start,
            flagged=self.flagged,
        )

    def with_role(self, name: str, positions: Sequence[int]) -> TokenRoles:
        """These roles with `positions` given role `name` (LLaVA-NeXT's image-newline tokens)."""
        if not positions:
            return self
        names = self.names if name in self.names else (*self.names, name)
        classes = list(self.classes)
        for p in positions:
            classes[p] = names.index(name)
        return dataclasses.replace(self, classes=tuple(classes), names=names)

    def with_flagged(self, positions: Sequence[int]) -> TokenRoles:
        bad = [p for p in positions if not 0 <= p < len(self)]
        if bad:
            raise InputError(f"flagged positions {bad} are outside this example's {len(self)} tokens")
        return TokenRoles(
            classes=self.classes,
            names=self.names,
            grid=self.grid,
            grid_start=self.grid_start,
            flagged=tuple(positions),
        )

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.classes, dtype=torch.long)


def text_roles(
    input_ids: Sequence[int],
    *,
    image_token_id: int | None = None,
    segments: Sequence[tuple[int, int]] = (),
    flagged: Sequence[int] = (),
) -> TokenRoles:
    """Roles of a text (or LLaVA-style text + image tokens) example given its real token ids.

    `segments` are caller-given half-open [start, end) spans in example coordinates.
    """
    n = len(input_ids)
    if n == 0:
        raise InputError("an example has no tokens")
    names = [BOS, TEXT]
    classes = [1] * n
    classes[0] = 0
    grid, grid_start = None, 0
    if image_token_id is not None:
        image_pos = [p for p, t in enumerate(input_ids) if t == image_token_id]
        if image_pos:
            names.append(IMAGE)
            for p in image_pos:
                classes[p] = names.index(IMAGE)
            side = math.isqrt(len(image_pos))
            contiguous = image_pos[-1] - image_pos[0] + 1 == len(image_pos)
            if contiguous and side * side == len(image_pos):
                grid, grid_start = (side, side), image_pos[0]
    for i, (start, end) in enumerate(segments):
        if not 0 <= start < end <= n:
            raise InputError(f"segment {i} = [{start}, {end}) does not fit an example of {n} tokens")
        names.append(f"segment_{i}")
        for p in range(start, end):
            classes[p] = len(names) - 1
    return TokenRoles(
        classes=tuple(classes), names=tuple(names), grid=grid, grid_start=grid_start, flagged=tuple(flagged)
    )


def grid_roles(
    prefix_tokens: int, grid: tuple[int, int] | None, n_tokens: int | None = None, *, registers: int = 0
) -> TokenRoles:
    """Roles of a vision-tower input: `prefix_tokens` tokens before a rows x cols patch grid, of which the
    last `registers` are register tokens (role "register") and the others CLS-like (role "cls").

    `n_tokens` other than the grid's (an image of another size) takes the square grid that fits; where
    none fits, or the tower declares no grid (Qwen2-VL's patches, in merge-window order), the tokens after
    the prefix are patches without a grid (no 2-D distances)."""
    if not 0 <= registers <= prefix_tokens:
        raise InputError(f"{registers} register tokens do not fit {prefix_tokens} prefix tokens")
    if grid is None and n_tokens is None:
        raise InputError("a vision input needs its patch grid or its token count")
    n = prefix_tokens + grid[0] * grid[1] if grid is not None else n_tokens
    if n_tokens is not None and n_tokens != n:
        if n_tokens < prefix_tokens:
            raise InputError(f"{n_tokens} vision tokens do not fit {prefix_tokens} prefix tokens")
        side = math.isqrt(n_tokens - prefix_tokens)
        grid = (side, side) if side * side == n_tokens - prefix_tokens else None
        n = n_tokens
    names = (CLS, PATCH, REGISTER) if registers else (CLS, PATCH)
    classes = (0,) * (prefix_tokens - registers) + (2,) * registers + (1,) * (n - prefix_tokens)
    return TokenRoles(classes=classes, names=names, grid=grid, grid_start=prefix_tokens)
