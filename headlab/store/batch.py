"""Batch capture into a store, resumable: what `headlab capture` runs.

Examples already committed under the condition are skipped, so rerunning the same command after a crash
or Ctrl-C continues where it stopped. Each batch is one atomic shard; an interrupted batch is dropped whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from headlab.datasets.prompts import PromptItem
from headlab.errors import HeadlabError
from headlab.inputs import prepare
from headlab.loading import LoadedModel
from headlab.probe import Select, Stats, capture
from headlab.store.store import Store


@dataclass
class BatchReport:
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False


def capture_to_store(
    lm: LoadedModel,
    store: Store,
    items: Sequence[PromptItem],
    *,
    condition: str = "default",
    batch_size: int = 8,
    attention_layers: Sequence[int] | None = (),
    head_outputs: bool = True,
    progress: bool = True,
) -> BatchReport:
    """Capture every not-yet-committed item into `store`; returns what happened.

    attention_layers: layers whose compact attention is stored (None = all, () = none).
    """
    report = BatchReport()
    done = store.committed(condition)
    todo = [it for it in items if it.id not in done]
    report.skipped = len(items) - len(todo)
    compact = None if attention_layers == () else Select(layers=attention_layers)
    bar = tqdm(total=len(todo), desc=f"capture [{condition}]", unit="ex", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            try:
                inputs = prepare(
                    lm, [it.prompt for it in batch], [it.image for it in batch if it.image is not None]
                )
                with (
                    torch.no_grad(),
                    capture(
                        lm,
                        stats=Stats(),
                        compact=compact,
                        head_outputs=Select(queries=[-1], tower=lm.main.name) if head_outputs else None,
                    ) as rec,
                ):
                    lm.model(**inputs)
            except HeadlabError as err:  # a bad example never stops the run
                report.failed += [f"id {it.id} (line {it.line}): {err}" for it in batch]
                bar.update(len(batch))
                continue
            store.append(
                rec, examples=[it.id for it in batch], condition=condition, meta=[it.meta for it in batch]
            )
            report.done += len(batch)
            bar.update(len(batch))
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        bar.close()
    return report
