"""The registry of model adapters: `@register`, one lookup `adapter_for`, and the `SUPPORTED` view.

A family file declares its adapter in a function named after it and decorates it with `@register`; the
registry calls the function once, names the adapter after it (the decorated name is then the adapter) and
refuses a second adapter of the same name
or for a model type another adapter already serves. Families with nothing special declare nothing: the
generic `DEFAULT` serves the decoder-only LLMs listed in `GENERIC_MODEL_TYPES`.

`adapter_for(config_or_model)` is the one lookup: a registered adapter for the model type, else `DEFAULT`
for a generic one, else an `UnsupportedModelError` listing what is supported. (Serving every architecture
transformers runs replaces that last branch with discovery; the adapters stay as they are.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

from headlab.errors import HeadlabError, UnsupportedModelError
from headlab.models.adapter import ModelAdapter

# The decoder-only LLMs the generic defaults serve as they are (tested with their random builder of the
# same name): causal, rotary embedding (or learned positions) next to the layer list, `mlp` per layer.
GENERIC_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
DEFAULT = ModelAdapter(model_types=GENERIC_MODEL_TYPES, random_builders=GENERIC_MODEL_TYPES)

_ADAPTERS: dict[str, ModelAdapter] = {}  # name -> adapter
_BY_MODEL_TYPE: dict[str, ModelAdapter] = dict.fromkeys(GENERIC_MODEL_TYPES, DEFAULT)


def register(declare: Callable[[], ModelAdapter]) -> ModelAdapter:
    """Decorator: register the adapter `declare()` under the name `declare.__name__`; the decorated name
    is then the registered adapter.

    Raises HeadlabError for a name already registered, or a model type another adapter already serves."""
    name = declare.__name__
    adapter = declare()
    if adapter.name not in (ModelAdapter.name, name):
        raise HeadlabError(
            f"the adapter declared by {name}() is named {adapter.name!r}; leave its name unset"
        )
    adapter = dataclasses.replace(adapter, name=name)
    if name in _ADAPTERS or name == DEFAULT.name:
        raise HeadlabError(f"a model adapter named {name!r} is already registered")
    if not adapter.model_types:
        raise HeadlabError(f"the model adapter {name!r} declares no model_types")
    taken = [t for t in adapter.model_types if t in _BY_MODEL_TYPE]
    if taken:
        owner = _BY_MODEL_TYPE[taken[0]].name
        raise HeadlabError(f"model type {taken[0]!r} of adapter {name!r} is already served by {owner!r}")
    _ADAPTERS[name] = adapter
    _BY_MODEL_TYPE.update(dict.fromkeys(adapter.model_types, adapter))
    return adapter


def adapters() -> tuple[ModelAdapter, ...]:
    """Every adapter: the default first, then the registered ones by name."""
    return (DEFAULT, *(_ADAPTERS[name] for name in sorted(_ADAPTERS)))


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
    """The adapter of a transformers config, a model built from one, a LoadedModel or a model type.

    Raises UnsupportedModelError (listing the supported model types) for an architecture headlab does not
    serve yet."""
    model_type = _model_type(config_or_model)
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"headlab does not support the architecture {model_type!r} yet; supported: {sorted(_BY_MODEL_TYPE)}"
        ) from None


class _Supported(Mapping[str, ModelAdapter]):
    """A read-only view: model type -> the adapter serving it (`hl.SUPPORTED`)."""

    def __getitem__(self, model_type: str) -> ModelAdapter:
        return _BY_MODEL_TYPE[model_type]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_BY_MODEL_TYPE))

    def __len__(self) -> int:
        return len(_BY_MODEL_TYPE)

    def __repr__(self) -> str:
        return f"SUPPORTED({', '.join(f'{t}: {a.name}' for t, a in self.items())})"


SUPPORTED: Mapping[str, ModelAdapter] = _Supported()
