"""Models that run without a hub: tiny random-weight models of real architectures (`build_random`) and the
trained zoo (`ZOO`, `train`, `hl.load("zoo:NAME")`): small models of the real classes trained on headlab's
synthetic tasks, with real circuits, sinks and hallucinations."""

from headlab.zoo.random_models import RANDOM_BUILDERS, build_random
from headlab.zoo.registry import ZOO, card, train, zoo_path

__all__ = ["RANDOM_BUILDERS", "ZOO", "build_random", "card", "train", "zoo_path"]
