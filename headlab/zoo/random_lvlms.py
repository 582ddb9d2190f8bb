"""Tiny random-weight vision-language models (image-text-to-text) of real transformers architectures.

Each builder writes a directory holding a model of the real class (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL, PaliGemma, Gemma 3, Idefics3, SmolVLM, Aya Vision, Mistral 3, InstructBLIP, BLIP-2, Mllama) and
its processor, the way headlab.zoo.random_models builds LLaVA: `AutoModelForImageTextToText.from_pretrained
(path)` and `AutoProcessor.from_pretrained(path)` read it back offline. The sizes are tiny: 2-layer vision
towers and language models at hidden sizes of 32-64, 32 x 32 images (64 x 32 ones tile where a type tiles)
in at most a few dozen image tokens; the tokenizer is random_models' byte-level BPE one with every special
token the processor needs (image token, begin/end of image, vision start/end, row/column tags, ...) added as a
special token whose id the config repeats. The image processors are the PIL ones.

Five processors cannot be built without torchvision (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and SmolVLM
require a video processor, and SmolVLM num2words; PixtralProcessor, Mistral 3's, imports torchvision): their
builders write the files the processor's save_pretrained would (`_save_processor_files`), so AutoProcessor
reads them only where torchvision is installed; the model loads and runs everywhere.

`LVLM_BUILDERS` maps each model type to its builder (BLIP-2's "blip-2" as "blip_2"); random_models merges
it into RANDOM_BUILDERS, and `build_random` seeds torch before it calls one, so the builds are deterministic.
The helpers of random_models are imported when a builder runs, as random_models imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import transformers as tf
from tokenizers import AddedToken

from headlab.zoo.vocab import BOS, EOS, IMAGE, PAD, UNK


def _tokenizer(
    *, add_bos: bool, named: dict[str, str] | None = None, extra: Sequence[str] = (), name_image: bool = True
):
    """The tiny BPE tokenizer of random_models plus special tokens: `named` ones (image_token, boi_token, ...:
    attributes of the tokenizer that processors read; image_token is <image> unless named otherwise, and
    unnamed when not `name_image`) and unnamed `extra` ones, appended after the trained vocabulary (<image>
    is in it already)."""
    from headlab.zoo.random_models import _train_tokenizer

    backend = _train_tokenizer(300, add_bos=add_bos).backend_tokenizer
    named = {**({"image_token": IMAGE} if name_image else {}), **(named or {})}
    new = [t for t in dict.fromkeys([*named.values(), *extra]) if backend.token_to_id(t) is None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=named,
    )


def _id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def _save(path: Path, model, processor) -> None:
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _save_processor_files(
    path: Path,
    processor_class: str,
    tokenizer,
    image_processor,
    video_processor: dict | None = None,
    **kwargs,
) -> None:
    """Write what `processor_class(...).save_pretrained(path)` writes, for the processors that cannot be built
    without torchvision (or num2words): those with a required video processor (LLaVA-OneVision, Qwen2-VL,
    Qwen2.5-VL, SmolVLM) and PixtralProcessor, whose module imports torchvision. The tokenizer, then
    processor_config.json holding the image processor's settings (the PIL one's, saved under the base class
    name as save_pretrained does), the video processor's (`video_processor`, its type and sizes) and the
    processor's own arguments. AutoProcessor reads it back where those packages are installed."""
    tokenizer.save_pretrained(path)
    config = {"image_processor": json.loads(image_processor.to_json_string()), **kwargs}
    if video_processor is not None:
        config["video_processor"] = video_processor
    config["processor_class"] = processor_class
    (Path(path) / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# any-resolution tiling (LLaVA-NeXT, LLaVA-OneVision): a 32 x 32 image is one 32 x 32 tile plus the resized
# base image, a 64 x 32 (W x H) one two tiles plus the base
_PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def _llava_next(path: Path) -> None:
    """LLaVA-NeXT: CLIP tower (CLS dropped) + Llama; base image + any-res tiles, an image_newline per row."""
    from headlab.zoo.random_models import IMAGE_SIZE, PATCH_SIZE, _clip_vision_config, _decoder_config

    tokenizer = _tokenizer(add_bos=True)
    config = tf.LlavaNextConfig(
        vision_config=_clip_vision_config(layers=2, hidden=32, heads=4),
        text_config=_decoder_config(tf.LlamaConfig, tokenizer),
        image_token_index=_id(tokenizer, IMAGE),
        image_grid_pinpoints=_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=_PINPOINTS,
    )
    processor = tf.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE,
    )
    _save(path, tf.LlavaNextForConditionalGeneration(config), processor)


def _llava_onevision(path: Path) -> None:
    """LLaVA-OneVision: SigLIP tower (all patches) + Qwen2; base image + any-res tiles. Its processor needs
    a video processor (torchvision): its files are written by hand (_save_processor_files)."""
    from headlab.zoo.random_models import IMAGE_SIZE, PATCH_SIZE, _decoder_config, _vision_config

    tokenizer = _tokenizer(add_bos=False, named={"video_token": "<video>"})
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = tf.LlavaOnevisionConfig(
        vision_config=_vision_config(tf.SiglipVisionConfig),
        text_config=_decoder_config(tf.Qwen2Config, tokenizer),
        image_token_index=_id(tokenizer, IMAGE),
        video_token_index=_id(tokenizer, "<video>"),
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    image_processor = tf.LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=_PINPOINTS
    )
    tf.LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    video = {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }
    _save_processor_files(
        path,
        "LlavaOnevisionProcessor",
        tokenizer,
        image_processor,
        video,
        num_image_tokens=n_patches,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_token=IMAGE,
        video_token="<video>",
    )


# towers that merge 2 x 2 patches into one image token (Qwen2-VL, Qwen2.5-VL, Aya Vision, Mistral 3) use
# 4-pixel patches, so a 32 x 32 image is 64 vision tokens and 16 image tokens of the language model
_SMALL_PATCH = 4


def _paligemma(path: Path) -> None:
    """PaliGemma: SigLIP + Gemma; the processor writes image tokens, <bos>, the prompt and a newline (the
    prefix, attended bidirectionally) and adds its <locXXXX>/<segXXX> tokens to the tokenizer."""
    from headlab.zoo.random_models import IMAGE_SIZE, PATCH_SIZE, _decoder_config, _vision_config

    # no <bos> from the tokenizer: the processor writes it after the image tokens
    tokenizer = _tokenizer(add_bos=False)
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    image_processor = tf.SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=n_patches
    )
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = _decoder_config(tf.GemmaConfig, tokenizer, head_dim=16)  # the processor's extra tokens counted
    config = tf.PaliGemmaConfig(
        vision_config=_vision_config(tf.SiglipVisionConfig),
        text_config=text,
        image_token_index=_id(tokenizer, IMAGE),
        vocab_size=len(tokenizer),
        projection_dim=text.hidden_size,
        hidden_size=text.hidden_size,
    )
    _save(path, tf.PaliGemmaForConditionalGeneration(config), processor)


_BOI, _EOI, _SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


def _gemma3(path: Path) -> None:
    """Gemma 3: SigLIP + Gemma 3 text (a sliding-window and a full layer); the prompt's <start_of_image>
    becomes <start_of_image>, 16 <image_soft_token>s (attended bidirectionally), <end_of_image>."""
    from headlab.zoo.random_models import IMAGE_SIZE, PATCH_SIZE, _decoder_config, _vision_config

    tokenizer = _tokenizer(add_bos=True, named={"image_token": _SOFT, "boi_token": _BOI, "eoi_token": _EOI})
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    text = _decoder_config(
        tf.Gemma3TextConfig,
        tokenizer,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=24,  # shorter than the test prompts, longer than an image's 18 tokens (as in Gemma 3)
        layer_types=["sliding_attention", "full_attention"],
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=_vision_config(tf.SiglipVisionConfig),
        mm_tokens_per_image=n_patches,
        boi_token_index=_id(tokenizer, _BOI),
        eoi_token_index=_id(tokenizer, _EOI),
        image_token_index=_id(tokenizer, _SOFT),
    )
    image_processor = tf.Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False
    )
    processor = tf.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=n_patches
    )
    _save(path, tf.Gemma3ForConditionalGeneration(config), processor)


def _row_col_tokens() -> list[str]:
    return [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


_IDEFICS_NAMED = {
    "image_token": IMAGE,
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}


# a 32 x 32 tile is 16 patches, pixel-shuffled by 2 into 4 image tokens (a 32 x 32 image is resized to
# 64 x 64: 4 tiles and the global image, 20 image tokens)
_IDEFICS_SEQ = 4


def _idefics3_config(config_cls, vision_cls, tokenizer):
    """Idefics3 / SmolVLM: a 32 x 32 SigLIP-like tower in 8-pixel patches, pixel-shuffled by 2, + Llama."""
    from headlab.zoo.random_models import _decoder_config, _vision_config

    return config_cls(
        vision_config=_vision_config(vision_cls),
        text_config=_decoder_config(tf.LlamaConfig, tokenizer),
        image_token_id=_id(tokenizer, IMAGE),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )


def _idefics3(path: Path) -> None:
    """Idefics3: its vision model + Llama; an image is resized to a longest edge of 64 and split into
    32 x 32 tiles (each <fake_token_around_image><row_i_col_j> and 4 <image>) plus the whole image at 32 px
    (<fake_token_around_image><global-img> and 4 <image>): 20 image tokens for 32 x 32, 12 for 64 x 32."""
    from headlab.zoo.random_models import IMAGE_SIZE

    tokenizer = _tokenizer(add_bos=True, named=_IDEFICS_NAMED, extra=_row_col_tokens())
    config = _idefics3_config(tf.Idefics3Config, tf.Idefics3VisionConfig, tokenizer)
    image_processor = tf.Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
    )
    processor = tf.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=_IDEFICS_SEQ
    )
    _save(path, tf.Idefics3ForConditionalGeneration(config), processor)


_AYA_TOKENS = {
    "start_of_img_token": "<|START_OF_IMG|>",
    "end_of_img_token": "<|END_OF_IMG|>",
    "img_patch_token": "<|IMG_PATCH|>",
    "img_line_break_token": "<|IMG_LINE_BREAK|>",
    "tile_token": "TILE",
    "tile_global_token": "TILE_GLOBAL",
}


def _aya_vision(path: Path) -> None:
    """Aya Vision: SigLIP (4-pixel patches, pixel-shuffled by 2) + Cohere2; the prompt's <image> becomes
    <|START_OF_IMG|>, per tile TILE_i and 16 <|IMG_PATCH|>s (a 64 x 32 image: 2 tiles and TILE_GLOBAL with the
    whole image), <|END_OF_IMG|>."""
    from headlab.zoo.random_models import IMAGE_SIZE, _decoder_config, _vision_config

    tokenizer = _tokenizer(add_bos=True, extra=list(_AYA_TOKENS.values()))
    vision = _vision_config(tf.SiglipVisionConfig, patch_size=_SMALL_PATCH)
    text = _decoder_config(
        tf.Cohere2Config,
        tokenizer,
        head_dim=16,
        sliding_window=24,  # shorter than the test prompts, longer than a tile's 16 image tokens
        layer_types=["sliding_attention", "full_attention"],
    )
    config = tf.AyaVisionConfig(
        vision_config=vision,
        text_config=text,
        downsample_factor=2,
        image_token_index=_id(tokenizer, _AYA_TOKENS["img_patch_token"]),
    )
    image_processor = tf.GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = tf.AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_SMALL_PATCH,
        img_size=IMAGE_SIZE,
        downsample_factor=2,
        image_token=IMAGE,
        **_AYA_TOKENS,
    )
    _save(path, tf.AyaVisionForConditionalGeneration(config), processor)


_PIXTRAL_TOKENS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}


def _mistral3(path: Path) -> None:
    """Mistral 3: Pixtral tower (4-pixel patches, 2D RoPE, images at their own size up to 64 px) + Mistral;
    patches merged 2 x 2: a 32 x 32 image is 4 rows of 4 [IMG], each ended by [IMG_BREAK] ([IMG_END] last).
    PixtralProcessor imports torchvision: its files are written by hand (_save_processor_files)."""
    from headlab.zoo.random_models import IMAGE_SIZE, _decoder_config, _vision_config

    tokenizer = _tokenizer(add_bos=True, named=_PIXTRAL_TOKENS)
    vision = _vision_config(
        tf.PixtralVisionConfig, head_dim=8, image_size=2 * IMAGE_SIZE, patch_size=_SMALL_PATCH
    )
    config = tf.Mistral3Config(
        vision_config=vision,
        text_config=_decoder_config(tf.MistralConfig, tokenizer, head_dim=16),
        image_token_index=_id(tokenizer, "[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    image_processor = tf.PixtralImageProcessorPil(
        size={"longest_edge": 2 * IMAGE_SIZE}, patch_size={"height": _SMALL_PATCH, "width": _SMALL_PATCH}
    )
    tf.Mistral3ForConditionalGeneration(config).save_pretrained(path)
    _save_processor_files(
        path,
        "PixtralProcessor",
        tokenizer,
        image_processor,
        patch_size=_SMALL_PATCH,
        spatial_merge_size=2,
        **_PIXTRAL_TOKENS,
    )


_QUERY_TOKENS = 8


def _opt_config(tokenizer) -> tf.OPTConfig:
    return tf.OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _blip_towers(vision_cls, qformer_cls, tokenizer_for_qformer=None):
    from headlab.zoo.random_models import _vision_config

    vision = _vision_config(vision_cls)
    qformer = qformer_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=32,
        max_position_embeddings=128,
        **(
            {"vocab_size": len(tokenizer_for_qformer), "pad_token_id": tokenizer_for_qformer.pad_token_id}
            if tokenizer_for_qformer is not None
            else {}
        ),
    )
    return vision, qformer


def _blip_image_processor():
    from headlab.zoo.random_models import IMAGE_SIZE

    return tf.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


_VISION_START, _VISION_END, _IMAGE_PAD, _VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _qwen_vl(path: Path, *, v2_5: bool) -> None:
    """Qwen2-VL / Qwen2.5-VL: a vision tower (`model.visual`: 4-pixel patches, 2 frames a patch, merged 2 x 2)
    + a Qwen2 LM with multimodal RoPE (mrope_section [2, 3, 3]: 16-wide heads); the prompt writes
    <|vision_start|><|image_pad|><|vision_end|> and the processor repeats <|image_pad|> once per merged patch
    (16 for 32 x 32). Qwen2.5-VL's tower: window attention in layer 0 (16-pixel windows), full in layer 1."""
    from headlab.zoo.random_models import IMAGE_SIZE, _ids

    tokenizer = _tokenizer(
        add_bos=False,
        named={"image_token": _IMAGE_PAD, "video_token": _VIDEO_PAD},
        extra=[_VISION_START, _VISION_END],
    )
    prefix = "Qwen2_5_VL" if v2_5 else "Qwen2VL"
    text = getattr(tf, f"{prefix}TextConfig")(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **_ids(tokenizer),
    )
    tower = dict(
        depth=2,
        num_heads=4,
        in_channels=3,
        patch_size=_SMALL_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if v2_5:
        vision = tf.Qwen2_5_VLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            window_size=4 * _SMALL_PATCH,
            fullatt_block_indexes=[1],
            **tower,
        )
    else:
        vision = tf.Qwen2VLVisionConfig(embed_dim=32, hidden_size=64, mlp_ratio=2, **tower)
    config = getattr(tf, f"{prefix}Config")(
        text_config=text,
        vision_config=vision,
        image_token_id=_id(tokenizer, _IMAGE_PAD),
        video_token_id=_id(tokenizer, _VIDEO_PAD),
        vision_start_token_id=_id(tokenizer, _VISION_START),
        vision_end_token_id=_id(tokenizer, _VISION_END),
    )
    getattr(tf, f"{prefix}ForConditionalGeneration")(config).save_pretrained(path)
    # between 16 x 16 and 64 x 64 pixels, in multiples of 8 (patch x merge)
    sizes = dict(
        size={"shortest_edge": (IMAGE_SIZE // 2) ** 2, "longest_edge": (2 * IMAGE_SIZE) ** 2},
        patch_size=_SMALL_PATCH,
        temporal_patch_size=2,
        merge_size=2,
    )
    image_processor = tf.Qwen2VLImageProcessorPil(**sizes)
    video = {"video_processor_type": "Qwen2VLVideoProcessor", **sizes}
    processor = "Qwen2_5_VLProcessor" if v2_5 else "Qwen2VLProcessor"
    _save_processor_files(path, processor, tokenizer, image_processor, video)


def _qwen2_vl(path: Path) -> None:
    _qwen_vl(path, v2_5=False)


def _qwen2_5_vl(path: Path) -> None:
    _qwen_vl(path, v2_5=True)


def _smolvlm(path: Path) -> None:
    """SmolVLM: Idefics3's design (vision model + Llama, pixel shuffle by 2, 32 x 32 tiles plus a global
    image); its processor needs a video processor (torchvision) and num2words: files written by hand."""
    from headlab.zoo.random_models import IMAGE_SIZE

    tokenizer = _tokenizer(
        add_bos=True, named={**_IDEFICS_NAMED, "video_token": "<video>"}, extra=_row_col_tokens()
    )
    config = _idefics3_config(tf.SmolVLMConfig, tf.SmolVLMVisionConfig, tokenizer)
    tf.SmolVLMForConditionalGeneration(config).save_pretrained(path)
    sizes = dict(size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE})
    image_processor = tf.SmolVLMImageProcessorPil(**sizes)
    video = {"video_processor_type": "SmolVLMVideoProcessor", **sizes}
    _save_processor_files(
        path, "SmolVLMProcessor", tokenizer, image_processor, video, image_seq_len=_IDEFICS_SEQ
    )


# BLIP-2 and InstructBLIP: the tokenizer must not name an image token: their processors then add <image> as
# an AddedToken themselves (a named one is a str, on which their __call__ fails: `.content`)


def _blip_2(path: Path) -> None:
    """BLIP-2: ViT + Q-Former (8 queries, cross-attending to the patches every other layer) + OPT; the
    processor writes 8 <image> tokens in front of the prompt, which the model fills with the queries."""
    tokenizer = _tokenizer(add_bos=True, name_image=False)
    vision, qformer = _blip_towers(tf.Blip2VisionConfig, tf.Blip2QFormerConfig)
    config = tf.Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=_opt_config(tokenizer),
        num_query_tokens=_QUERY_TOKENS,
        image_text_hidden_size=32,
        image_token_index=_id(tokenizer, IMAGE),
    )
    processor = tf.Blip2Processor(
        image_processor=_blip_image_processor(), tokenizer=tokenizer, num_query_tokens=_QUERY_TOKENS
    )
    _save(path, tf.Blip2ForConditionalGeneration(config), processor)


def _instructblip(path: Path) -> None:
    """InstructBLIP: BLIP-2 whose Q-Former also reads the prompt (its own tokenizer: the same tiny BPE)."""
    tokenizer = _tokenizer(add_bos=True, name_image=False)
    qformer_tokenizer = _tokenizer(add_bos=True, name_image=False)
    vision, qformer = _blip_towers(
        tf.InstructBlipVisionConfig, tf.InstructBlipQFormerConfig, qformer_tokenizer
    )
    config = tf.InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=_opt_config(tokenizer),
        num_query_tokens=_QUERY_TOKENS,
        image_token_index=_id(tokenizer, IMAGE),
    )
    processor = tf.InstructBlipProcessor(
        image_processor=_blip_image_processor(),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=_QUERY_TOKENS,
    )
    _save(path, tf.InstructBlipForConditionalGeneration(config), processor)


def _mllama(path: Path) -> None:
    """Mllama (Llama 3.2 Vision): a tiled vision model (32 x 32 tiles, up to 2, 8-pixel patches; a local and
    a 1-layer global transformer) read by Llama through cross-attention in layer 1 (`cross_attn`); the
    prompt keeps one <|image|> token per image."""
    from headlab.zoo.random_models import IMAGE_SIZE, PATCH_SIZE, _decoder_config

    tokenizer = _tokenizer(add_bos=True, named={"image_token": "<|image|>"}, extra=["<|python_tag|>"])
    vision = tf.MllamaVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        max_num_tiles=2,
        intermediate_layers_indices=[0],
        vision_output_dim=64,  # hidden_size x (1 + len(intermediate_layers_indices))
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    config = tf.MllamaConfig(
        vision_config=vision,
        text_config=_decoder_config(tf.MllamaTextConfig, tokenizer, cross_attention_layers=[1]),
        image_token_index=_id(tokenizer, "<|image|>"),
    )
    image_processor = tf.MllamaImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=2
    )
    processor = tf.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    _save(path, tf.MllamaForConditionalGeneration(config), processor)


LVLM_BUILDERS: dict[str, Callable[[Path], None]] = {
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "aya_vision": _aya_vision,
    "mistral3": _mistral3,
    "instructblip": _instructblip,
    "blip_2": _blip_2,
    "mllama": _mllama,
}
