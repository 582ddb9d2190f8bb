"""What headlab reads from a model instead of being told: head counts, windows, soft-caps, the route of its
attention, and where its MLPs and rotary embedding sit.

Transformers configs name the same quantity differently per architecture (GPT-2's `n_head` is Llama's
`num_attention_heads`, GPTBigCode's multi-query flag is everyone else's `num_key_value_heads=1`); the name
variants are listed here once, in the order they are tried. Functions take configs and modules duck-typed:
this module imports neither torch nor transformers.

The route of a model's attention is read from the code transformers runs: an attention module whose
`forward` looks its attention function up in `ALL_ATTENTION_FUNCTIONS` (transformers' AttentionInterface
registry) runs whatever function the config names, and so headlab's; one that computes attention itself
(BLOOM's ALiBi, Falcon's own SDPA call, MPT, GPT-Neo) cannot be seen inside. The class flags do not say
this exactly: `_supports_sdpa` is set on Falcon, whose attention calls SDPA directly, and unset on Gemma 2,
which routes through the interface; `_supports_attention_backend` (ready for TGI / vLLM) is unset on
StableLM and BioGPT, which route through it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from headlab.errors import UnsupportedModelError

# config attribute names of one quantity, in the order they are tried
HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads")
WIDTH = ("hidden_size", "n_embd", "d_model", "dim")
POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
# the image token id of an LVLM (LLaVA's `image_token_index` is Qwen2-VL's and Idefics3's `image_token_id`)
IMAGE_TOKEN = ("image_token_id", "image_token_index")
# decoder-layer attributes of the self-attention module and of the MLP (or mixture of experts)
ATTENTION_ATTRS = ("attn", "self_attn", "attention", "self_attention")
MLP_ATTRS = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe")
# the name transformers' attention modules look their attention function up in
INTERFACE_REGISTRY = "ALL_ATTENTION_FUNCTIONS"


def config_value(config, names: tuple[str, ...]):
    """The first of the attributes `names` the config sets (not None), else None."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True, kw_only=True)
class HeadShape:
    """A tower's attention shape: query heads, key/value heads (GQA / MQA), head dim, model width."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int


def head_shape(config, attention_module=None) -> HeadShape:
    """The head shape a config declares (name variants above; head_dim from the config, else the attention
    module's own `head_dim`, else width // heads). Raises UnsupportedModelError naming what is missing."""
    heads, width = config_value(config, HEADS), config_value(config, WIDTH)
    missing = [names[0] for names, value in ((HEADS, heads), (WIDTH, width)) if value is None]
    if missing:
        raise UnsupportedModelError(
            f"the {getattr(config, 'model_type', type(config).__name__)} config names none of "
            f"{' / '.join(HEADS if 'num_attention_heads' in missing else WIDTH)}, so headlab cannot read its "
            "head count / width; an adapter cannot declare them yet (report the architecture)"
        )
    head_dim = getattr(config, "head_dim", None) or getattr(attention_module, "head_dim", None)
    return HeadShape(
        n_heads=heads, n_kv_heads=kv_heads(config, heads), head_dim=head_dim or width // heads, d_model=width
    )


def kv_heads(config, heads: int) -> int:
    """Key/value heads: the config's count, 1 for multi-query attention (GPTBigCode), else `heads`."""
    if getattr(config, "multi_query", False):
        return 1
    return config_value(config, KV_HEADS) or heads


def max_positions(config) -> int | None:
    return config_value(config, POSITIONS)


def routes_through_interface(module) -> bool:
    """Whether the attention module's forward takes its attention function from AttentionInterface (module
    docstring): then headlab's function, once the config names it, computes this module's attention."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and INTERFACE_REGISTRY in code.co_names


def unsupported_scores(module) -> tuple[str, ...]:
    """Score terms of the attention module that headlab's kernels do not compute: learned attention sinks
    (`module.sinks`, one extra logit per head that transformers hands the attention function as `s_aux`:
    GPT-OSS, Granite SWA). Captured rows and statistics would silently differ from the model's."""
    return ("learned attention sinks (`sinks`, passed as s_aux)",) if hasattr(module, "sinks") else ()


def layer_windows(config, modules) -> tuple[int | None, ...]:
    """The sliding window of each layer's attention (None: full attention): the module's own
    `sliding_window` where it keeps one, else the config's `sliding_window` on the layers its `layer_types`
    mark as sliding (all layers when it has no layer types and does not switch windows off)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    found = []
    for i, module in enumerate(modules):
        own = getattr(module, "sliding_window", None)
        if isinstance(own, int) and not isinstance(own, bool):
            found.append(own)
        elif types is not None and i < len(types):
            found.append(window if types[i] == "sliding_attention" else None)
        elif getattr(config, "use_sliding_window", True):
            found.append(window)
        else:
            found.append(None)
    return tuple(found)


def softcap(config) -> float | None:
    """The attention-logit soft-cap (Gemma 2), None without one."""
    return getattr(config, "attn_logit_softcapping", None)


def mlp_attr(layer_module, declared: str | None = None) -> str | None:
    """The attribute of a decoder layer holding its MLP: the adapter's, else the first of MLP_ATTRS."""
    for name in (declared,) if declared else MLP_ATTRS:
        if getattr(layer_module, name, None) is not None:
            return name
    return None


def rotary_attr(holder, declared: str | None = None) -> str | None:
    """The attribute holding a tower's rotary embedding, on the module that holds its layer list: the
    adapter's, else `rotary_emb`, else the one child whose class is a `...RotaryEmbedding`."""
    if declared:
        return declared if getattr(holder, declared, None) is not None else None
    if getattr(holder, "rotary_emb", None) is not None:
        return "rotary_emb"
    named = [n for n, child in holder.named_children() if type(child).__name__.endswith("RotaryEmbedding")]
    return named[0] if len(named) == 1 else None


# parameters of a vision model that hold a CLS token prepended to the patch grid
CLS_PARAMETERS = ("class_embedding", "cls_token")


def cls_tokens(vision_model) -> int:
    """CLS tokens a vision model puts before its patch grid: 1 where one of its parameters is a CLS token
    (CLIP's and BLIP's `class_embedding`, ViT's `cls_token`), else 0 (SigLIP, Idefics3, Qwen2-VL, Pixtral)."""
    names = (name.rsplit(".", 1)[-1] for name, _ in vision_model.named_parameters())
    return 1 if any(name in CLS_PARAMETERS for name in names) else 0
