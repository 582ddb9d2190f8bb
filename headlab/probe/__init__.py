"""Capture: attach to a model's attention and record what was asked for (see `capture`)."""

from headlab.probe.attention import ATTENTION_NAME, headlab_attention, switched_to_headlab
from headlab.probe.capture import capture
from headlab.probe.record import AttentionRows, HeadOutputs, Record, ResidualRatios
from headlab.probe.roles import TokenRoles, grid_roles, text_roles
from headlab.probe.select import Select, Stats

__all__ = [
    "ATTENTION_NAME",
    "AttentionRows",
    "HeadOutputs",
    "Record",
    "ResidualRatios",
    "Select",
    "Stats",
    "TokenRoles",
    "capture",
    "grid_roles",
    "headlab_attention",
    "switched_to_headlab",
    "text_roles",
]
