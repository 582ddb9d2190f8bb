"""Loading models: `headlab.load(path_or_id)` -> `LoadedModel`.

The loader is the real Hugging Face one (`from_pretrained` on a local directory or a hub id); headlab adds
what the probe needs to know about the model: its family (llm / lvlm / vit), its attention towers (the
language model and, for LVLMs, the vision tower), each tower's layer, head, KV-head and head-dim counts,
whether the tower is causal, the patch grid of vision towers, and how an LVLM's image tokens are found.

Towers are discovered from the model's real module tree: every attention module that routes through
transformers' AttentionInterface sits at `<tower prefix>.<layer index>.<attention attr>`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from torch import nn

from headlab.errors import ModelLoadError, UnsupportedModelError
from headlab.hub import looks_like_hub_id, resolve_hub_id


class Family(enum.Enum):
    LLM = "llm"
    LVLM = "lvlm"
    VIT = "vit"


@dataclass(frozen=True, kw_only=True)
class _ArchSpec:
    family: Family
    auto_class: type
    prefix_tokens: int = 0  # CLS-like tokens before the patch grid (vision models)
    attention: str = "sdpa"  # the model's own attention outside headlab's blocks


SUPPORTED: dict[str, _ArchSpec] = {
    "gpt2": _ArchSpec(family=Family.LLM, auto_class=tf.AutoModelForCausalLM),
    "llama": _ArchSpec(family=Family.LLM, auto_class=tf.AutoModelForCausalLM),
    "mistral": _ArchSpec(family=Family.LLM, auto_class=tf.AutoModelForCausalLM),
    # soft-capped scores are not expressible in SDPA: transformers runs Gemma 2 eagerly; headlab's own
    # attention (inside capture / intervene) soft-caps in its fused kernels
    "gemma2": _ArchSpec(family=Family.LLM, auto_class=tf.AutoModelForCausalLM, attention="eager"),
    "qwen2": _ArchSpec(family=Family.LLM, auto_class=tf.AutoModelForCausalLM),
    "llava": _ArchSpec(family=Family.LVLM, auto_class=tf.AutoModelForImageTextToText),
    "vit": _ArchSpec(family=Family.VIT, auto_class=tf.AutoModelForImageClassification, prefix_tokens=1),
    "deit": _ArchSpec(family=Family.VIT, auto_class=tf.AutoModelForImageClassification, prefix_tokens=2),
    "dinov2": _ArchSpec(family=Family.VIT, auto_class=tf.AutoModel, prefix_tokens=1),
    "clip_vision_model": _ArchSpec(family=Family.VIT, auto_class=tf.AutoModel, prefix_tokens=1),
}

# `<tower prefix>.<layer>.<attention attribute>` for every architecture above.
_ATTENTION_PATH = re.compile(r"^(?P<prefix>.*?)\.?(?P<layer>\d+)\.(?P<attr>attn|self_attn|attention)$")


@dataclass(frozen=True, kw_only=True)
class Tower:
    """One stack of attention layers: the language model, or a vision encoder.

    `grid` is (rows, cols) of the patch grid for vision towers, with `prefix_tokens` CLS-like tokens
    before it; None for text towers.
    """

    name: str  # "lm" or "vision"
    path: str  # module path of the layer list, e.g. "model.language_model.layers"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    causal: bool
    max_positions: int | None
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 0


@dataclass(frozen=True, kw_only=True, eq=False)
class LoadedModel:
    """A model in eval mode with what headlab needs to know about it.

    The scalar counts (n_layers, n_heads, ...) describe the main tower: the language model for LLMs and
    LVLMs, the vision encoder for ViTs. `towers` lists every tower, `attention_modules[tower][layer]`
    the attention modules the probe attaches to.
    """

    model: nn.Module
    processor: object | None
    tokenizer: object | None
    family: Family
    model_type: str
    source: str
    towers: tuple[Tower, ...]
    attention_modules: dict[str, tuple[nn.Module, ...]]
    layer_modules: dict[str, tuple[nn.Module, ...]]
    image_token_id: int | None = None

    @property
    def main(self) -> Tower:
        return self.tower("vision" if self.family is Family.VIT else "lm")

    def tower(self, name: str) -> Tower:
        for t in self.towers:
            if t.name == name:
                return t
        raise UnsupportedModelError(
            f"{self.model_type} has no {name!r} tower; it has {[t.name for t in self.towers]}"
        )

    @property
    def n_layers(self) -> int:
        return self.main.n_layers

    @property
    def n_heads(self) -> int:
        return self.main.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.main.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.main.head_dim

    @property
    def image_tokens(self) -> str:
        """How image tokens are found in the input, in words."""
        if self.family is not Family.LVLM:
            return "no image tokens (not an LVLM)"
        return f"input_ids == {self.image_token_id} (the processor expands each image to its patch tokens)"

    def __repr__(self) -> str:
        towers = ", ".join(
            f"{t.name}: {t.n_layers}L x {t.n_heads}H (kv {t.n_kv_heads}, d {t.head_dim})" for t in self.towers
        )
        return f"LoadedModel({self.model_type}, {self.family.value}, {towers})"


def _resolve(source: str | Path) -> str:
    source = str(source)
    if source.startswith("zoo:"):
        from headlab.zoo.registry import zoo_path

        return str(zoo_path(source.removeprefix("zoo:")))
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} exists but holds no config.json; pass a directory written by save_pretrained"
            )
        return str(path)
    if looks_like_hub_id(source):
        return resolve_hub_id(source)
    raise ModelLoadError(
        f"model path {source!r} does not exist and is not a hub id (like 'gpt2' or 'org/name'); pass a "
        "local directory written by save_pretrained, a hub id, or zoo:NAME (`headlab zoo list`)"
    )


def _load_config(source: str) -> tf.PretrainedConfig:
    try:
        return tf.AutoConfig.from_pretrained(source)
    except OSError as err:
        if Path(source).exists():
            raise ModelLoadError(f"could not read the config in {source}: {err}") from err
        raise ModelLoadError(
            f"could not fetch {source!r} from the Hugging Face hub (offline or unknown id). Download it where the "
            f"hub is reachable (e.g. `huggingface-cli download {source} --local-dir DIR`) and pass the local path."
        ) from err


def _tower(name: str, prefix: str, n_layers: int, config, spec: _ArchSpec) -> Tower:
    heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head
    d_model = config.hidden_size
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d_model // heads
    grid, prefix_tokens, causal = None, 0, True
    if name == "vision":
        size, patch = config.image_size, config.patch_size
        rows, cols = (size, size) if isinstance(size, int) else tuple(size)
        prows, pcols = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (rows // prows, cols // pcols)
        prefix_tokens = spec.prefix_tokens if spec.family is Family.VIT else 1  # LLaVA's CLIP: one CLS
        causal = False
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return Tower(
        name=name,
        path=prefix,
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        d_model=d_model,
        causal=causal,
        max_positions=max_pos,
        grid=grid,
        prefix_tokens=prefix_tokens,
    )


def describe(model: nn.Module, *, source: str = "<in memory>", processor=None) -> LoadedModel:
    """Wrap an already-built Hugging Face model as a `LoadedModel` (no loading)."""
    config = model.config
    model_type = config.model_type
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"headlab does not support the architecture {model_type!r} yet; supported: {sorted(SUPPORTED)}"
        )
    spec = SUPPORTED[model_type]
    found: dict[str, dict[int, nn.Module]] = {}
    layers: dict[str, dict[int, nn.Module]] = {}
    for path, module in model.named_modules():
        match = _ATTENTION_PATH.match(path)
        if match is None:
            continue
        prefix, layer = match["prefix"], int(match["layer"])
        found.setdefault(prefix, {})[layer] = module
        layers.setdefault(prefix, {})[layer] = model.get_submodule(path.rsplit(".", 1)[0])
    towers, attention, layer_modules = [], {}, {}
    for prefix, by_layer in found.items():
        name = "vision" if ("vision" in prefix or spec.family is Family.VIT) else "lm"
        tower_config = config
        if spec.family is Family.LVLM:
            tower_config = config.vision_config if name == "vision" else config.text_config
        towers.append(_tower(name, prefix, len(by_layer), tower_config, spec))
        attention[name] = tuple(by_layer[i] for i in sorted(by_layer))
        layer_modules[name] = tuple(layers[prefix][i] for i in sorted(by_layer))
    if not towers:
        raise UnsupportedModelError(f"found no attention layers in {type(model).__name__}")
    tokenizer = getattr(processor, "tokenizer", processor) if processor is not None else None
    return LoadedModel(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        family=spec.family,
        model_type=model_type,
        source=source,
        towers=tuple(sorted(towers, key=lambda t: t.name != "vision")),
        attention_modules=attention,
        layer_modules=layer_modules,
        image_token_id=getattr(config, "image_token_index", None) if spec.family is Family.LVLM else None,
    )


def _load_processor(source: str, family: Family):
    loader = tf.AutoTokenizer if family is Family.LLM else tf.AutoProcessor
    if family is Family.VIT:
        loader = tf.AutoImageProcessor
    try:
        return loader.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return (
            None  # a bare checkpoint without tokenizer/processor files still loads; inputs come from the user
        )


def load(
    source: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a supported model from a local directory, a hub id or `zoo:NAME` (a shipped zoo model), in eval
    mode, with its processor. `attn_implementation` is the model's own attention outside headlab's blocks
    (None: the architecture's usual one, SDPA; eager for Gemma 2, whose soft-cap SDPA cannot express).

    Raises ModelLoadError for a missing path or a hub id that cannot be fetched, UnsupportedModelError for
    an architecture headlab does not know (the message lists the supported ones).
    """
    resolved = _resolve(source)
    config = _load_config(resolved)
    if config.model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"headlab does not support the architecture {config.model_type!r} yet; supported: {sorted(SUPPORTED)}"
        )
    spec = SUPPORTED[config.model_type]
    try:
        model = spec.auto_class.from_pretrained(
            resolved, dtype=dtype, attn_implementation=attn_implementation or spec.attention
        )
    except OSError as err:
        raise ModelLoadError(f"could not load the weights of {resolved}: {err}") from err
    model.to(device).eval()
    return describe(model, source=resolved, processor=_load_processor(resolved, spec.family))
