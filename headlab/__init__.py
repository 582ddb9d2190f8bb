"""headlab: a workbench for attention heads in LLMs, vision-language models and ViTs.

import headlab as hl
lm = hl.load("path/or/hub-id")
with hl.capture(lm, patterns=hl.Select(layers=[0], heads=[0])) as rec:
    lm.model(**inputs)
rec.head_stats
"""

from headlab import zoo
from headlab.errors import (
    HeadlabError,
    InputError,
    ModelLoadError,
    SelectionError,
    StoreError,
    UnsupportedModelError,
)
from headlab.interventions import ACT, PINE, VAR, VHR, HeadAblation, HeadScale, intervene
from headlab.loading import SUPPORTED, Family, LoadedModel, Tower, describe, load
from headlab.probe import Record, Select, Stats, TokenRoles, capture, grid_roles, text_roles
from headlab.store import Store

__version__ = "0.1.0"

__all__ = [
    "ACT",
    "PINE",
    "SUPPORTED",
    "VAR",
    "VHR",
    "Family",
    "HeadAblation",
    "HeadScale",
    "HeadlabError",
    "InputError",
    "LoadedModel",
    "ModelLoadError",
    "Record",
    "Select",
    "SelectionError",
    "Stats",
    "Store",
    "StoreError",
    "TokenRoles",
    "Tower",
    "UnsupportedModelError",
    "capture",
    "describe",
    "grid_roles",
    "intervene",
    "load",
    "text_roles",
    "zoo",
]
