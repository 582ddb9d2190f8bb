"""headlab: a workbench for attention heads in LLMs, vision-language models and ViTs.

import headlab as hl
lm = hl.load("path/or/hub-id")
with hl.capture(lm, patterns=hl.Select(layers=[0], heads=[0])) as rec:
    lm.model(**inputs)
rec.head_stats

The names below are imported on first use (`headlab._lazy`): `import headlab` costs almost nothing, and
`hl.load` pays for torch and transformers when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headlab._lazy import lazy_facade
from headlab.errors import (
    HeadlabError,
    InputError,
    ModelLoadError,
    SelectionError,
    StoreError,
    UnsupportedModelError,
)
from headlab.version import __version__ as __version__

_EXPORTS = {
    **dict.fromkeys(
        ("ACT", "CCA", "PAICFG", "PAINT", "PINE", "VAR", "VHR", "HeadAblation", "HeadScale", "intervene"),
        "headlab.interventions",
    ),
    **dict.fromkeys(("SUPPORTED", "LoadedModel", "Tower", "describe", "load"), "headlab.loading"),
    "Family": "headlab.models",
    **dict.fromkeys(
        ("Record", "Select", "Stats", "TokenRoles", "capture", "grid_roles", "text_roles"), "headlab.probe"
    ),
    "Store": "headlab.store",
    **{
        name: f"headlab.{name}"
        for name in (
            "analyses",
            "datasets",
            "interventions",
            "kernels",
            "models",
            "plots",
            "probe",
            "runs",
            "store",
            "zoo",
        )
    },
}
__getattr__, __dir__ = lazy_facade(__name__, _EXPORTS)

if TYPE_CHECKING:  # what the facade resolves to, for type checkers and IDEs
    from headlab import (  # noqa: F401
        analyses,
        datasets,
        interventions,
        kernels,
        models,
        plots,
        probe,
        runs,
        store,
        zoo,
    )
    from headlab.interventions import (
        ACT,
        CCA,
        PAICFG,
        PAINT,
        PINE,
        VAR,
        VHR,
        HeadAblation,
        HeadScale,
        intervene,
    )
    from headlab.loading import SUPPORTED, LoadedModel, Tower, describe, load
    from headlab.models import Family
    from headlab.probe import Record, Select, Stats, TokenRoles, capture, grid_roles, text_roles
    from headlab.store import Store

__all__ = [
    "ACT",
    "CCA",
    "PAICFG",
    "PAINT",
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
