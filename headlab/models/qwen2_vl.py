"""Qwen2-VL and Qwen2.5-VL: a native-resolution vision transformer (`model.visual`), a patch merger and a
Qwen2 language model with multimodal rotary positions (M-RoPE).

The vision tower sees each image's patches as one sequence of its own (no CLS token; the grid follows the
image's size, `image_grid_thw`), one attention call per image in each layer: headlab maps the k-th call of a
layer to the k-th image. In the input ids an image is `<|vision_start|>`, its merged patch tokens
(`config.image_token_id`, role "image"), `<|vision_end|>`. M-RoPE rotates sections of each head by time,
height and width positions: PINE, which re-rotates keys by 1-D positions, refuses it.
"""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register

_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)


def _qwen_vl(model_type: str) -> ModelAdapter:
    return ModelAdapter(
        model_types=(model_type,),
        family=Family.LVLM,
        auto_class="AutoModelForImageTextToText",
        vision_config="vision_config",
        text_config="text_config",
        image_token_attr="image_token_id",
        prompt_template=_TEMPLATE,  # the chat template of Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL
        image_placeholder="<|image_pad|>",
        caption_prompt="Describe the image.",
        random_builders=(model_type,),
    )


@register
def qwen2_vl() -> ModelAdapter:
    return _qwen_vl("qwen2_vl")


@register
def qwen2_5_vl() -> ModelAdapter:
    return _qwen_vl("qwen2_5_vl")
