"""Mllama (Llama 3.2 Vision): refused, with the reason. Its language model puts cross-attention layers
(`cross_attn`: queries from the text, keys and values from the image's vision states) between its self-
attention layers, and its vision model has two stacks (a local and a global encoder). headlab numbers one
attention stack per tower whose keys are the example's own tokens; cross-attention keys are not tokens of
the sequence, so they have no position, role or causal mask, and no analysis or intervention of headlab
reads them."""

from __future__ import annotations

from headlab.models.registry import refuse

MLLAMA_REASON = (
    "its language model interleaves cross-attention layers (keys and values from the image's vision states, "
    "not tokens of the sequence) with self-attention layers, and its vision model has two stacks (local and "
    "global); headlab serves one stack of self-attention per tower, whose keys are the example's own tokens"
)

refuse("mllama", reason=MLLAMA_REASON)
