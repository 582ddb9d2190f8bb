"""Models that run without a hub: tiny random-weight models of real architectures (trained zoo models:
their issue)."""

from headlab.zoo.random_models import RANDOM_BUILDERS, build_random

__all__ = ["RANDOM_BUILDERS", "build_random"]
