"""Turning prompts (and images) into model inputs for any supported family, with clear errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from headlab.errors import InputError
from headlab.loading import Family, LoadedModel


def _open(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image {path} does not exist")
    try:
        return Image.open(path).convert("RGB")
    except OSError as err:
        raise InputError(f"could not read image {path}: {err}") from err


def prepare(lm: LoadedModel, prompts: Sequence[str], images: Sequence = ()) -> dict[str, torch.Tensor]:
    """A padded batch for `lm`: token ids for LLMs, ids + pixels for LVLMs, pixels for ViTs."""
    if lm.family is Family.VIT:
        if not images:
            raise InputError("a vision model needs images: pass --image PATH")
        return dict(lm.processor([_open(i) for i in images], return_tensors="pt"))
    if lm.processor is None:
        raise InputError(f"{lm.source} has no tokenizer or processor files; tokenize the inputs yourself")
    if lm.family is Family.LVLM:
        if len(images) != len(prompts):
            raise InputError(
                f"got {len(prompts)} prompts and {len(images)} images; an LVLM needs one image per prompt"
            )
        return dict(
            lm.processor(
                images=[_open(i) for i in images], text=list(prompts), return_tensors="pt", padding=True
            )
        )
    return dict(lm.tokenizer(list(prompts), return_tensors="pt", padding=True))
