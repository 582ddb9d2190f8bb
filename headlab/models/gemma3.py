"""PaliGemma and Gemma 3: a SigLIP vision tower and a Gemma language model whose mask is not causal
everywhere.

PaliGemma attends bidirectionally over its prefix (the image tokens and the prompt) and causally over the
answer; Gemma 3 lets the tokens of one image attend to each other both ways. transformers' mask says so,
and headlab follows the mask (`headlab.probe.call.is_causal_call`), never the module's `is_causal` flag.
PaliGemma's prompt is a task prefix; the processor puts the image tokens and BOS before it. Gemma 3 marks
an image with `<start_of_image>`, which its processor expands to the image's soft tokens.
"""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


@register
def paligemma() -> ModelAdapter:
    return ModelAdapter(
        model_types=("paligemma",),
        family=Family.LVLM,
        auto_class="AutoModelForImageTextToText",
        vision_config="vision_config",
        text_config="text_config",
        prompt_template="{image}answer en {question}\n",  # the "answer en" task prefix of the mix checkpoints
        image_placeholder="<image>",
        caption_prompt="caption en",
        random_builders=("paligemma",),
    )


@register
def gemma3() -> ModelAdapter:
    return ModelAdapter(
        model_types=("gemma3",),
        family=Family.LVLM,
        auto_class="AutoModelForImageTextToText",
        vision_config="vision_config",
        text_config="text_config",
        # google/gemma-3-*-it's chat template
        prompt_template="<start_of_turn>user\n{image}{question}<end_of_turn>\n<start_of_turn>model\n",
        image_placeholder="<start_of_image>",
        caption_prompt="Describe the image.",
        random_builders=("gemma3",),
    )
