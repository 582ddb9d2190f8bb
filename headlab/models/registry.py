"""The registry of model adapters: `@register`, one lookup `adapter_for`, and the `SUPPORTED` view.

A family file declares its adapter in a function named after it and decorates it with `@register`; the
registry calls the function once, names the adapter after it (the decorated name is then the adapter) and
refuses a second adapter of the same name or for a model type another adapter already serves.

There is no allow-list: a model type without an adapter is served by the generic `DEFAULT`, and the loader
discovers the rest from the model (`headlab.loading`): a causal LM whose attention transformers routes
through `AttentionInterface` needs no adapter at all; one that cannot be served (its attention runs without
the interface, it is not a causal LM) is refused when it is loaded, saying what is missing. An adapter is
only needed for what cannot be discovered (an auto class, sub-configs, image tokens, CLS-like prefixes, a
prompt template, an attention implementation to load with). A model type that no adapter can make
servable is declared refused with its reason (`refuse`): loading it says why, before its weights are read.

`SUPPORTED` (read-only) is what is tested: the model types of the registered adapters plus those of the
coverage matrix (`headlab.models.matrix`) that headlab serves, each mapped to the adapter serving it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

from headlab.errors import HeadlabError, UnsupportedModelError
from headlab.models.adapter import Family, ModelAdapter

# The generic adapter: a causal LM with everything discovered. It owns the hand-written random builders
# of architectures without an adapter; any other model type is built generically (by its config class).
DEFAULT = ModelAdapter(random_builders=("gpt2", "llama", "mistral", "qwen2"))
# The generic vision-language adapter: a model with a vision and a text sub-config that transformers' image-
# text-to-text auto class builds; its towers, image token and vision prefix tokens are discovered.
DEFAULT_LVLM = ModelAdapter(
    name="default_lvlm",
    family=Family.LVLM,
    auto_class="AutoModelForImageTextToText",
    vision_config="vision_config",
    text_config="text_config",
    random_builders=("aya_vision", "mistral3", "smolvlm"),
)

_ADAPTERS: dict[str, ModelAdapter] = {}  # name -> adapter
_BY_MODEL_TYPE: dict[str, ModelAdapter] = {}  # model type -> its registered adapter
_REFUSED: dict[str, str] = {}  # model type -> why headlab cannot serve it (no adapter can)


def register(declare: Callable[[], ModelAdapter]) -> ModelAdapter:
    """Decorator: register the adapter `declare()` under the name `declare.__name__`; the decorated name
    is then the registered adapter.

    Raises HeadlabError for a name already registered, or a model type another adapter already serves or
    that is declared refused (`refuse`)."""
    name = declare.__name__
    adapter = declare()
    if adapter.name not in (ModelAdapter.name, name):
        raise HeadlabError(
            f"the adapter declared by {name}() is named {adapter.name!r}; leave its name unset"
        )
    adapter = dataclasses.replace(adapter, name=name)
    if name in _ADAPTERS or name in (DEFAULT.name, DEFAULT_LVLM.name):
        raise HeadlabError(f"a model adapter named {name!r} is already registered")
    if not adapter.model_types:
        raise HeadlabError(f"the model adapter {name!r} declares no model_types")
    refused = [t for t in adapter.model_types if t in _REFUSED]
    if refused:
        raise HeadlabError(
            f"model type {refused[0]!r} of adapter {name!r} is refused: {_REFUSED[refused[0]]}"
        )
    taken = [t for t in adapter.model_types if t in _BY_MODEL_TYPE]
    if taken:
        owner = _BY_MODEL_TYPE[taken[0]].name
        raise HeadlabError(f"model type {taken[0]!r} of adapter {name!r} is already served by {owner!r}")
    _ADAPTERS[name] = adapter
    _BY_MODEL_TYPE.update(dict.fromkeys(adapter.model_types, adapter))
    return adapter


def refuse(model_type: str, *, reason: str) -> None:
    """Declare that headlab cannot serve `model_type` and why (a sentence after "headlab cannot serve
    'TYPE': "): loading or describing it raises UnsupportedModelError with the reason before anything else.

    Raises HeadlabError for a type that is already refused or served by an adapter."""
    if model_type in _REFUSED or model_type in _BY_MODEL_TYPE:
        raise HeadlabError(f"model type {model_type!r} is already refused or served by an adapter")
    _REFUSED[model_type] = reason


def refusal(config_or_model) -> str | None:
    """Why headlab cannot serve the model type of a config, model or model type (`refuse`), else None."""
    return _REFUSED.get(_model_type(config_or_model))


def adapters() -> tuple[ModelAdapter, ...]:
    """Every adapter: the two generic ones first, then the registered ones by name."""
    return (DEFAULT, DEFAULT_LVLM, *(_ADAPTERS[name] for name in sorted(_ADAPTERS)))


def _model_type(config_or_model) -> str:
    if isinstance(config_or_model, str):
        return config_or_model
    config = getattr(config_or_model, "config", config_or_model)  # a model, or its config
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        model_type = getattr(config_or_model, "model_type", None)  # e.g. a LoadedModel
    if not isinstance(model_type, str):
        raise UnsupportedModelError(f"{type(config_or_model).__name__} has no config with a model_type")
    return model_type


def adapter_for(config_or_model) -> ModelAdapter:
    """The adapter of a transformers config, a model built from one, a LoadedModel or a model type: the
    registered one for its model type, else a generic one (everything discovered when the model is loaded):
    `DEFAULT_LVLM` for a config with a vision and a text sub-config, `DEFAULT` otherwise.

    Raises UnsupportedModelError only for something that names no model type."""
    own = getattr(config_or_model, "adapter", None)
    if isinstance(own, ModelAdapter):  # a LoadedModel
        return own
    found = _BY_MODEL_TYPE.get(_model_type(config_or_model))
    if found is not None:
        return found
    config = getattr(config_or_model, "config", config_or_model)
    if all(getattr(config, attr, None) is not None for attr in ("vision_config", "text_config")):
        return DEFAULT_LVLM
    return DEFAULT


def is_registered(model_type: str) -> bool:
    """Whether an adapter was registered for `model_type` (else `DEFAULT` serves it by discovery)."""
    return model_type in _BY_MODEL_TYPE


class _Supported(Mapping[str, ModelAdapter]):
    """A read-only view: tested model type -> the adapter serving it (`hl.SUPPORTED`); module docstring."""

    def _types(self) -> set[str]:
        from headlab.models.matrix import served_types  # here: `python -m headlab.models.matrix` runs it

        return set(_BY_MODEL_TYPE) | set(served_types())

    def __getitem__(self, model_type: str) -> ModelAdapter:
        from headlab.models.matrix import family_of

        if model_type not in self._types():
            raise KeyError(model_type)
        if not is_registered(model_type) and family_of(model_type) is Family.LVLM:
            return DEFAULT_LVLM  # a served LVLM type without an adapter of its own
        return adapter_for(model_type)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._types()))

    def __len__(self) -> int:
        return len(self._types())

    def __repr__(self) -> str:
        return f"SUPPORTED({', '.join(f'{t}: {a.name}' for t, a in self.items())})"


SUPPORTED: Mapping[str, ModelAdapter] = _Supported()
