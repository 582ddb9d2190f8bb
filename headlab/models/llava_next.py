"""LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision: a vision tower over any-resolution tiles, a projector and a
language model.

An image is split into tiles of the vision tower's size plus a resized base image (the processor's
`image_grid_pinpoints`); each tile is one row of the vision tower's batch (headlab gives every tile its
image's example, and averages the tile rows' statistics: `headlab.probe.passes.vision_units`). In the input
ids the image becomes the base image's tokens, then the unpadded tile grid with an image-newline token
after each row, all with the image token id: the newline tokens (the positions whose language-model input
is the model's `image_newline` vector) get role "image_newline", the others "image". LLaVA-NeXT's vision tower is CLIP's (one CLS
token), LLaVA-OneVision's SigLIP's (none); both are read from the vision sub-config's own family.
"""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


@register
def llava_next() -> ModelAdapter:
    return ModelAdapter(
        model_types=("llava_next",),
        family=Family.LVLM,
        auto_class="AutoModelForImageTextToText",
        vision_config="vision_config",
        text_config="text_config",
        # llava-hf/llava-v1.6-mistral-7b-hf's conversation format
        prompt_template="[INST] {image}\n{question} [/INST]",
        image_placeholder="<image>",
        caption_prompt="Describe the image.",
        image_newline_attr="model.image_newline",
        random_builders=("llava_next",),
    )


@register
def llava_onevision() -> ModelAdapter:
    return ModelAdapter(
        model_types=("llava_onevision",),
        family=Family.LVLM,
        auto_class="AutoModelForImageTextToText",
        vision_config="vision_config",
        text_config="text_config",
        # llava-hf/llava-onevision-qwen2-*-ov-hf's chat format (Qwen2's)
        prompt_template="<|im_start|>user {image}\n{question}<|im_end|><|im_start|>assistant\n",
        image_placeholder="<image>",
        caption_prompt="Describe the image.",
        image_newline_attr="model.image_newline",
        random_builders=("llava_onevision",),
    )
