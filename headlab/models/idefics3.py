"""Idefics3: a SigLIP-like vision tower (no CLS token) over image tiles, a pixel-shuffle
connector and a Llama language model.

The processor splits an image into tiles plus a downscaled global image; each is one row of the vision
tower's batch (headlab gives every tile its image's example and averages the tile rows' statistics). In the
input ids each tile's tokens (`config.image_token_id`, role "image") sit between `<fake_token_around_image>`
and a `<row_i_col_j>` (or `<global-img>`) token, which are text.
"""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


@register
def idefics3() -> ModelAdapter:
    return ModelAdapter(
        model_types=("idefics3",),
        family=Family.LVLM,
        auto_class="AutoModelForImageTextToText",
        vision_config="vision_config",
        text_config="text_config",
        image_token_attr="image_token_id",
        prompt_template="<|begin_of_text|>User:{image}{question}<end_of_utterance>\nAssistant:",
        image_placeholder="<image>",
        caption_prompt="Describe the image.",
        random_builders=("idefics3",),
    )
