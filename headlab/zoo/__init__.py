"""Models that run without a hub: tiny random-weight models of real architectures (`build_random`) and the
trained zoo (`ZOO`, `train`, `hl.load("zoo:NAME")`): small models of the real classes trained on headlab's
synthetic tasks, with real circuits, sinks and hallucinations.

Imported lazily: listing the zoo does not import torch or any model code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from headlab._lazy import lazy_facade

__getattr__, __dir__ = lazy_facade(
    __name__,
    {
        **dict.fromkeys(("RANDOM_BUILDERS", "build_random"), "headlab.zoo.random_models"),
        **dict.fromkeys(("ZOO", "card", "zoo_path"), "headlab.zoo.registry"),
        "train": "headlab.zoo.recipes",
    },
)

if TYPE_CHECKING:
    from headlab.zoo.random_models import RANDOM_BUILDERS, build_random
    from headlab.zoo.recipes import train
    from headlab.zoo.registry import ZOO, card, zoo_path

__all__ = ["RANDOM_BUILDERS", "ZOO", "build_random", "card", "train", "zoo_path"]
