"""BEiT (`BeitModel`): refused, with the reason. Its attention routes through AttentionInterface, but each
layer's learned relative position bias (a [head, q, k] table, or one shared by all layers) reaches the
attention function added to the mask. headlab's kernels read a mask as keep / drop only (`keep_mask`), so
the bias would be dropped: patterns and statistics would silently differ from the model's."""

from __future__ import annotations

from headlab.models.registry import refuse

BEIT_REASON = (
    "its attention adds a learned relative position bias to the scores, passed to the attention function "
    "inside an additive mask; headlab's attention function reads masks as keep / drop only and does not add "
    "score biases yet, so its patterns and statistics would differ from the model's"
)

refuse("beit", reason=BEIT_REASON)
