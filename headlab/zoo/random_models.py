"""Tiny random-weight models of real Hugging Face architectures, saved with a local tokenizer/processor.

No hub is reachable where headlab is built and tested, so tests, benchmarks and the offline demo build
their models here: the real architecture classes (GPT-2, Llama with grouped-query attention, Qwen2, LLaVA =
CLIP vision tower + Llama, Mistral, Gemma 2 (soft-capped attention), and the vision towers ViT, DeiT,
DINOv2 with and without registers, CLIP and SigLIP vision) at hidden sizes of 32-64 and 2-4 layers, with a
byte-level BPE tokenizer trained on a small built-in corpus. `build_random(name, path)` writes a directory
that `headlab.load(path)` (and `from_pretrained(path)`) reads back through the real loading path. Each
family's adapter names its hand-written builders here (`random_builders`, headlab.models), and the tests
build every one; any other causal-LM model type of transformers is built generically from its config class
at the same tiny sizes (`tiny_config`), which the coverage matrix (headlab.models.matrix) uses.

The weights are random (seeded): these models show no circuits or sinks. Trained tiny models with real
phenomena belong to the zoo proper.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from headlab.errors import HeadlabError
from headlab.zoo.random_lvlms import LVLM_BUILDERS
from headlab.zoo.vocab import BOS, EOS, IMAGE, PAD, UNK, wrap_tokenizer

_CORPUS = """
The quick brown fox jumps over the lazy dog. A red square sits left of a blue circle.
Is there a cat in the image? Yes. Is there a dog in the image? No. When Mary and John went to the store,
John gave a drink to Mary. The war lasted from the year 1732 to the year 1756. The color of the ball is red.
Attention heads read from the residual stream and write back to it. Describe the image in detail.
What is the color of the triangle? The triangle is green. There are two apples and one banana on the table.
USER: ASSISTANT: Question: Answer: Document [1] Document [2] Document [3] Which response is better, A or B?
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 a b c d e f g h i j k l m n o p q r s t u v w x y z
"""

IMAGE_SIZE = 32
PATCH_SIZE = 8


def _train_tokenizer(vocab_size: int, *, add_bos: bool) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, UNK, IMAGE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return wrap_tokenizer(tok, image=True, bos=add_bos)


def _ids(tokenizer: tf.PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _gpt2(path: Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 256) -> None:
    tokenizer = _train_tokenizer(300, add_bos=True)
    config = tf.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        **_ids(tokenizer),
    )
    tf.GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _decoder_config(config_cls, tokenizer, **extra):
    """A 2-layer decoder config of `config_cls` with grouped-query attention (4 query, 2 KV heads)."""
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return config_cls(vocab_size=len(tokenizer), **_ids(tokenizer), **{**sizes, **extra})


def _decoder(config_name: str, model_name: str, *, add_bos: bool, **extra):
    """A builder of a decoder-only model; the classes are looked up by name when it runs, so importing
    this module does not import every architecture's modeling code."""

    def build(path: Path) -> None:
        tokenizer = _train_tokenizer(300, add_bos=add_bos)
        config = _decoder_config(getattr(tf, config_name), tokenizer, **extra)
        getattr(tf, model_name)(config).save_pretrained(path)
        tokenizer.save_pretrained(path)

    return build


_llama = _decoder("LlamaConfig", "LlamaForCausalLM", add_bos=True)
_qwen2 = _decoder("Qwen2Config", "Qwen2ForCausalLM", add_bos=False)
# Mistral with a sliding window shorter than the test prompts, so the window mask is exercised.
_mistral = _decoder("MistralConfig", "MistralForCausalLM", add_bos=True, sliding_window=6)
# Gemma 2: attention soft-capping (capped low, 2.0, so it binds on random weights; the real models use 50),
# alternating sliding-window and full layers.
_gemma2 = _decoder(
    "Gemma2Config",
    "Gemma2ForCausalLM",
    add_bos=True,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=6,
    attn_logit_softcapping=2.0,
)


def _clip_vision_config(*, layers: int = 2, hidden: int = 32, heads: int = 4) -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=hidden,
    )


def _image_processor() -> tf.CLIPImageProcessorPil:
    return tf.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def llava_processor(tokenizer) -> tf.LlavaProcessor:
    """The LLaVA processor of the tiny models: 32 x 32 images, 8-pixel patches, CLS dropped (16 tokens)."""
    return tf.LlavaProcessor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE,
    )


def _llava(path: Path) -> None:
    tokenizer = _train_tokenizer(300, add_bos=True)
    text = _decoder_config(tf.LlamaConfig, tokenizer)
    vision = _clip_vision_config(layers=2, hidden=32, heads=4)
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=n_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    tf.LlavaForConditionalGeneration(config).save_pretrained(path)
    processor = llava_processor(tokenizer)
    processor.save_pretrained(path)


def _vision_config(cls, **extra):
    """A tiny vision tower config of `cls`: 2 layers, width 32, 4 heads, 32-pixel images in 8-pixel patches
    (any of them replaced, or others added, by `extra`)."""
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    return cls(**(sizes | extra))


def _vit(path: Path) -> None:
    tf.ViTForImageClassification(_vision_config(tf.ViTConfig, num_labels=4)).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _deit(path: Path) -> None:
    """DeiT: a CLS and a distillation token before the patch grid."""
    tf.DeiTForImageClassification(_vision_config(tf.DeiTConfig, num_labels=4)).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _dinov2(path: Path) -> None:
    tf.Dinov2Model(_vision_config(tf.Dinov2Config)).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _clip_vision(path: Path) -> None:
    tf.CLIPVisionModel(_clip_vision_config()).save_pretrained(path)
    _image_processor().save_pretrained(path)


def _dinov2_with_registers(path: Path) -> None:
    """DINOv2 with registers: CLS, then 4 register tokens, then the patch grid."""
    tf.Dinov2WithRegistersModel(
        _vision_config(tf.Dinov2WithRegistersConfig, num_register_tokens=4)
    ).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _vit_msn(path: Path) -> None:
    tf.ViTMSNModel(_vision_config(tf.ViTMSNConfig)).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _ijepa(path: Path) -> None:
    """I-JEPA: the patch grid alone, no CLS token."""
    tf.IJepaModel(_vision_config(tf.IJepaConfig)).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _beit(path: Path) -> None:
    """BEiT with a relative position bias per layer; its bias tables start at zero when built, so they are
    filled with random values (a trained model's are not zero, and a zero bias would hide it)."""
    model = tf.BeitModel(_vision_config(tf.BeitConfig, use_relative_position_bias=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


def _siglip_vision(path: Path) -> None:
    """SigLIP's vision tower: the patch grid alone, no CLS token."""
    tf.SiglipVisionModel(_vision_config(tf.SiglipVisionConfig)).save_pretrained(path)
    tf.ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)


RANDOM_BUILDERS: dict[str, Callable[[Path], None]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "qwen2": _qwen2,
    "llava": _llava,
    "vit": _vit,
    "clip_vision": _clip_vision,
    "deit": _deit,
    "dinov2": _dinov2,
    "dinov2_with_registers": _dinov2_with_registers,
    "siglip_vision": _siglip_vision,
    "vit_msn": _vit_msn,
    "ijepa": _ijepa,
    "beit": _beit,
    **LVLM_BUILDERS,
}

# The generic builder's tiny sizes, by the names most configs use (a config that names a size otherwise,
# like GPT-2's n_embd, maps it through its attribute_map); only the names a config class has are passed.
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    # a window shorter than the test prompts, so sliding-window masks are exercised where a config has one
    sliding_window=6,
    # mixtures of experts: few small experts
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)
# per model type: sizes its config names differently, or values its defaults get wrong at this size
_TINY_FIXES: dict[str, dict] = {
    "gptj": dict(rotary_dim=8),  # partial rotary, within the 16-wide heads (default 64)
    "codegen": dict(rotary_dim=8),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=6),  # one pattern per layer
}


def _config_fields(config_cls) -> set[str]:
    """The keyword names a config class takes: its dataclass fields and its attribute_map's aliases."""
    names = (
        {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    )
    names |= set(inspect.signature(config_cls.__init__).parameters) - {"self", "kwargs"}
    return names | set(getattr(config_cls, "attribute_map", {}))


def tiny_config(model_type: str, tokenizer) -> tf.PretrainedConfig:
    """The real config class of `model_type` at the tiny sizes (only the size names the class has, plus the
    type's fixes), with the tokenizer's vocabulary and special-token ids."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    known = _config_fields(CONFIG_MAPPING[model_type])
    sizes = {k: v for k, v in _TINY.items() if k in known}
    return tf.AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), **_ids(tokenizer), **sizes, **_TINY_FIXES.get(model_type, {})
    )


def _generic(model_type: str, path: Path) -> None:
    """Any causal LM transformers knows, from its real config class: AutoModelForCausalLM.from_config,
    saved with save_pretrained, with the tiny BPE tokenizer. HeadlabError when it cannot be built."""
    tokenizer = _train_tokenizer(300, add_bos=True)
    try:
        model = tf.AutoModelForCausalLM.from_config(tiny_config(model_type, tokenizer))
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError, ImportError) as err:
        raise HeadlabError(
            f"could not build a tiny random {model_type!r} as a causal LM from its config class "
            f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); it is not a causal LM, or its "
            "config needs sizes the generic builder does not set (headlab.zoo.random_models._TINY_FIXES)"
        ) from err
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _known_model_type(name: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return name in CONFIG_MAPPING_NAMES


def _builder_of_type(name: str) -> str:
    """The builder of a coverage-matrix model type whose builder is named otherwise (BLIP-2's "blip-2" is
    built by "blip_2"), else `name` itself."""
    from headlab.models.matrix import entries

    return next((e.random_builder for e in entries() if e.model_type == name), name)


def build_random(name: str, path: str | Path, *, seed: int = 0, **sizes) -> Path:
    """Build the tiny random-weight model `name` and save it under `path`: one of RANDOM_BUILDERS (the
    hand-written builders the adapters name), else any model type transformers knows, built generically as
    a causal LM from its config class (`tiny_config`).

    Extra keyword sizes are passed to a hand-written builder where it takes them (GPT-2: n_layer, n_embd,
    n_head, n_positions), which the benchmarks use for a GPT-2-small-shaped model. Raises HeadlabError for
    a name that is neither, or a type the generic builder cannot build (saying why).
    """
    path = Path(path)
    name = _builder_of_type(name)
    if name not in RANDOM_BUILDERS and not _known_model_type(name):
        raise HeadlabError(
            f"no random builder named {name!r} and no such transformers model type; choose one of "
            f"{sorted(RANDOM_BUILDERS)} or a causal-LM model type (e.g. gpt_neox, phi3, qwen3)"
        )
    if name not in RANDOM_BUILDERS and sizes:
        raise HeadlabError(f"the generic builder of {name!r} takes no sizes ({sorted(sizes)})")
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if name in RANDOM_BUILDERS:
        RANDOM_BUILDERS[name](path, **sizes)
    else:
        _generic(name, path)
    return path
