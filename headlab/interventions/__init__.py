"""Interventions: the published head interventions (VHR, VAR, ACT, PINE, PAINT with PAI's CFG, CCA) and
head ablation, frozen dataclasses with their papers' defaults, applied exactly through the headlab attention
function.

    with hl.intervene(lm, hl.VHR(alpha=2.0), hl.VAR(p=0.6, rho=0.5)):
        out = lm.model.generate(**inputs)
"""

from headlab.interventions.act import ACT
from headlab.interventions.cca import CCA, cca_mask, cca_positions, ring_index
from headlab.interventions.core import (
    AttentionCall,
    GroupEdit,
    Intervention,
    Patch,
    grouped_attention,
    intervene,
    reference_attention,
)
from headlab.interventions.heads import HeadAblation, HeadScale, head_outputs, mean_head_outputs
from headlab.interventions.paint import PAICFG, PAINT, paint_reference, paint_tokens
from headlab.interventions.pine import PINE, pine_inputs
from headlab.interventions.var import VAR, find_sink_dims
from headlab.interventions.vhr import VHR, vhr_reference

__all__ = [
    "ACT",
    "CCA",
    "PAICFG",
    "PAINT",
    "PINE",
    "VAR",
    "VHR",
    "AttentionCall",
    "GroupEdit",
    "HeadAblation",
    "HeadScale",
    "Intervention",
    "Patch",
    "cca_mask",
    "cca_positions",
    "find_sink_dims",
    "grouped_attention",
    "head_outputs",
    "intervene",
    "mean_head_outputs",
    "paint_reference",
    "paint_tokens",
    "pine_inputs",
    "reference_attention",
    "ring_index",
    "vhr_reference",
]
