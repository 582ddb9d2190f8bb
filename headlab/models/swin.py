"""Swin (`SwinModel`): refused, with the reason. Its attention does route through AttentionInterface, but
over windows: each stage is its own stack of layers (`encoder.layers.<stage>.blocks.<i>.attention`), patches
are merged between stages, and every attention call sees one (shifted) window of one image as a batch row.
headlab serves one stack per tower and one attention call per example over all its tokens."""

from __future__ import annotations

from headlab.models.registry import refuse

SWIN_REASON = (
    "its attention runs over shifted windows in hierarchical stages (one stack of layers per stage, patches "
    "merged between stages; each attention call sees one window of one image as a batch row, with the "
    "window shift as a mask); headlab serves one stack of layers per tower whose attention calls see each "
    "example's tokens, so Swin's per-window patterns and statistics have no example, grid or role to go to"
)

refuse("swin", reason=SWIN_REASON)
