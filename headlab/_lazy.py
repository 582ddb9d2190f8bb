"""Lazy package facades (PEP 562): a name is imported from its module the first time it is used.

`import headlab` and the CLI's `--help` must not pay for torch, transformers and every architecture's
modeling code; a facade lists where each public name lives and imports that module on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_facade(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for `package`, whose public names live in `exports` (name -> module).

    A module path equal to `package + "." + name` exports that submodule itself."""

    def __getattr__(name: str):
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        target = importlib.import_module(module)
        value = target if module == f"{package}.{name}" else getattr(target, name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
