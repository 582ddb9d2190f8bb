"""Hub ids without waiting: resolve a Hugging Face hub id to something `from_pretrained` can load at once.

`from_pretrained("org/name")` on a machine that cannot reach the hub retries for about 20 s before it
fails, and its error does not say what to do. headlab decides first, in well under a second:
- the hub answers (or a proxy is configured, which headlab cannot judge): the id is passed on unchanged;
- the hub is unreachable or `HF_HUB_OFFLINE` is set: the id's snapshot in the local hub cache is used if it
  is there (a directory path, loaded with no network), else a `ModelLoadError` says why and what to do.
"""

from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlparse

from headlab.errors import ModelLoadError

# 'gpt2', 'openai-community/gpt2', 'org/name.v2': the hub's repo id grammar (no leading '.', '/' or '~')
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
CONNECT_TIMEOUT_S = 3.0


def looks_like_hub_id(source: str) -> bool:
    return _HUB_ID.fullmatch(source) is not None


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here, or None when it may be (answered, or behind a proxy)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None  # a proxy decides; let huggingface_hub try
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as err:
        return f"cannot connect to {host}:{port} ({err.strerror or err})"


def resolve_hub_id(repo_id: str) -> str:
    """`repo_id` itself when the hub is reachable; else its cached snapshot directory; else ModelLoadError."""
    reason = hub_unreachable()
    if reason is None:
        return repo_id
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelLoadError(
            f"{repo_id!r} is not a local directory, and as a hub id it cannot be fetched: the Hugging Face hub "
            f"is not reachable from here ({reason}) and {repo_id!r} is not in the local hub cache "
            f"({constants.HF_HUB_CACHE}). Pass a local directory written by save_pretrained, or download the "
            f"model where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass DIR."
        ) from None
