"""Tiny random-weight models of real Hugging Face architectures, saved with a local tokenizer/processor.

No hub is reachable where headlab is built and tested, so tests, benchmarks and the offline demo build
their models here: the real architecture classes (GPT-2, Llama with grouped-query attention, Qwen2, LLaVA =
CLIP vision tower + Llama, Mistral, Gemma 2 (soft-capped attention), ViT, DeiT, DINOv2, CLIP vision) at hidden sizes of 32-64 and 2-4 layers, with a byte-level
BPE tokenizer trained on a small built-in corpus. `build_random(name, path)` writes a directory that
`headlab.load(path)` (and `from_pretrained(path)`) reads back through the real loading path. Each family's
adapter names its builders here (`random_builders`, headlab.models), and the tests build every one.

The weights are random (seeded): these models show no circuits or sinks. Trained tiny models with real
phenomena belong to the zoo proper.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from headlab.errors import HeadlabError
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
    return cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        **extra,
    )


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
}


def build_random(name: str, path: str | Path, *, seed: int = 0, **sizes) -> Path:
    """Build the tiny random-weight model `name` (one of RANDOM_BUILDERS) and save it under `path`.

    Extra keyword sizes are passed to the builder where it takes them (GPT-2: n_layer, n_embd, n_head,
    n_positions), which the benchmarks use for a GPT-2-small-shaped model.
    """
    if name not in RANDOM_BUILDERS:
        raise HeadlabError(f"no random builder named {name!r}; choose one of {sorted(RANDOM_BUILDERS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    RANDOM_BUILDERS[name](path, **sizes)
    return path
