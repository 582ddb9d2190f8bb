"""A cache of computed parts of a run, tied to one model: what lets a rerun recompute nothing.

Format: one JSON file {"model", "model_path", "fingerprint", "entries": {key: value}}, rewritten atomically
(`runs.atomic`) after every entry, so Ctrl-C keeps every part computed so far.

Rules: the cache is tied to the model's fingerprint (`runs.answers.ModelIdentity`), not to the --model text:
the same model under another path reuses it, another model is refused (`StoreError`). A cache from before
fingerprints is used when its model text equals --model, and is then recorded under the fingerprint. A file
that is not such a cache is refused, saying to delete it. `compute_parts` computes, in order, each part whose
key the cache lacks and caches it at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from headlab.errors import StoreError
from headlab.runs.answers import ModelIdentity
from headlab.runs.atomic import write_text_atomic
from headlab.runs.outcome import Progress


class PartsCache:
    """The cache file at `path` of the model `model` (module docstring)."""

    def __init__(self, path: Path, model: ModelIdentity) -> None:
        self.path, self.model, self.entries = path, model, {}
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise TypeError("entries is not an object")
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise StoreError(f"{path} is malformed ({err}); delete it to recompute") from None
        if "fingerprint" in data:
            model.refuse_other(data["fingerprint"], path, "results")
        elif data.get("model") != model.given:
            raise StoreError(
                f"{path} holds results of model {data.get('model')!r}, not {model.given!r}; "
                "use another --out folder for another model"
            )
        self.entries = entries
        if "fingerprint" not in data:
            self._save()  # a cache from before fingerprints: recorded under this model's

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self._save()

    def _save(self) -> None:
        head = {
            "model": self.model.given,
            "model_path": self.model.path,
            "fingerprint": self.model.fingerprint,
        }
        write_text_atomic(self.path, json.dumps(head | {"entries": self.entries}, indent=1))


@dataclass
class PartsRun:
    computed: int = 0
    cached: int = 0


def compute_parts(
    cache: PartsCache,
    parts: Mapping[str, Callable[[], object]],
    *,
    progress: Progress | None = None,
    description: str = "parts",
) -> PartsRun:
    """`parts[key]()` for each key the cache lacks, cached as soon as it is computed; the counts."""
    todo = [key for key in parts if cache.get(key) is None]
    run = PartsRun(cached=len(parts) - len(todo))
    tick = progress(description, len(todo)) if progress and todo else None
    for key in todo:
        cache.put(key, parts[key]())
        run.computed += 1
        if tick:
            tick()
    return run
