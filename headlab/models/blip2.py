"""BLIP-2 and InstructBLIP: a vision tower, a Q-Former and an OPT (or Flan-T5) language model.

The Q-Former's learned query tokens cross-attend to the vision tower's output; its `num_query_tokens`
outputs become as many image tokens (`config.image_token_index`, role "image") at the start of the language
model's input. Its processor puts those image tokens before the prompt itself, so a prompt holds no image
placeholder. The Q-Former's attention stack is not a tower headlab captures (`LoadedModel.uncaptured`): its
self-attention mixes queries and instruction text and its cross-attention reads image features, neither a
sequence of the example's tokens. `generate()` runs the language model's own generate() with embeddings;
the session follows it (`headlab.probe.session`). Only decoder-only language models (OPT) are served: a
Flan-T5 language model is an encoder-decoder, and its stacks are refused when loaded.
"""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


def _blip(model_type: str, template: str, builder: str) -> ModelAdapter:
    return ModelAdapter(
        model_types=(model_type,),
        family=Family.LVLM,
        auto_class="AutoModelForImageTextToText",
        vision_config="vision_config",
        text_config="text_config",
        image_token_attr="image_token_index",
        prompt_template=template,
        prompt_holds_image=False,
        caption_prompt="A picture of",
        random_builders=(builder,),
    )


@register
def blip_2() -> ModelAdapter:
    return _blip("blip-2", "Question: {question} Answer:", "blip_2")  # the BLIP-2 OPT VQA prompt


@register
def instructblip() -> ModelAdapter:
    return _blip("instructblip", "{question}", "instructblip")  # the instruction alone
