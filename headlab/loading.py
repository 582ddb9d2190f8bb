"""Loading models: `headlab.load(path_or_id)` -> `LoadedModel`.

The loader is the real Hugging Face one (`from_pretrained` on a local directory or a hub id); headlab adds
what the probe needs to know about the model: its family (llm / lvlm / vit), its attention towers (the
language model and, for LVLMs, the vision tower), each tower's layer, head, KV-head and head-dim counts,
whether the tower is causal, the patch grid of vision towers, and how an LVLM's image tokens are found.

Towers are discovered from the model's real module tree: every attention module sits at
`<tower prefix>.<layer index>.<attention attr>` (attn, self_attn, attention, self_attention), and what each
tower is (heads, KV heads, head dim, windows, soft-cap, its MLP and rotary embedding) is read from it and
its config (`headlab.models.discovery`). What cannot be discovered (the auto class, CLS-like prefix tokens,
sub-configs, the image token) is the family's adapter's declaration (`headlab.models`); `SUPPORTED` is the
registry's read-only view of the tested model types.

A model headlab cannot serve is an `UnsupportedModelError` naming what is missing, raised before its
weights are read where the class already says so: a model type the adapter's auto class has no class for
(e.g. not a causal LM), or whose modeling code computes attention itself rather than through
AttentionInterface (BLOOM with ALiBi, Falcon, MPT, GPT-Neo). Such eager-only models are refused, not
captured through `output_attentions`: that would give their patterns but none of headlab's statistics,
kernels, compact store or interventions, which all run inside the attention function. After loading, a
model is refused whose attention is not found, does not route through the interface in every layer, sits
only in some decoder layers (hybrids with recurrent or linear mixers) or under two stacks of one tower.

A checkpoint that cannot be loaded as it is meant is a `ModelLoadError` naming the file and what to do,
never a half-random model: an unreadable config.json, a folder without weights, a truncated or corrupt
weights file, weights whose shapes do not fit the config, weights the config needs but the checkpoint
lacks (only a missing output head, e.g. a classifier, is a warning: attention is unaffected), and
tokenizer / processor files that are present but unreadable.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from torch import nn

from headlab.errors import ModelLoadError, UnsupportedModelError
from headlab.hub import looks_like_hub_id, resolve_hub_id
from headlab.models import SUPPORTED as SUPPORTED  # hl.SUPPORTED: tested model type -> its adapter
from headlab.models import Family, ModelAdapter, adapter_for, discovery
from headlab.models.registry import is_registered, refusal

# `<tower prefix>.<layer>.<attention attribute>`: where every attention module headlab serves sits
_ATTENTION_PATH = re.compile(
    rf"^(?P<prefix>.*?)\.?(?P<layer>\d+)\.(?P<attr>{'|'.join(discovery.ATTENTION_ATTRS)})$"
)


@dataclass(frozen=True, kw_only=True)
class Tower:
    """One stack of attention layers: the language model, or a vision encoder.

    `grid` is (rows, cols) of the patch grid for vision towers, with `prefix_tokens` tokens before it:
    CLS-like tokens, then `register_tokens` registers (DINOv2 with registers); None for text towers.
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
    register_tokens: int = 0  # the last of the prefix tokens that are registers (role "register")
    windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: full attention)
    softcap: float | None = None  # attention-logit soft-cap (Gemma 2)
    mlp_attr: str | None = None  # the attribute of each decoder layer holding its MLP, None without one
    rotary_attr: str | None = None  # the attribute next to the layer list holding the rotary embedding

    @property
    def sliding(self) -> bool:
        """Whether any layer attends through a sliding window."""
        return any(w is not None for w in self.windows)


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
    adapter: ModelAdapter  # what headlab was told about the family (headlab.models)
    image_token_id: int | None = None
    tokens_per_image: int | None = None  # LVLMs: image tokens per image in the input ids, if fixed
    # module paths of attention stacks that are no tower headlab captures (InstructBLIP's Q-Former)
    uncaptured: tuple[str, ...] = ()
    # (this rank's index, ranks) of a tensor-parallel model (transformers' tp_plan): each rank holds a
    # contiguous block of every layer's heads; None for a model on one process
    tensor_parallel: tuple[int, int] | None = None

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

    @property
    def text_model(self) -> nn.Module:
        """What runs a text-only input: the model, or the language model of one whose forward needs the
        image (BLIP-2, InstructBLIP), as their generate() does."""
        return self.model.language_model if _needs_pixels(self.model) else self.model

    def run(self, inputs: dict, **kwargs):
        """The model's forward on prepared inputs (a text-only one through `text_model`)."""
        model = self.model if "pixel_values" in inputs else self.text_model
        return model(**inputs, **kwargs)

    @property
    def multimodal_positions(self) -> bool:
        """Whether the model derives its own position ids from the ids and the image grids (Qwen2-VL's
        M-RoPE: sections of each head rotate by time, height and width), rather than 1-D positions."""
        return any(hasattr(m, "get_rope_index") for m in (self.model, getattr(self.model, "model", None)))

    def rotary_module(self, tower: str = "lm") -> nn.Module | None:
        """The rotary embedding of `tower` (next to its layer list), None without one (learned positions)."""
        info = self.tower(tower)
        return None if info.rotary_attr is None else getattr(_holder(self.model, info.path), info.rotary_attr)

    def mlp_module(self, tower: str, layer: int) -> nn.Module | None:
        """The MLP of decoder layer `layer` of `tower` (the adapter's attribute or the discovered one: `mlp`,
        `feed_forward`, `block_sparse_moe`, ...), None if its layers have none."""
        attr = self.tower(tower).mlp_attr
        return None if attr is None else getattr(self.layer_modules[tower][layer], attr)

    def __repr__(self) -> str:
        towers = ", ".join(
            f"{t.name}: {t.n_layers}L x {t.n_heads}H (kv {t.n_kv_heads}, d {t.head_dim})" for t in self.towers
        )
        return f"LoadedModel({self.model_type}, {self.family.value}, {towers})"


def language_model_output(output):
    """The language model's part of a model output: the output itself, or BLIP-2's and InstructBLIP's
    `language_model_outputs` (where their hidden states and attentions are)."""
    inner = getattr(output, "language_model_outputs", None)
    return output if inner is None else inner


def _needs_pixels(model: nn.Module) -> bool:
    """Whether the model's forward cannot run without `pixel_values` (BLIP-2's and InstructBLIP's)."""
    param = inspect.signature(type(model).forward).parameters.get("pixel_values")
    return param is not None and param.default is inspect.Parameter.empty


def _resolve(source: str | Path) -> str:
    source = str(source)
    if source.startswith("zoo:"):
        from headlab.zoo.registry import zoo_path

        return str(zoo_path(source.removeprefix("zoo:")))
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{path} is a file; pass the model directory that holds its config.json and weights"
            )
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
    except (OSError, ValueError, StrictDataclassError) as err:
        if Path(source).exists() or not isinstance(err, OSError):
            where = (
                Path(source) / "config.json" if Path(source).exists() else f"the config.json of {source!r}"
            )
            raise ModelLoadError(
                f"{where} is not a usable model config ({_reason(err)}); restore it from the model's source, "
                "or re-save the model with save_pretrained"
            ) from err
        raise ModelLoadError(
            f"could not fetch {source!r} from the Hugging Face hub ({_reason(err)}): check the id (and your "
            f"access to it), or download it where the hub is reachable (`hf download {source} --local-dir DIR`) "
            "and pass DIR."
        ) from err


def _reason(err: Exception) -> str:
    """An exception's message on one line, at most about 200 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _holder(model: nn.Module, path: str) -> nn.Module:
    """The module holding the layer list at `path` (the model itself for a top-level list)."""
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model


@dataclass(frozen=True)
class _Stack:
    """One stack of attention layers found in the module tree: its layer list's path, and per layer index
    the attention module and the decoder layer holding it."""

    prefix: str
    attention: dict[int, nn.Module]
    layers: dict[int, nn.Module]


def _stacks(model: nn.Module) -> list[_Stack]:
    """Every `<prefix>.<layer>.<attention attr>` module of the model, grouped by prefix."""
    found: dict[str, _Stack] = {}
    for path, module in model.named_modules():
        match = _ATTENTION_PATH.match(path)
        if match is None:
            continue
        stack = found.setdefault(match["prefix"], _Stack(match["prefix"], {}, {}))
        stack.attention[int(match["layer"])] = module
        stack.layers[int(match["layer"])] = model.get_submodule(path.rsplit(".", 1)[0])
    return list(found.values())


def _grid(config) -> tuple[int, int] | None:
    """The nominal patch grid of a vision config (None where image sizes vary: Qwen2-VL, Pixtral)."""
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if size is None or patch is None:
        return None
    rows, cols = (size, size) if isinstance(size, int) else tuple(size)
    prows, pcols = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return rows // prows, cols // pcols


def _tower(name: str, model: nn.Module, stack: _Stack, config, adapter: ModelAdapter) -> Tower:
    """What the stack's modules and its config say about one tower (headlab.models.discovery)."""
    modules = [stack.attention[i] for i in sorted(stack.attention)]
    shape = discovery.head_shape(config, modules[0])
    vision = name == "vision"
    holder = _holder(model, stack.prefix)
    prefix, registers = _vision_prefix(adapter, model, stack) if vision else (0, 0)
    return Tower(
        name=name,
        path=stack.prefix,
        n_layers=len(modules),
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        d_model=shape.d_model,
        causal=not vision and bool(getattr(modules[0], "is_causal", True)),
        max_positions=discovery.max_positions(config),
        grid=_grid(config) if vision else None,
        prefix_tokens=prefix,
        register_tokens=registers,
        windows=discovery.layer_windows(config, modules),
        softcap=discovery.softcap(config),
        mlp_attr=discovery.mlp_attr(stack.layers[min(stack.layers)], adapter.mlp_attr),
        rotary_attr=discovery.rotary_attr(holder, adapter.rotary_attr),
    )


def _vision_prefix(adapter: ModelAdapter, model: nn.Module, stack: _Stack) -> tuple[int, int]:
    """The tokens before the patch grid of the vision tower and how many of them are registers: the
    family's own for a ViT, the vision tower's family's for an LVLM whose vision sub-config has an adapter;
    else discovered (one CLS token where the vision model has a `class_embedding` / `cls_token` parameter,
    none otherwise). Registers follow the CLS-like tokens (DINOv2 with registers)."""
    if adapter.family is Family.VIT:
        owner, vision = adapter, model.config
    else:
        vision = adapter.sub_config(model.config, "vision")
        if not is_registered(vision.model_type):
            return discovery.cls_tokens(_vision_root(model, stack.prefix)), 0
        owner = adapter_for(vision)
    registers = owner.register_tokens(vision)
    return owner.prefix_tokens + registers, registers


def _vision_root(model: nn.Module, prefix: str) -> nn.Module:
    """The vision model holding the stack at `prefix`: the module just above its `encoder` / `transformer`
    / block list (`model.vision_tower.encoder.layers` -> `model.vision_tower`; `model.visual.blocks` ->
    `model.visual`)."""
    parts = prefix.split(".")
    while len(parts) > 1 and parts[-1] in ("layers", "layer", "blocks", "encoder", "transformer"):
        parts.pop()
    return model.get_submodule(".".join(parts)) if parts and parts[0] else model


def _check_served(model: nn.Module, stack: _Stack) -> None:
    """Raise UnsupportedModelError when headlab's attention function would not see every layer of the
    stack: attention computed without AttentionInterface, score terms it does not compute (sinks), or
    attention in only some decoder layers."""
    model_type = model.config.model_type
    own = sorted(
        {type(m).__name__ for m in stack.attention.values() if not discovery.routes_through_interface(m)}
    )
    if own:
        raise UnsupportedModelError(
            eager_only_message(model_type, f"its attention ({', '.join(own)}, at {stack.prefix})")
        )
    terms = sorted({t for m in stack.attention.values() for t in discovery.unsupported_scores(m)})
    if terms:
        raise UnsupportedModelError(
            f"headlab cannot serve {model_type!r}: its attention adds {', '.join(terms)} to the scores, "
            "which headlab's attention function does not compute yet; its statistics and patterns would "
            "differ from the model's"
        )
    indices = sorted(stack.attention)
    if indices != list(range(len(indices))):
        raise UnsupportedModelError(
            f"headlab cannot serve {model_type!r}: attention sits only in decoder layers {indices} of "
            f"{stack.prefix} (a hybrid with recurrent or linear mixers); headlab numbers attention layers as "
            "decoder layers and serves models with attention in every layer"
        )


def _check_not_refused(config) -> None:
    """UnsupportedModelError for a model type declared refused (`headlab.models.registry.refuse`)."""
    reason = refusal(config)
    if reason is not None:
        raise UnsupportedModelError(f"headlab cannot serve {config.model_type!r}: {reason}")


def eager_only_message(model_type: str, what: str) -> str:
    """Why a model whose attention does not run through AttentionInterface is refused, and what to do;
    `what` names the code that was looked at."""
    return (
        f"headlab cannot serve {model_type!r}: {what} never calls AttentionInterface; transformers computes "
        "that attention itself, only eagerly or through its own SDPA call (or there is none, or the module "
        "that calls the interface sits under another name), so headlab cannot see inside it: no "
        "statistics, patterns or interventions. Models whose attention routes through AttentionInterface "
        "need no adapter; `headlab check MODEL` says which route a model takes"
    )


def describe(model: nn.Module, *, source: str = "<in memory>", processor=None) -> LoadedModel:
    """Wrap an already-built Hugging Face model as a `LoadedModel` (no loading).

    Raises UnsupportedModelError when headlab cannot serve the model (module docstring), naming why."""
    config = model.config
    _check_not_refused(config)
    adapter = adapter_for(config)
    towers, attention, layer_modules = [], {}, {}
    uncaptured = []
    for stack in _stacks(model):
        name = _tower_name(adapter, config, stack)
        if name is None:
            uncaptured.append(stack.prefix)
            continue
        if name in attention:
            first = next(t.path for t in towers if t.name == name)
            raise UnsupportedModelError(
                f"headlab cannot serve {config.model_type!r}: found two stacks of {name} attention layers "
                f"({first} and {stack.prefix}); headlab serves one stack per tower"
            )
        _check_served(model, stack)
        towers.append(_tower(name, model, stack, adapter.sub_config(config, name), adapter))
        attention[name] = tuple(stack.attention[i] for i in sorted(stack.attention))
        layer_modules[name] = tuple(stack.layers[i] for i in sorted(stack.layers))
    if not towers:
        raise UnsupportedModelError(
            f"found no attention layers in {type(model).__name__}: no `<layers>.<i>.<attr>` module with "
            f"attr one of {', '.join(discovery.ATTENTION_ATTRS)} (a model without attention, e.g. Mamba or "
            "RWKV, or attention under another name, which an adapter cannot declare yet)"
        )
    tokenizer = getattr(processor, "tokenizer", processor) if processor is not None else None
    return LoadedModel(
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        family=adapter.family,
        model_type=config.model_type,
        source=source,
        towers=tuple(sorted(towers, key=lambda t: t.name != "vision")),
        attention_modules=attention,
        layer_modules=layer_modules,
        adapter=adapter,
        image_token_id=adapter.image_token_id(config),
        tokens_per_image=adapter.tokens_per_image(config),
        uncaptured=tuple(uncaptured),
        tensor_parallel=_tensor_parallel(model),
    )


def _tensor_parallel(model: nn.Module) -> tuple[int, int] | None:
    """(tp rank, tp size) of a model transformers sharded with a tp_plan, else None."""
    size = getattr(model, "_tp_size", None) or 1
    mesh = getattr(model, "_device_mesh", None)
    if size <= 1 or mesh is None:
        return None
    return mesh["tp"].get_local_rank(), size


def _tower_name(adapter: ModelAdapter, config, stack: _Stack) -> str | None:
    """Which tower a stack of attention layers is: the ViT's vision tower, the LLM's language model; in an
    LVLM, the tower whose sub-config the attention modules hold (transformers hands each submodel its own
    sub-config), else the one its path names (`vision`, `visual` / `language`, `text`). None for a stack
    that is neither (InstructBLIP's Q-Former): it runs, but is not a tower headlab captures."""
    if adapter.family is Family.VIT:
        return "vision"
    if adapter.family is Family.LLM:
        return "lm"
    own = getattr(stack.attention[min(stack.attention)], "config", None)
    for name in ("vision", "lm"):
        if own is not None and own is adapter.sub_config(config, name):
            return name
    words = set(re.split(r"[._]", stack.prefix))
    if words & {"vision", "visual"}:
        return "vision"
    if words & {"language", "text"}:
        return "lm"
    return None


# files a tokenizer or processor is read from; a bare checkpoint has none of them
_PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# files `from_pretrained` reads weights from (besides the shards an index names)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _load_processor(source: str, adapter: ModelAdapter):
    """The tokenizer or processor, or None for a bare checkpoint without their files (inputs then come
    from the user). Files that are present but unreadable are a ModelLoadError."""
    loader = getattr(tf, adapter.processor_class)
    present = [name for name in _PROCESSOR_FILES if (Path(source) / name).is_file()]
    try:
        return loader.from_pretrained(source)
    except ImportError as err:  # e.g. a fast image processor needs torchvision
        warnings.warn(
            f"the processor of {source} needs a package that is not installed ({_reason(err)}); the model is "
            "loaded without it: install the package to let headlab prepare inputs, or pass inputs you built "
            "yourself",
            stacklevel=3,
        )
        return None
    except Exception as err:  # tokenizers raises bare Exceptions on a corrupt file
        if not present:
            if isinstance(err, OSError | ValueError | KeyError):
                return None
            raise
        raise ModelLoadError(
            f"could not read the tokenizer / processor files {', '.join(present)} in {source} "
            f"({_reason(err)}); restore them from the model's source, or remove them to load the bare "
            "model and pass inputs yourself"
        ) from err


def _check_weight_files(folder: Path) -> None:
    """A local checkpoint has a weights file, and every safetensors file's header is readable and covers
    the file exactly (a truncated or corrupt file is named before transformers reads it)."""
    tensors = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not tensors and not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(
            f"{folder} holds no weights file ({', '.join(_WEIGHT_FILES)}); copy the weights next to its "
            "config.json, or re-save the model with save_pretrained"
        )
    for path in tensors:
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(
                f"the weights file {path} is unreadable ({_reason(err)}): it is truncated or corrupt; "
                "download or save it again"
            ) from err


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _no_load_report():
    """transformers logs a table of missing, unexpected and mismatched weights; `_check_weights` says the
    same in one line, so that table (and only it) is held back while loading."""
    log = logging.getLogger("transformers.modeling_utils")
    log.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        log.removeFilter(_not_a_load_report)


def model_class(config, adapter: ModelAdapter) -> type[nn.Module]:
    """The transformers class the adapter's auto class builds for `config`, before any weight is read.

    Raises UnsupportedModelError for a model type that auto class has no class for (e.g. an encoder or a
    speech model under AutoModelForCausalLM), or whose modeling code computes attention without
    AttentionInterface (module docstring)."""
    auto = getattr(tf, adapter.auto_class)
    mapping = getattr(auto, "_model_mapping", {})
    if type(config) not in mapping:
        kind = "causal language model" if adapter.auto_class == "AutoModelForCausalLM" else "model"
        raise UnsupportedModelError(
            f"headlab cannot serve {config.model_type!r}: transformers has no {adapter.auto_class} class for "
            f"it, so it is not a {kind} headlab can load by discovery; other families need an adapter (see "
            "'Adding a model family' in the README)"
        )
    cls = _one_class(mapping[type(config)], config)
    code = sys.modules.get(cls.__module__)
    if not cls._supports_attention_backend and not hasattr(code, discovery.INTERFACE_REGISTRY):
        raise UnsupportedModelError(
            eager_only_message(config.model_type, f"its modeling code ({cls.__name__}, {cls.__module__})")
        )
    return cls


def _one_class(found, config) -> type[nn.Module]:
    """The class an auto mapping gives (several for some types, e.g. DeiT's: the config's architecture)."""
    if not isinstance(found, tuple | list):
        return found
    named = [c for c in found if c.__name__ in (getattr(config, "architectures", None) or ())]
    return (named or list(found))[0]


def _attention_to_load(cls: type[nn.Module], adapter: ModelAdapter, requested: str | None) -> str:
    """The model's own attention outside headlab's blocks: the caller's, else the adapter's, except that a
    class without SDPA support (Gemma 2, GPT-OSS: scores SDPA cannot express) loads eagerly."""
    if requested is not None:
        return requested
    if adapter.attention == "sdpa" and not cls._supports_sdpa:
        return "eager"
    return adapter.attention


def _load_model(resolved: str, adapter: ModelAdapter, dtype, attention: str, **placement) -> nn.Module:
    if Path(resolved).is_dir():
        _check_weight_files(Path(resolved))
    try:
        with _no_load_report():
            model, info = getattr(tf, adapter.auto_class).from_pretrained(
                resolved,
                dtype=dtype,
                attn_implementation=attention,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by _check_weights, as an error
                **placement,
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(
            f"could not load the model in {resolved} ({_reason(err)}); check that its config.json and "
            "weights belong together and are complete, or re-save the model with save_pretrained"
        ) from err
    _check_weights(model, resolved, info)
    return model


def _check_weights(model: nn.Module, source: str, info: dict) -> None:
    """No weight of the model is left at its random initialisation, except an output head (a warning)."""
    hint = "config.json and the weights do not belong together: restore both from the model's source"
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    if mismatched:
        first = mismatched[0]  # (key, shape in the file, shape the config asks for)
        if isinstance(first, tuple) and len(first) == 3:
            first = f"{first[0]}: {list(first[1])} in the file, {list(first[2])} by the config"
        raise ModelLoadError(
            f"{len(mismatched)} weights in {source} do not fit the shapes in its config.json (e.g. {first}); "
            f"{hint}"
        )
    missing = sorted(info.get("missing_keys") or ())
    prefix = f"{model.base_model_prefix}."
    backbone = [k for k in missing if model.base_model is model or k.startswith(prefix)]
    if backbone:
        raise ModelLoadError(
            f"the weights in {source} lack {len(backbone)} tensors its config.json needs (e.g. "
            f"{', '.join(backbone[:3])}), which would be random; {hint}"
        )
    if missing:
        warnings.warn(
            f"{source} has no weights for the output head ({', '.join(missing)}): it is random, so logits "
            "and analyses that score them are meaningless; attention and head statistics are not affected",
            stacklevel=4,
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        warnings.warn(
            f"{source} holds {len(unexpected)} tensors its config.json does not use (e.g. {unexpected[0]}); "
            "the model built is the config's",
            stacklevel=4,
        )


def load(
    source: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
    tp_plan: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a model from a local directory, a hub id or `zoo:NAME` (a shipped zoo model), in eval mode,
    with its processor. Any causal LM whose attention transformers routes through AttentionInterface loads
    without an adapter; LVLMs and ViTs through their family's adapter.

    `dtype` None is transformers' "auto": the dtype the checkpoint's config names (e.g. bfloat16 for most
    recent hub LLMs), else the weights' own; `device` is "cpu" unless given. `attn_implementation` is the
    model's own attention outside headlab's blocks (None: SDPA; eager for a class without SDPA support, such
    as Gemma 2, whose soft-cap SDPA cannot express).

    `device_map` spreads one model over several devices with accelerate's dispatch (transformers'
    `device_map`: "auto", or module path -> device, "cpu" or "disk"; disk-offloaded weights go to
    `offload_folder`); `device` is then unused. Capture and every intervention run each layer's attention
    on the device that layer sits on, and its statistics land in the one record. `tp_plan="auto"` (under
    torchrun) shards every layer's heads over the ranks (transformers' tensor parallelism): capture then
    records each rank's heads under their global indices (`Record.gathered()` joins them); interventions
    and selected patterns need every head and are refused.

    Raises ModelLoadError for a missing path, a hub id that cannot be fetched or a checkpoint that cannot be
    loaded as it is meant, UnsupportedModelError for a model headlab cannot serve, saying why (module
    docstring); the latter before the weights are read where the class already tells.
    """
    resolved = _resolve(source)
    config = _load_config(resolved)
    _check_not_refused(config)
    adapter = adapter_for(config)
    cls = model_class(config, adapter)
    placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    if tp_plan is not None:
        placement["tp_plan"] = tp_plan
    model = _load_model(
        resolved, adapter, dtype, _attention_to_load(cls, adapter, attn_implementation), **placement
    )
    if device_map is None and tp_plan is None:
        model.to(device)
    model.eval()
    return describe(model, source=resolved, processor=_load_processor(resolved, adapter))
