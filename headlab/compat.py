"""Differences between the transformers releases headlab supports, in one place.

headlab declares `transformers>=5.0,<6` and is tested on the oldest and the newest release the index
offers (`make test-oldest`, `make test-latest`). Whatever changed between those releases is answered here
and nowhere else; the probe, the interventions and the reports ask this module instead of reading a
keyword themselves.

Importing this module is cheap (versions are read from package metadata; nothing heavy is imported).

What changed so far:
- the KV cache keyword. Up to 5.23 a model's forward takes (and `generate()` passes) `past_key_values=`;
  from 5.24 it is `cache=` (the old name is still accepted by `forward` through a deprecation shim, so a
  forward pre-hook may see either), and model outputs carry the cache as `.cache` instead of
  `.past_key_values`.
- how many tokens a static cache holds (`past_length`): 5.0's `StaticLayer.get_seq_length` counts the
  non-zero slots of the first row and head, 5.24's reads a counter; both give the filled slots. What did
  not change from 5.0 to 5.24: which keys each cache layer hands the attention function (the last ones
  of a sliding window in order, a static cache's slots in token order), read in headlab.probe.keys.
- typer 0.2x vendors its own copy of click (`typer._click`); the usage-error classes the CLI catches live
  there, and in `click` for older typer releases.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import version
from types import ModuleType
from typing import Any


def _release(package: str) -> tuple[int, ...]:
    """(major, minor, patch) of an installed package, from its metadata (without importing it)."""
    return tuple(int(part) for part in version(package).split("+")[0].split(".")[:3] if part.isdigit())


TRANSFORMERS_VERSION = _release("transformers")

# the keyword this release's forward and generate() use for the KV cache
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= (5, 24) else "past_key_values"
# every name a forward call of a supported release may carry the cache under (new name first)
_CACHE_NAMES = ("cache", "past_key_values")


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a model forward was called with (under either keyword), or None."""
    for name in _CACHE_NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def past_length(kwargs: Mapping[str, Any]) -> int:
    """How many tokens the KV cache of this forward call already holds (0 for a prefill or no cache)."""
    cache = cache_from_kwargs(kwargs)
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def cache_of(output: Any) -> Any:
    """The KV cache a model forward returned (`output.cache` or `output.past_key_values`), or None."""
    for name in _CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to a model forward in this release's spelling."""
    return {CACHE_KWARG: cache}


def cli_exceptions() -> ModuleType:
    """The module holding the click exception classes (UsageError, NoArgsIsHelpError, Abort) that the
    installed typer raises."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer releases that use click itself
        from click import exceptions
    return exceptions
