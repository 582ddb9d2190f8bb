"""The analyses `headlab analyze NAME STORE` can run, and how a result reaches the store."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from headlab.errors import SelectionError
from headlab.loading import LoadedModel, load
from headlab.store import Store


@dataclass(frozen=True)
class Analysis:
    name: str
    description: str
    run: Callable[[Store, dict], pd.DataFrame]  # (store, options) -> tidy frame keyed by layer and head
    options: dict  # option name -> (default, help)


# modules that contribute `ANALYSES`; each is imported on first use
MODULES: tuple[str, ...] = ("vhd", "sinks", "position", "importance", "pruning", "circuits", "sae", "atlas")

ANALYSES: dict[str, Analysis] = {}


def _collect() -> dict[str, Analysis]:
    if not ANALYSES:
        for module in MODULES:
            ANALYSES.update(importlib.import_module(f"headlab.analyses.{module}").ANALYSES)
    return ANALYSES


def store_model(store: Store) -> LoadedModel:
    """The model a store was captured from (its manifest's source), loaded and checked against it."""
    lm = load(store.manifest["fingerprint"]["source"])
    store.check_model(lm)
    return lm


def run_analysis(name: str, store: Store, **options) -> pd.DataFrame:
    """Run analysis `name` on `store` with `options` (the entry's defaults for the rest), save the frame
    as the store's result `name`, and return it."""
    analyses = _collect()
    if name not in analyses:
        raise SelectionError(f"no analysis named {name!r}; choose one of {sorted(analyses)}")
    entry = analyses[name]
    unknown = set(options) - set(entry.options)
    if unknown:
        raise SelectionError(
            f"analysis {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(entry.options)}"
        )
    merged = {key: options.get(key, default) for key, (default, _help) in entry.options.items()}
    frame = entry.run(store, merged)
    store.save_result(name, frame, merged)
    return frame
