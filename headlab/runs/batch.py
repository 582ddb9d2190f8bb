"""Batch capture into a store, resumable: what `headlab capture` runs.

Contract:
- Resumable, never duplicated: items whose id is already committed under the condition are skipped (counted
  in `skipped`). The committed set is re-read before every forward pass, and again when an append finds an
  id that another writer committed meanwhile (first commit wins): those items are then skipped too.
- One bad item never costs its neighbours. Each item is checked alone first (its id's kind, its image
  opened once); a batch whose preparation or forward pass still fails is split in halves until the failing
  item is alone. That item is listed in `failed` ("file:line: id X: reason") and every other item is
  captured. Any exception from the processor or the model (not only a HeadlabError) is the item's problem;
  only Ctrl-C stops the run, and every committed shard stays.
- Ids are of one kind per store (`Store.id_kind`): an item whose id is of the other kind (for an empty store:
  of another kind than the first item's) fails alone, saying which kind the store holds.
- Each batch that succeeds is one atomic shard, so a crash loses at most the batch being written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from headlab.datasets.prompts import PromptItem
from headlab.errors import HeadlabError, InputError, StoreError
from headlab.inputs import open_image, prepare
from headlab.loading import Family, LoadedModel
from headlab.probe import Select, Stats, capture
from headlab.runs.outcome import reason
from headlab.store.ids import KIND_WORDS, kind_of
from headlab.store.store import Store


@dataclass
class BatchReport:
    done: int = 0  # items captured by this run
    skipped: int = 0  # items already in the store (earlier runs or other writers)
    failed: list[str] = field(default_factory=list)  # "file:line: id X: reason", one per failed item
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
    """Capture every not-yet-committed item into `store`; returns what happened (module docstring).

    attention_layers: layers whose compact attention is stored (None = all, () = none).
    """
    if batch_size < 1:
        raise InputError(f"the batch size must be at least 1, got {batch_size}")
    tower = lm.main.name  # the language model of LLMs and LVLMs, the encoder of ViTs
    compact = None if attention_layers == () else Select(layers=attention_layers, tower=tower)
    if compact is not None:
        compact.layer_ids(lm.main.n_layers)  # a bad selection is one error before any work, not one per item
    run = _Run(lm, store, condition, compact, head_outputs)
    done = store.committed(condition)
    todo = [it for it in items if it.id not in done]
    run.report.skipped = len(items) - len(todo)
    run.bar = tqdm(total=len(todo), desc=f"capture [{condition}]", unit="ex", disable=not progress)
    kind = store.id_kind or (kind_of(todo[0].id) if todo else None)
    try:
        pending: list[_Loaded] = []
        for item in todo:
            loaded = run.load(item, kind)
            if loaded is not None:
                pending.append(loaded)
            if len(pending) == batch_size:
                run.batch(pending)
                pending = []
        run.batch(pending)
    except KeyboardInterrupt:
        run.report.interrupted = True
    finally:
        run.bar.close()
    return run.report


@dataclass(frozen=True)
class _Loaded:
    item: PromptItem
    image: object | None  # the opened PIL image, decoded once


def _kind_mismatch(mine: str, kind: str, store_kind: str | None) -> str:
    article = {"int": "an", "str": "a"}
    held = (
        f"this store holds {KIND_WORDS[kind]} ids"
        if store_kind
        else f"this run's first id is {article[kind]} {KIND_WORDS[kind]}"
    )
    return (
        f"the id is {article[mine]} {KIND_WORDS[mine]} but {held}; one store holds ids of one kind: make "
        f"every id {article[kind]} {KIND_WORDS[kind]}, or capture into another store"
    )


class _Run:
    """One capture run: loads items, runs batches (splitting failed ones), appends, keeps the report."""

    def __init__(self, lm, store, condition, compact, head_outputs) -> None:
        self.lm, self.store, self.condition = lm, store, condition
        self.compact, self.head_outputs = compact, head_outputs
        self.report = BatchReport()
        self.bar: tqdm | None = None

    def load(self, item: PromptItem, kind: str | None) -> _Loaded | None:
        """The item with its image opened, or None after listing why it cannot be captured."""
        if kind is not None and kind_of(item.id) != kind:
            return self._fail(item, InputError(_kind_mismatch(kind_of(item.id), kind, self.store.id_kind)))
        if item.image is None or self.lm.family is Family.LLM:
            return _Loaded(item, None)
        try:
            return _Loaded(item, open_image(item.image))
        except HeadlabError as err:
            return self._fail(item, err)

    def batch(self, batch: list[_Loaded]) -> None:
        """Capture `batch` as one shard; if that fails, each half on its own, down to the failing item."""
        committed = self.store.committed(self.condition) if batch else set()
        fresh = [b for b in batch if b.item.id not in committed]
        self._resolved(len(batch) - len(fresh), skipped=True)
        if not fresh:
            return
        try:
            rec = self._forward(fresh)
        except Exception as err:  # any failure is the batch's; splitting finds its item
            if len(fresh) == 1:
                self._fail(fresh[0].item, err)
                return
            half = len(fresh) // 2
            self.batch(fresh[:half])
            self.batch(fresh[half:])
            return
        self._append(fresh, rec)

    def _forward(self, batch: list[_Loaded]):
        import torch

        images = [b.image for b in batch if b.image is not None]
        inputs = prepare(self.lm, [b.item.prompt for b in batch], images)
        heads = Select(queries=[-1], tower=self.lm.main.name) if self.head_outputs else None
        with (
            torch.no_grad(),
            capture(self.lm, stats=Stats(), compact=self.compact, head_outputs=heads) as rec,
        ):
            self.lm.model(**inputs)
        return rec

    def _append(self, batch: list[_Loaded], rec) -> None:
        """Commit the batch's shard; items another writer committed meanwhile are skipped (first wins)."""
        items = [b.item for b in batch]
        ids = {it.id for it in items}
        if self.store.committed(self.condition) & ids:
            self.batch(batch)  # redone without them
            return
        try:
            self.store.append(
                rec,
                examples=[it.id for it in items],
                condition=self.condition,
                meta=[it.meta for it in items],
            )
        except StoreError as err:
            if self.store.committed(self.condition) & ids:  # committed between the check and the append
                self.batch(batch)
                return
            for item in items:
                self._fail(item, err)
            return
        self.report.done += len(items)
        self._resolved(len(items))

    def _fail(self, item: PromptItem, err: Exception) -> None:
        self.report.failed.append(f"{item.describe()}: {reason(err)}")
        self._resolved(1)

    def _resolved(self, n: int, *, skipped: bool = False) -> None:
        if skipped:
            self.report.skipped += n
        if self.bar is not None and n:
            self.bar.update(n)
