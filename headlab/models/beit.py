"""BEiT (`BeitModel`): a bidirectional encoder over a CLS token and the patch grid whose scores carry a
learned relative position bias (a [head, q, k] table per layer, or one shared by all layers).

The bias reaches the attention function added to the mask; headlab reads it from there
(`headlab.probe.call.score_bias`) and adds it to the scores in every kernel, the statistics' alpha keys and
the rebuilt rows, so patterns and statistics are the model's. Compact attention does not store the bias
(rows are stored instead, with patterns=), and interventions that edit rows (ACT, VAR, PINE) refuse a
biased call; head scaling, ablation and VHR apply."""

from __future__ import annotations

from headlab.models.adapter import Family
from headlab.models.registry import ModelAdapter, register


@register
def beit() -> ModelAdapter:
    return ModelAdapter(
        model_types=("beit",),
        family=Family.VIT,
        auto_class="AutoModel",
        prefix_tokens=1,
        random_builders=("beit",),
    )
