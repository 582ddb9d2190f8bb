"""Model fingerprints: architecture + config hash + weights hash, so a store knows which model wrote it.

The config hash covers the architecture's config without volatile keys (attention implementation,
transformers version, dtype); the weights hash covers every parameter and buffer, by name, shape, dtype
and bytes (one pass over the weights: about a second per GB on a CPU).
"""

from __future__ import annotations

import hashlib
import json

import torch

from headlab.loading import LoadedModel

_VOLATILE = {
    "_attn_implementation_internal",
    "_attn_implementation",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "_commit_hash",
    "attn_implementation",
    "_experts_implementation_internal",
}


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in sorted(obj.items()) if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def config_hash(lm: LoadedModel) -> str:
    text = json.dumps(_clean(lm.model.config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_hash(lm: LoadedModel) -> str:
    digest = hashlib.sha256()
    state = lm.model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def fingerprint(lm: LoadedModel) -> dict[str, str]:
    return {
        "architecture": type(lm.model).__name__,
        "model_type": lm.model_type,
        "config_hash": config_hash(lm),
        "weights_hash": weights_hash(lm),
        "source": lm.source,
    }
