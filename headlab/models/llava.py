"""LLaVA (LLaVA-1.5 and its tiny zoo copy): a CLIP vision tower, a projector and a Llama language model.

The processor expands the `<image>` placeholder of a prompt to `config.image_seq_length` image tokens
(id `config.image_token_index`); the vision tower's CLS and patch grid come from its own family (CLIP).
The LLaVA-1.5 conversation format is the prompt template; `conversation` and `CAPTION_PROMPT` are what the
reports and the zoo recipe write prompts with.
"""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register

IMAGE_PLACEHOLDER = "<image>"
CAPTION_PROMPT = "Describe the image."


@register
def llava() -> ModelAdapter:
    return ModelAdapter(
        model_types=("llava",),
        family=Family.LVLM,
        auto_class="AutoModelForImageTextToText",
        vision_config="vision_config",
        text_config="text_config",
        image_token_attr="image_token_index",
        tokens_per_image_attr="image_seq_length",
        prompt_template="USER: {image}\n{question} ASSISTANT:",
        image_placeholder=IMAGE_PLACEHOLDER,
        caption_prompt=CAPTION_PROMPT,
        random_builders=("llava",),
    )


def conversation(question: str) -> str:
    """The LLaVA-1.5 prompt around one question (the processor expands <image> to the image tokens)."""
    return llava.prompt(question)
