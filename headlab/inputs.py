"""Turning prompts (and images) into model inputs for any supported family, with clear errors.

The contract, for every caller (capture, `headlab stats`, the reports, the dashboard):
- `image_path(name, folder)` is where a data file's image lies: `name` is a relative path that stays inside
  `folder` after following `..` and symbolic links. An absolute name, or one that leads outside the folder,
  raises `InputError` saying to pass `--images` with the folder that holds the images.
- `open_image(image)` is the one place headlab opens an image. It returns an RGB image or raises
  `InputError` naming the file: missing, more than `MAX_IMAGE_PIXELS` pixels (checked from the header before
  anything is decoded, so a decompression bomb costs nothing), or any failure of the decoder (truncated,
  corrupt, not an image).
- `prepare(lm, prompts, images)` builds one padded batch. An LVLM given one image per prompt: each prompt must
  hold exactly one image token (e.g. `<image>`) for its image. An LVLM given no images: every prompt is
  captured text-only, by the rule of `text_only_prompt` (the image placeholder removed, no pixels). A text
  prompt must not be empty (or only white space). A vision model takes images only (prompts are ignored). Any
  exception the tokenizer or processor raises becomes an `InputError` naming the model, so a caller that
  prepares items one by one can skip the bad one and keep the rest.
- `question_prompt(lm, question)` is the one rule for prompting `lm` with a question: its family's template,
  else its processor's chat template; `image_placeholder(lm)` what marks the image in a prompt.
- `text_only_prompt(lm, prompt)` is the one text-only rule ("no image" in VHD, the `no_image` condition, an
  LVLM line without an image): the prompt with every image placeholder of the model removed, nothing else.
- `example_tokens(lm, inputs)` gives each example's real token ids (padding dropped, image tokens as the
  processor expanded them) and each id decoded alone, for the store; `thumbnail_png(image)` a small PNG of an
  image (longest side `THUMBNAIL_PX`).
Importing this module does not import torch (the dataset readers use `image_path` and `open_image`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from headlab.errors import HeadlabError, InputError
from headlab.models import Family

if TYPE_CHECKING:
    import torch

    from headlab.loading import LoadedModel

# what carries an image into an LVLM forward besides its image tokens, per family (transformers' generate()
# may pass precomputed encoder outputs; Qwen2-VL's grids, Idefics3's pixel mask, InstructBLIP's Q-Former
# instruction), and the per-token inputs besides the ids (PaliGemma's and Gemma 3's token types)
IMAGE_INPUTS = (
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "pixel_attention_mask",
    "mm_encoder_outputs",
    "qformer_input_ids",
    "qformer_attention_mask",
)
TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default limit (about 9459 x 9459): larger images are refused
THUMBNAIL_PX = 96  # the longest side of the thumbnails the store keeps


def image_path(name: str, folder: str | Path) -> Path:
    """The file of the image `name` (relative to `folder`), refused if it would lie outside `folder`."""
    if not isinstance(name, str) or not name:
        raise InputError("the image is not a file name (expected a non-empty string)")
    hint = "image paths are relative to the image folder: pass --images with the folder that holds the images"
    if Path(name).is_absolute():
        raise InputError(f"image path {name!r} is absolute; {hint}")
    try:
        root = Path(folder).resolve()
        path = (root / name).resolve()
    except (OSError, ValueError) as err:  # a NUL byte, a symlink loop
        raise InputError(f"image path {name!r} is unusable ({err}); {hint}") from None
    if not path.is_relative_to(root):
        raise InputError(f"image path {name!r} leads outside {root}; {hint}")
    return path


def open_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB copy of `image` (a path or a PIL image); InputError if it cannot be used (module docstring)."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, "(in memory)")
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _check_pixels decides
            with Image.open(path) as img:
                _check_pixels(img.size, path)
                return img.convert("RGB")
    except HeadlabError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(f"image {path} is too large to open safely ({err})") from None
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
        raise InputError(f"could not read image {path} ({type(err).__name__}: {err})") from None


def _check_pixels(size: tuple[int, int], what) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"image {what} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} headlab opens "
            "(a decompression bomb, or a scan to downsize first)"
        )


def prepare(lm: LoadedModel, prompts: Sequence[str], images: Sequence = ()) -> dict[str, torch.Tensor]:
    """A padded batch for `lm`: token ids for LLMs, ids + pixels for LVLMs (ids alone when given no images:
    text-only), pixels for ViTs (module docstring)."""
    if lm.family is Family.VIT:
        if not images:
            raise InputError("a vision model needs images: pass --image PATH")
        return _call(lm, lm.processor, [open_image(i) for i in images], return_tensors="pt")
    if lm.processor is None:
        raise InputError(f"{lm.source} has no tokenizer or processor files; tokenize the inputs yourself")
    if lm.family is Family.LVLM and images:
        if len(images) != len(prompts):
            raise InputError(
                f"got {len(prompts)} prompts and {len(images)} images; an LVLM takes one image per prompt, "
                "or none (text only)"
            )
        _check_image_tokens(lm, prompts)
        nested = [
            [open_image(i)] for i in images
        ]  # one image per prompt (Gemma 3's processor needs the nesting)
        return _call(lm, lm.processor, images=nested, text=list(prompts), return_tensors="pt", padding=True)
    if lm.family is Family.LVLM:
        prompts = [text_only_prompt(lm, p) for p in prompts]
    empty = [i for i, prompt in enumerate(prompts) if not prompt.strip()]
    if empty:
        where = f"prompt {empty[0]} of the batch" if len(prompts) > 1 else "the prompt"
        raise InputError(f"{where} is empty; give it some text")
    return _call(lm, _tokenizer(lm), list(prompts), return_tensors="pt", padding=True)


def text_only_prompt(lm: LoadedModel, prompt: str) -> str:
    """`prompt` without its image: every image placeholder of `lm` removed (module docstring); an LLM's or a
    vision model's prompt is returned as it is."""
    if lm.family is not Family.LVLM:
        return prompt
    for placeholder in _placeholders(lm):
        prompt = prompt.replace(placeholder, "")
    return prompt


def image_placeholder(lm: LoadedModel) -> str | None:
    """The string a prompt of `lm` marks its image with: the family's declared placeholder (Gemma 3's
    `<start_of_image>`, which its processor expands), else the processor's image token."""
    token = lm.adapter.image_placeholder or getattr(lm.processor, "image_token", None)
    return None if token is None else str(token)  # a tokenizers AddedToken, for some processors


def question_prompt(lm: LoadedModel, question: str) -> str:
    """`question` as `lm` is prompted with it (LVLMs: with the image placeholder): the family's prompt
    template, else the processor's chat template, else the question itself (LLMs, base models).

    Raises InputError for an LVLM with neither template: headlab cannot know where its image goes."""
    if lm.adapter.prompt_template is not None:
        return lm.adapter.prompt(question)
    template = getattr(lm.processor, "chat_template", None)
    if template and lm.family is Family.LVLM:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return lm.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    if lm.family is Family.LVLM:
        raise InputError(
            f"{lm.model_type} declares no prompt template and its processor has no chat template, so headlab "
            f"cannot place the image; write prompts with the image placeholder {image_placeholder(lm)!r} "
            "yourself (a prompt file's `prompt` field)"
        )
    return question


def _placeholders(lm: LoadedModel) -> list[str]:
    """The strings that stand for an image in `lm`'s prompts: the processor's image token and the
    adapter's placeholder (usually both `<image>`)."""
    found = [getattr(lm.processor, "image_token", None), lm.adapter.image_placeholder]
    return list(dict.fromkeys(str(p) for p in found if p))


def _tokenizer(lm: LoadedModel):
    """The text tokenizer of `lm` (an LVLM's processor holds it)."""
    return getattr(lm.processor, "tokenizer", None) or lm.tokenizer


def example_tokens(
    lm: LoadedModel, inputs: dict[str, torch.Tensor]
) -> list[tuple[tuple[int, ...], tuple[str, ...]] | None]:
    """Per example of a prepared batch: (its token ids without padding, each id decoded alone); None for a
    vision model, whose tokens are its CLS prefix and patch grid, not ids."""
    ids = inputs.get("input_ids")
    if lm.family is Family.VIT or ids is None:
        return [None] * (len(ids) if ids is not None else len(inputs["pixel_values"]))
    mask = inputs.get("attention_mask")
    tokenizer = _tokenizer(lm)
    out = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()] if mask is not None else ids[b]
        kept = tuple(int(i) for i in row.tolist())
        out.append((kept, tuple(tokenizer.batch_decode([[i] for i in kept]))))
    return out


def thumbnail_png(image: Image.Image, px: int = THUMBNAIL_PX) -> bytes:
    """A PNG of `image` whose longest side is at most `px` pixels (aspect ratio kept, never enlarged)."""
    small = image.convert("RGB")
    small.thumbnail((px, px))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _check_image_tokens(lm: LoadedModel, prompts: Sequence[str]) -> None:
    token = image_placeholder(lm)
    if token is None:
        return
    if not lm.adapter.prompt_holds_image:  # the processor puts the image tokens itself (BLIP-2)
        held = [i for i, prompt in enumerate(prompts) if token in prompt]
        if held:
            raise InputError(
                f"prompt {held[0]} holds {token}, but {lm.model_type}'s processor puts the image tokens before "
                "the prompt itself; remove it"
            )
        return
    for i, prompt in enumerate(prompts):
        n = prompt.count(token)
        if n != 1:
            where = f"prompt {i} of the batch" if len(prompts) > 1 else "the prompt"
            raise InputError(
                f"{where} holds {n} {token} tokens for its one image; put exactly one {token} where the "
                f"image goes{_example(lm, token)}"
            )


def _example(lm: LoadedModel, token: str) -> str:
    """An example prompt in the family's template, for error messages ("" without a template)."""
    if lm.adapter.prompt_template is None:
        return ""
    return f" (e.g. {lm.adapter.prompt('What is in the image?', image=token)!r})"


def _call(lm: LoadedModel, fn, *args, **kwargs) -> dict[str, torch.Tensor]:
    """Run the tokenizer or processor; whatever it raises becomes an InputError naming the model."""
    try:
        return dict(fn(*args, **kwargs))
    except HeadlabError:
        raise
    except Exception as err:
        raise InputError(
            f"the processor of {lm.source} could not prepare this input ({type(err).__name__}: {err})"
        ) from err
