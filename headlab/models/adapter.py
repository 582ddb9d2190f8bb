"""What headlab must be told about a model family: `ModelAdapter`, a frozen declaration, and `Family`.

Everything that can be read from the model is discovered, not declared (`headlab.models.discovery`): the
towers (every attention module sits at `<tower prefix>.<layer index>.<attention attr>`), the route of their
attention, their layer, head, KV-head and head-dim counts, sliding windows, soft-caps, whether they are
causal (the mask transformers builds is the truth), the MLP and the rotary embedding. An adapter declares
only the rest, and each field's default is the generic answer, so a family with nothing special needs no
adapter of its own (`headlab.models.registry.DEFAULT` serves it).

Names of transformers classes are strings, resolved when a model is loaded: declaring a family imports
neither torch nor any modeling code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from headlab.errors import UnsupportedModelError
from headlab.models.discovery import IMAGE_TOKEN, config_value


class Family(enum.Enum):
    LLM = "llm"
    LVLM = "lvlm"
    VIT = "vit"


# the transformers auto class of each family's preprocessing (a tokenizer, a processor, an image processor)
_PROCESSOR_CLASS = {
    Family.LLM: "AutoTokenizer",
    Family.LVLM: "AutoProcessor",
    Family.VIT: "AutoImageProcessor",
}


@dataclass(frozen=True, kw_only=True)
class ModelAdapter:
    """The declarations of one model family; every default is the generic answer.

    Config attributes are named, not read: `image_token_attr="image_token_index"` means the image token id
    is `config.image_token_index`. Module attributes are looked up on the model's real module tree.
    """

    name: str = "default"  # the registry's key: @register sets it from the declaring function's name
    model_types: tuple[str, ...] = ()  # the `config.model_type` values this adapter serves
    family: Family = Family.LLM
    auto_class: str = "AutoModelForCausalLM"  # the transformers auto class that loads a checkpoint
    # the model's own attention outside headlab's blocks (capture / intervene run headlab's function)
    attention: str = "sdpa"
    # vision encoders: CLS-like tokens (CLS, distillation, registers) before the patch grid (an LVLM's
    # vision tower takes this from its own family's adapter, found by its vision sub-config)
    prefix_tokens: int = 0
    # vision encoders: the config attribute holding how many register tokens follow those prefix tokens
    # (DINOv2 with registers: `num_register_tokens`); registers get their own role, "register"
    register_tokens_attr: str | None = None
    # LVLMs: the config attributes of the sub-configs of the vision tower and the language model
    vision_config: str | None = None
    text_config: str | None = None
    # LVLMs: the config attribute holding the image token id (None: discovered, the first of
    # `discovery.IMAGE_TOKEN` the config sets), and the one holding how many tokens an image expands to in
    # the input ids (None: not fixed by the config)
    image_token_attr: str | None = None
    tokens_per_image_attr: str | None = None
    # the rotary embedding: an attribute of the module that holds a tower's layer list (None: discovered,
    # `rotary_emb` or the one `...RotaryEmbedding` child there; headlab.models.discovery)
    rotary_attr: str | None = None
    # the MLP: an attribute of each decoder layer (None: discovered, `mlp`, `feed_forward`, ...)
    mlp_attr: str | None = None
    # LVLMs: the chat template around one question ({image}: where the image goes, {question}), the
    # image placeholder the processor expands, and the instruction that asks for a caption
    prompt_template: str | None = None
    image_placeholder: str | None = None
    # whether a prompt marks where its image goes (False: the processor puts the image tokens itself, BLIP-2)
    prompt_holds_image: bool = True
    # LVLMs: the module attribute (a path from the model) of a learned vector the model puts after each row of
    # image features (LLaVA-NeXT's `image_newline`): those image tokens get role "image_newline"
    image_newline_attr: str | None = None
    caption_prompt: str | None = None
    # tiny random models of the family for tests: names in headlab.zoo.random_models.RANDOM_BUILDERS
    random_builders: tuple[str, ...] = ()

    @property
    def processor_class(self) -> str:
        """The transformers auto class that reads the tokenizer / processor files."""
        return _PROCESSOR_CLASS[self.family]

    def sub_config(self, config, tower: str):
        """The config of `tower` ("vision" or "lm"): its sub-config where the family declares one."""
        attr = self.vision_config if tower == "vision" else self.text_config
        return getattr(config, attr) if attr is not None else config

    def register_tokens(self, config) -> int:
        """How many register tokens the vision tower puts between its prefix tokens and its patch grid."""
        if self.register_tokens_attr is None:
            return 0
        return getattr(config, self.register_tokens_attr, 0) or 0

    def image_token_id(self, config) -> int | None:
        """The id of the image token in the input ids (LVLMs), None for other families."""
        if self.family is not Family.LVLM:
            return None
        names = (self.image_token_attr,) if self.image_token_attr else IMAGE_TOKEN
        return config_value(config, names)

    def tokens_per_image(self, config) -> int | None:
        """How many image tokens one image expands to (LVLMs whose config fixes it), else None."""
        if self.tokens_per_image_attr is None:
            return None
        return getattr(config, self.tokens_per_image_attr, None)

    def prompt(self, question: str, *, image: str | None = None) -> str:
        """`question` in the family's chat template, with the image placeholder (`image`: another
        spelling of it, e.g. the processor's) where the image goes."""
        if self.prompt_template is None:
            raise UnsupportedModelError(
                f"the {self.name} adapter declares no prompt template; write the prompt (with the image "
                "placeholder) yourself"
            )
        return self.prompt_template.format(image=image or self.image_placeholder or "", question=question)
