"""The capture run of the attention-sinks report: every head's statistics (alpha of the first `FIRST_K` keys,
`Stats()`) and the residual stream of every layer, for each prompt not yet committed in the store.

Rules: examples already committed under the condition "default" are skipped, so a rerun resumes (and
captures nothing when all are in); a store holding another prompt under one of the ids is refused (the resume
would be wrong); a batch that fails is retried one prompt at a time, so only the prompts that fail alone are
listed ("id X (line N): reason") and the others are captured; Ctrl-C stops with `interrupted` and every
committed shard stays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from headlab.errors import InputError
from headlab.runs.outcome import Progress, reason

FIRST_K = 4


@dataclass
class CaptureRun:
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False


def capture_sinks(lm, store, items, *, batch_size: int = 8, progress: Progress | None = None) -> CaptureRun:
    """Capture Stats(first_k=FIRST_K) of every head and the residuals of every layer for each item not yet
    committed in `store` (module docstring)."""
    run = CaptureRun()
    _check_same_prompts(store, items)
    done = store.committed("default")
    todo = [it for it in items if it.id not in done]
    run.skipped = len(items) - len(todo)
    tick = progress("capture", len(todo)) if progress and todo else None
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            if not _capture_batch(lm, store, batch, run) and len(batch) > 1:
                for it in batch:
                    _capture_batch(lm, store, [it], run)
            for _ in batch:
                if tick:
                    tick()
    except KeyboardInterrupt:
        run.interrupted = True
    return run


def _capture_batch(lm, store, batch, run: CaptureRun) -> bool:
    """Capture and commit one batch; False when it failed (a lone item's failure is listed in `run`)."""
    import torch

    from headlab.inputs import prepare
    from headlab.probe import Select, Stats, capture

    try:
        inputs = prepare(lm, [it.prompt for it in batch], [])
        with torch.no_grad(), capture(lm, stats=Stats(first_k=FIRST_K), residuals=Select()) as rec:
            lm.model(**inputs)
    except Exception as err:  # a prompt's failure is listed; only Ctrl-C stops the run
        if len(batch) == 1:
            run.failed.append(f"id {batch[0].id!r} (line {batch[0].line}): {reason(err)}")
        return False
    store.append(rec, examples=[it.id for it in batch], meta=[it.meta for it in batch])
    run.done += len(batch)
    return True


def _check_same_prompts(store, items) -> None:
    """A store's examples must hold the same prompts under the same ids (else the resume would be wrong)."""
    if not store.committed("default"):
        return
    ex = store.examples(condition="default")
    stored = {
        e.item() if hasattr(e, "item") else e: json.loads(m).get("prompt") if isinstance(m, str) else None
        for e, m in zip(ex.example, ex.meta, strict=True)
    }
    for it in items:
        if it.id in stored and stored[it.id] is not None and stored[it.id] != it.prompt:
            raise InputError(
                f"{store.root} holds another prompt under id {it.id}; use another --out folder for other prompts"
            )
