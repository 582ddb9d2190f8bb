"""CCA, Concentric Causal Attention (Xing, Li, Laptev, Lu, "Mitigating Object Hallucination via Concentric
Causal Attention", NeurIPS 2024; official code xing0047/cca-llava, `llava/cca_utils/cca.py`).

CCA is a TRAINING recipe. It changes two things in the language model of a LLaVA-style LVLM, in every layer:

- positions: the image tokens of each image form a rows x cols grid; cell (y, x) lies on ring
  ring(y, x) = min(y, x, rows - 1 - y, cols - 1 - x) (outermost ring 0, centre ring n_rings - 1 with
  n_rings = ceil(min(rows, cols) / 2); 24 x 24 -> 12 rings, 4 x 4 -> 2). Text before the image keeps
  0 .. p0 - 1 (p0: the position the first image token would have had); the image token at (y, x) gets
  p0 + ring(y, x); the text after continues from p0 + n_rings. Decode steps continue the same way: a new
  token sits at cache_length - n_image + n_rings (padding not counted).
- mask (prefill only; decode uses the ordinary causal mask): the causal mask, except in the image x image
  block, where query q may see image key k iff ring(k) <= ring(q) (bidirectional within a ring, the centre
  sees the periphery). Image queries see all earlier text; later text sees every image token.

The image tokens stay in raster order in memory; only the position ids and the mask change.

!! Applying CCA at inference to a model trained WITHOUT it (stock LLaVA, the plain zoo `llava`) is NOT the
paper's method: the paper trains LLaVA-1.5 with CCA from the start (both stages) and evaluates that model;
the positions and mask are out of distribution for a model trained on raster positions. headlab allows it
(for ablations) and reports it as a separate, labelled row. The zoo model `llava-cca` is trained with CCA
(`headlab zoo train llava-cca`) and must be run under CCA (its zoo.json card says `"cca": true`).

Two ways to apply it, one code path (`_Plan`):
- inference: `with hl.intervene(lm, CCA()): lm.model(...)` / `lm.model.generate(...)` (capture nests as
  usual). Before each forward pass the patch computes the CCA position ids (and, at prefill, the 4-D mask)
  from the pass's input ids and 2-D attention mask, and hands them to the language model through a one-shot
  forward pre-hook on it (removed when the pass ends, also on error), so captures still see the original
  2-D mask and roles. The language model's layers run through headlab's attention function (fused).
- training (or any plain forward, gradients included): `with CCA().applied(model): loss = model(**batch)`
  on a raw transformers LVLM (or a LoadedModel), no headlab session; the model's own attention (SDPA or
  eager) receives the 4-D mask. On exit every hook is removed.
transformers (5.x, `masking_utils._preprocess_mask_arguments`) passes a 4-D mask through unchanged; the mask
is additive (0 / finfo.min in the activations' dtype), so eager and SDPA read it alike.

Backends, for the CCA mask inside headlab's attention function (the mask is not causal, so the call is
`causal=False` with a dense boolean [b, 1, n, n] mask; `kernels.fused` dispatch):
- sdpa (CPU default): torch SDPA with the dense mask (the math / memory-efficient kernel; no block skipping).
- flex (`HEADLAB_ATTENTION=flex`, or CUDA without Triton): the dense mask becomes a BlockMask
  (`kernels.flex._block_mask` -> `create_block_mask`), so key tiles that are fully masked for a query tile
  are skipped: block-sparse as far as the mask allows. The CCA mask equals the causal one outside the image
  x image block, but inside it the outer ring (a token in every row of the grid) is visible to every image query,
  so the image block has no fully masked 128 x 128 tile; only the tiles after the image for queries up to
  the image's end are skipped (LLaVA-1.5 with 35 + 576 + 40 tokens: 31 of 36 tiles visited, causal: 21).
- triton (CUDA default): reads the dense boolean mask per tile; it does not skip masked blocks of a
  non-causal call (exact, not block-sparse).
- tiled / reference: exact torch over query tiles / the naive oracle.
Decode steps carry no mask (ordinary causal attention over the cache) on every backend.

Generalisations beyond the official code (which handles one 24 x 24 image in batch 1): any batch, left or
right padding, several images per row (a contiguous run of image tokens is cut into images of the
config's tokens-per-image; an image x another image block stays causal), any grid: square from the token
count, or `CCA(grid=(rows, cols))`. Refused with a headlab error: an input without image tokens, an image
whose token count is not rows x cols, models with multimodal (M-RoPE) positions, LLaVA-NeXT-style image
newlines, sliding-window language models, a decode step whose cache was filled outside CCA.

Limits: an editor's own side passes (VHR's selection pass) run without CCA; capture's position statistics
(mean attended distance) use token indices, not CCA's position ids.

Reference builders on one unpadded example, written literally from the definition (the oracle the tests
hold the batched code to): `ring_index`, `cca_positions`, `cca_mask`.

Axes: b = batch, n = token columns of the pass (padding included), N = cache + new columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from headlab.compat import past_length
from headlab.errors import InputError, UnsupportedModelError
from headlab.interventions.core import Intervention, Patch, Runner
from headlab.loading import Family, LoadedModel

IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")

# ------------------------------------------------------------------------------ reference (one example)


def ring_index(rows: int, cols: int) -> torch.Tensor:
    """Ring of each cell of a rows x cols grid in raster order [rows * cols]: 0 on the border, +1 per step
    inward (ring(y, x) = min(y, x, rows - 1 - y, cols - 1 - x))."""
    if rows < 1 or cols < 1:
        raise InputError(f"an image grid needs at least one row and one column, got {rows} x {cols}")
    y = torch.arange(rows)[:, None].expand(rows, cols)
    x = torch.arange(cols)[None, :].expand(rows, cols)
    return torch.minimum(torch.minimum(y, x), torch.minimum(rows - 1 - y, cols - 1 - x)).flatten()


def n_rings(rows: int, cols: int) -> int:
    """How many rings a rows x cols grid has (12 for LLaVA-1.5's 24 x 24, 2 for the zoo's 4 x 4)."""
    return math.ceil(min(rows, cols) / 2)


def _images(image_at: Sequence[bool], per_image: int | None) -> list[tuple[int, int]]:
    """[start, end) of each image: contiguous runs of image tokens cut into pieces of `per_image` (None:
    each run is one image)."""
    out, start = [], None
    for p, is_image in enumerate([*image_at, False]):
        if is_image and start is None:
            start = p
        if not is_image and start is not None:
            per_image_here = per_image or p - start
            if (p - start) % per_image_here:
                raise InputError(
                    f"a run of {p - start} image tokens at {start} is not a whole number of images of "
                    f"{per_image} tokens; CCA needs every image's full grid"
                )
            out += [(s, s + per_image_here) for s in range(start, p, per_image_here)]
            start = None
    return out


def _grid(n_image: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        if grid[0] * grid[1] != n_image:
            raise InputError(f"CCA grid {grid} holds {grid[0] * grid[1]} tokens, but an image has {n_image}")
        return grid
    side = math.isqrt(n_image)
    if side * side != n_image:
        raise InputError(
            f"an image of {n_image} tokens is not a square grid, so CCA cannot tell its rings; pass "
            "CCA(grid=(rows, cols)) with its patch grid"
        )
    return side, side


def cca_positions(
    input_ids: Sequence[int],
    image_token_id: int,
    *,
    grid: tuple[int, int] | None = None,
    tokens_per_image: int | None = None,
) -> torch.Tensor:
    """CCA position ids [n] of one unpadded example, token by token from the paper's rule (module docstring)."""
    image_at = [int(t) == image_token_id for t in input_ids]
    images = _images(image_at, tokens_per_image)
    out, next_pos, p = [], 0, 0
    while p < len(image_at):
        span = next((s for s in images if s[0] == p), None)
        if span is None:  # a text token: the next position
            out.append(next_pos)
            next_pos, p = next_pos + 1, p + 1
            continue
        rows, cols = _grid(span[1] - span[0], grid)
        rings = ring_index(rows, cols)
        out += [next_pos + int(r) for r in rings]  # p0 + ring(y, x)
        next_pos, p = next_pos + n_rings(rows, cols), span[1]  # text after: p0 + n_rings
    return torch.tensor(out, dtype=torch.long)


def cca_mask(
    input_ids: Sequence[int],
    image_token_id: int,
    *,
    grid: tuple[int, int] | None = None,
    tokens_per_image: int | None = None,
) -> torch.Tensor:
    """CCA prefill mask [n, n] (True = query row may see key column) of one unpadded example: causal,
    except that within one image query q sees key k iff ring(k) <= ring(q)."""
    image_at = [int(t) == image_token_id for t in input_ids]
    n = len(image_at)
    image_of, ring = [-1] * n, [-1] * n
    for i, (s, e) in enumerate(_images(image_at, tokens_per_image)):
        for p, r in zip(range(s, e), ring_index(*_grid(e - s, grid)).tolist(), strict=True):
            image_of[p], ring[p] = i, r
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if image_of[q] >= 0 and image_of[q] == image_of[k]:
                mask[q, k] = ring[k] <= ring[q]
            else:
                mask[q, k] = k <= q
    return mask


# ------------------------------------------------------------------------------------ batched (padded)


@dataclass(frozen=True)
class Layout:
    """CCA inputs of a padded prefill batch: `positions` [b, n] (0 on padding), `keep` [b, 1, n, n] (True =
    may attend; padding keys and padding query rows see nothing) and `shift` [b] (n_rings - n_image summed
    over the row's images: what decode positions add to the plain count)."""

    positions: torch.Tensor
    keep: torch.Tensor
    shift: torch.Tensor


def cca_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    *,
    grid: tuple[int, int] | None = None,
    tokens_per_image: int | None = None,
) -> Layout:
    """The CCA position ids, prefill mask and decode shift of a padded batch (left or right padding)."""
    b, n = input_ids.shape
    device = input_ids.device
    real = (
        torch.ones(b, n, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    )
    image = (input_ids == image_token_id) & real
    if not image.any():
        raise InputError(
            f"CCA reorders image tokens, but this input has none (no token id {image_token_id}); give "
            "prompts with the image placeholder and pixel_values, or run text-only inputs outside CCA"
        )
    image_of = torch.zeros(b, n, dtype=torch.long, device=device)  # 0: text; i + 1: image i of the row
    ring = torch.zeros(b, n, dtype=torch.long, device=device)
    step = real.long()  # how far each token advances the position count
    for row in range(b):
        cols = real[row].nonzero().flatten()  # example coordinate -> column
        at = image[row, cols].tolist()
        if not any(at):
            continue
        for i, (s, e) in enumerate(_images(at, tokens_per_image)):
            shape = _grid(e - s, grid)
            c = cols[s:e]
            image_of[row, c] = i + 1
            ring[row, c] = ring_index(*shape).to(device)
            step[row, c] = 0
            step[row, c[-1]] = n_rings(*shape)  # the image advances the count by its rings
    # `step` is 0 on an image's tokens but its last, which advances the count by the image's rings, so the
    # count before each token is the text position, and p0 for every token of an image
    start = torch.cumsum(step, 1) - step
    positions = torch.where(image_of > 0, start + ring, start)
    positions = torch.where(real, positions, 0)
    q_idx = torch.arange(n, device=device)
    causal = q_idx[None, :] <= q_idx[:, None]  # [q, k]
    same = (image_of[:, :, None] == image_of[:, None, :]) & (image_of[:, :, None] > 0)  # [b, q, k]
    keep = torch.where(same, ring[:, None, :] <= ring[:, :, None], causal)
    keep = keep & real[:, None, :] & real[:, :, None]
    shift = (step.sum(1) - real.long().sum(1)).long()
    return Layout(positions=positions, keep=keep[:, None], shift=shift)


def decode_positions(attention_mask: torch.Tensor, n_new: int, shift: torch.Tensor) -> torch.Tensor:
    """CCA position ids [b, n_new] of the last `n_new` columns of a cached pass: the plain count of real
    tokens before each (padding excluded) plus the row's shift (n_rings - n_image per image)."""
    count = torch.cumsum(attention_mask.long(), 1) - 1
    return (count[:, -n_new:] + shift.to(count.device)[:, None]).clamp(min=0)


def additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep mask as transformers' additive mask: 0 where kept, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


# ------------------------------------------------------------------------------------------- application


class _Plan:
    """Per forward pass of the whole model: the CCA inputs of the pass (prefill: positions and 4-D mask;
    cached pass: positions), handed to the language model by a one-shot forward pre-hook that is removed
    when the pass ends (a forward hook of the whole model with always_call, so also after an error)."""

    def __init__(self, cca: CCA, outer: nn.Module, language_model: nn.Module, image_token_id: int, per_image):
        self.cca, self.outer, self.language_model = cca, outer, language_model
        self.image_token_id, self.per_image = image_token_id, per_image
        self.shift: torch.Tensor | None = None  # per row, from the last prefill (decode positions add it)

    def arm(self, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise InputError(
                "CCA finds the image tokens in input_ids, but this pass got inputs_embeds only; pass input_ids"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise InputError(
                f"CCA builds its own 4-D mask from a 2-D attention_mask [batch, tokens]; got {mask.dim()}-D"
            )
        past, n = past_length(kwargs), ids.shape[1]
        if not past:
            layout = cca_layout(
                ids, mask, self.image_token_id, grid=self.cca.grid, tokens_per_image=self.per_image
            )
            self.shift = layout.shift
            self._hand_over(layout.positions, layout.keep)
            return
        if (ids == self.image_token_id).any():
            raise InputError(
                "image tokens arrived in a pass with a filled KV cache; CCA needs each image whole in the "
                "first (prefill) pass: do not split the prompt into chunks"
            )
        if self.shift is None or self.shift.shape[0] != ids.shape[0]:
            raise InputError(
                "this pass continues a KV cache that was not filled under CCA (no prefill with this batch "
                "was seen); run the prefill and the decode steps inside the same CCA block"
            )
        if mask is None:
            mask = torch.ones(ids.shape[0], past + n, dtype=torch.long, device=ids.device)
        self._hand_over(decode_positions(mask, n, self.shift), None)

    def _hand_over(self, positions: torch.Tensor, keep: torch.Tensor | None) -> None:
        handles = []

        def remove(*_) -> None:
            for h in handles:
                h.remove()

        def pre_hook(module, args, kwargs):
            remove()
            kwargs["position_ids"] = positions.to(_device(module))
            if keep is not None:  # prefill: the concentric causal mask; decode keeps the ordinary one
                embeds = kwargs.get("inputs_embeds")
                dtype = embeds.dtype if embeds is not None else next(module.parameters()).dtype
                kwargs["attention_mask"] = additive(keep.to(_device(module)), dtype)
            return args, kwargs

        handles.append(self.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(self.outer.register_forward_hook(remove, always_call=True))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _CCAPatch(Patch):
    """CCA inside `intervene`: every language-model layer runs through headlab's fused attention (with the
    mask transformers hands it); before each pass the plan gives the language model the CCA inputs."""

    tower = "lm"

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def on_pass(self, runner: Runner, kwargs: dict) -> None:
        self.plan.arm((), kwargs)


@dataclass(frozen=True, kw_only=True)
class CCA(Intervention):
    """Concentric Causal Attention (module docstring): concentric position ids for each image's tokens and
    the concentric causal mask at prefill, in every layer of the language model.

    grid: (rows, cols) of each image's token grid; None: square, from the number of image tokens.

    Inference: `with hl.intervene(lm, hl.CCA()): ...`. Training: `with hl.CCA().applied(model): ...`.
    NOTE: on a model trained without CCA this is not the paper's method (CCA is trained in, see
    `headlab zoo train llava-cca`); it is allowed as an ablation only.
    """

    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.grid is not None and (
            len(self.grid) != 2 or any(not isinstance(g, int) or g < 1 for g in self.grid)
        ):
            raise InputError(f"CCA grid must be (rows, cols) of positive integers, got {self.grid!r}")

    def bind(self, lm: LoadedModel) -> Patch:
        return _CCAPatch(self._plan(lm))

    @contextmanager
    def applied(self, model: nn.Module | LoadedModel) -> Iterator[_Plan]:
        """Apply CCA to every forward pass of `model` (a transformers LVLM or a LoadedModel) inside the block,
        without headlab's attention function: for training (gradients flow as usual) and plain inference.
        On exit the model is as it was, also after an exception."""
        plan = self._plan(model)
        outer = plan.outer
        with ExitStack() as stack:
            handle = outer.register_forward_pre_hook(lambda m, a, k: plan.arm(a, k), with_kwargs=True)
            stack.callback(handle.remove)
            yield plan

    def _plan(self, model: nn.Module | LoadedModel) -> _Plan:
        if isinstance(model, LoadedModel):
            return self._plan_loaded(model)
        return self._plan_raw(model)

    def _plan_loaded(self, lm: LoadedModel) -> _Plan:
        if lm.family is not Family.LVLM:
            raise UnsupportedModelError(
                f"CCA reorders the positions of image tokens in an LVLM; {lm.source} is a {lm.family.value} model"
            )
        _refuse(lm.model_type, lm.multimodal_positions, lm.adapter.image_newline_attr is not None)
        if lm.tower("lm").sliding:
            raise UnsupportedModelError(
                f"{lm.model_type}'s language model attends through a sliding window, which CCA's 4-D mask "
                "would replace; CCA supports full-attention language models"
            )
        if lm.image_token_id is None:
            raise UnsupportedModelError(
                f"{lm.source} declares no image token id, so CCA cannot find the image"
            )
        language_model = lm.model.get_submodule(lm.tower("lm").path.rsplit(".", 1)[0])
        return _Plan(self, lm.model, language_model, int(lm.image_token_id), lm.tokens_per_image)

    def _plan_raw(self, model: nn.Module) -> _Plan:
        config = getattr(model, "config", None)
        image_token_id = None
        for name in IMAGE_TOKEN_ATTRS:
            image_token_id = image_token_id if image_token_id is not None else getattr(config, name, None)
        if image_token_id is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no image token id in its config; CCA applies to LLaVA-style LVLMs"
            )
        inner = getattr(model, "model", None)
        mrope = any(hasattr(m, "get_rope_index") for m in (model, inner))
        _refuse(getattr(config, "model_type", type(model).__name__), mrope, hasattr(inner, "image_newline"))
        language_model = getattr(inner, "language_model", None) or getattr(model, "language_model", None)
        if language_model is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no `language_model` for CCA to hook")
        text = getattr(config, "text_config", config)
        if getattr(text, "sliding_window", None) is not None:
            raise UnsupportedModelError(
                "the language model attends through a sliding window, which CCA's 4-D mask would replace"
            )
        per_image = getattr(config, "image_seq_length", None)
        return _Plan(self, model, language_model, int(image_token_id), per_image)


def _refuse(model_type: str, mrope: bool, image_newline: bool) -> None:
    if mrope:
        raise UnsupportedModelError(
            f"{model_type} derives multimodal (M-RoPE) position ids itself (time, height, width sections); "
            "CCA assigns 1-D concentric positions and supports LLaVA-style models with 1-D RoPE"
        )
    if image_newline:
        raise UnsupportedModelError(
            f"{model_type} puts an image-newline token after each row of image features, so its image tokens "
            "are no plain grid; CCA supports LLaVA-1.5-style square grids"
        )
