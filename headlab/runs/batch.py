"""Batch capture into a store, resumable, under one or more conditions: what `headlab capture` runs.

What is captured, per item and condition (`headlab.conditions`: `with_image`, `no_image`, `+vhr`, ...):
- the per-head statistics of every head of the chosen towers (default: every tower the model has), compact
  attention of the chosen layers (`attention_layers`; None = all) of those towers, and the head outputs of
  the main tower (language model; a ViT's encoder) at the last position, what VHD reads;
- what went into the model (`store.ExampleInfo`): the prompt as given to the model, its token ids and tokens,
  the image path as the prompt file gives it and a thumbnail, and the line's "label" / "answer" fields.
How an item becomes model input: a `no_image` condition, and any condition of an LVLM item without an image,
is text-only (`inputs.text_only_prompt`: the image placeholder removed, no pixels); other conditions use the
item's image. A condition with an intervention runs inside `intervene(lm, ...)` (`runs.answering`'s VHR / VAR).

Contract, per (item, condition) pair, the unit of work:
- Resumable, never duplicated: pairs already committed are skipped (counted in `skipped`). The committed set
  is re-read before every forward pass, and again when an append finds an id that another writer committed
  meanwhile (first commit wins): those pairs are then skipped too.
- One bad item never costs its neighbours. Each item is checked alone first (its id's kind, its image
  opened once per condition that uses it); a batch whose preparation or forward pass still fails is split in
  halves until the failing item is alone. That pair is listed in `failed` ("file:line: id X: reason", with
  " [condition]" after the id when there are several) and every other pair is captured. Any exception from
  the processor or the model (not only a HeadlabError) is the item's problem; only Ctrl-C stops the run,
  and every committed shard stays.
- Ids are of one kind per store (`Store.id_kind`): an item whose id is of the other kind (for an empty store:
  of another kind than the first item's) fails alone, saying which kind the store holds.
- Each batch that succeeds is one atomic shard of one condition, so a crash loses at most that batch.
- Data parallel (`runs.distributed`): each rank runs this on its own slice of the input into the same store;
  the store's lock makes the commits safe, and `BatchReport.merged` adds the ranks' reports up on rank 0.
Options that cannot work (an unknown tower, a layer out of range, a condition the model cannot have) are one
error before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

from tqdm import tqdm

from headlab.conditions import DEFAULT, Condition, parse_conditions
from headlab.datasets.prompts import PromptItem
from headlab.errors import HeadlabError, InputError, SelectionError, StoreError
from headlab.inputs import example_tokens, open_image, prepare, text_only_prompt, thumbnail_png
from headlab.loading import Family, LoadedModel
from headlab.probe import Select, Stats, capture
from headlab.runs.outcome import reason
from headlab.store.examples import ExampleInfo
from headlab.store.ids import KIND_WORDS, kind_of
from headlab.store.store import Store


@dataclass
class BatchReport:
    done: int = 0  # (item, condition) pairs captured by this run
    skipped: int = 0  # pairs already in the store (earlier runs or other writers)
    failed: list[str] = field(default_factory=list)  # "file:line: id X: reason", one per failed pair
    interrupted: bool = False

    @classmethod
    def merged(cls, reports: Sequence[BatchReport]) -> BatchReport:
        """One report of a data-parallel run from its ranks' reports (in rank order): counts summed, failures
        listed rank after rank, interrupted when any rank was."""
        return cls(
            done=sum(r.done for r in reports),
            skipped=sum(r.skipped for r in reports),
            failed=[line for r in reports for line in r.failed],
            interrupted=any(r.interrupted for r in reports),
        )


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What each forward pass records (checked once, before any work)."""

    stats: Stats
    compact: tuple[Select, ...]  # one per tower whose compact attention is stored
    head_outputs: Select | None


def capture_to_store(
    lm: LoadedModel,
    store: Store,
    items: Sequence[PromptItem],
    *,
    conditions: str | Condition | Sequence[str | Condition] = DEFAULT,
    towers: Sequence[str] | None = None,
    batch_size: int = 8,
    attention_layers: Sequence[int] | None = (),
    head_outputs: bool = True,
    progress: bool = True,
    id_kind: str | None = None,
) -> BatchReport:
    """Capture every not-yet-committed (item, condition) pair into `store`; returns what happened (module
    docstring).

    conditions: names (`headlab.conditions`), or Condition objects for names of your own. towers: whose
    statistics and compact attention are recorded (None = every tower of the model). attention_layers:
    layers of those towers whose compact attention is stored (None = all, () = none). head_outputs: keep
    the main tower's head outputs at the last position. id_kind: the kind ("int" or "str") ids must be
    of while the store holds none (default: the first pending item's); a data-parallel rank, which gets a
    slice of the input (`runs.distributed`), passes the kind of the whole input's first item.
    """
    if batch_size < 1:
        raise InputError(f"the batch size must be at least 1, got {batch_size}")
    parsed = _conditions(conditions)
    edits = {c.name: _interventions(lm, c) for c in parsed}
    plan = _plan(lm, towers, attention_layers, head_outputs)
    report = BatchReport()
    for condition in parsed:
        run = _Run(
            lm,
            store,
            condition,
            edits[condition.name],
            plan,
            report,
            batch_size,
            tagged=len(parsed) > 1,
            id_kind=id_kind,
        )
        if not run.run(items, progress):
            break
    return report


def _conditions(given) -> tuple[Condition, ...]:
    """Conditions from names (parsed) and Condition objects (kept), each name once."""
    given = [given] if isinstance(given, str | Condition) else list(given)
    named = [g for g in given if isinstance(g, str)]
    parsed = iter(parse_conditions(named) if named else ())
    out = tuple(next(parsed) if isinstance(g, str) else g for g in given)
    if len({c.name for c in out}) != len(out):
        raise InputError(f"a condition name is given twice in {[c.name for c in out]}; give each once")
    return out


def _plan(lm: LoadedModel, towers, attention_layers, head_outputs: bool) -> _Plan:
    """The checked recording plan: towers known to the model, layers in range for each of them."""
    names = tuple(t.name for t in lm.towers) if towers is None else tuple(dict.fromkeys(towers))
    held = [t.name for t in lm.towers]
    unknown = [t for t in names if t not in held]
    if unknown or not names:
        what = f"no tower {unknown[0]!r}" if unknown else "no tower chosen"
        raise InputError(f"{lm.model_type}: {what}; its towers are {', '.join(held)}")
    compact = ()
    if attention_layers != ():
        compact = tuple(Select(layers=attention_layers, tower=t) for t in names)
        for sel in compact:  # a bad selection is one error before any work, not one per item
            try:
                sel.layer_ids(lm.tower(sel.tower).n_layers)
            except SelectionError as err:
                raise SelectionError(f"{err} ({sel.tower} tower; towers: {held})") from None
    return _Plan(
        stats=Stats(towers=None if set(names) == set(held) else names),
        compact=compact,
        head_outputs=Select(queries=[-1], tower=lm.main.name) if head_outputs else None,
    )


def _interventions(lm: LoadedModel, condition: Condition) -> tuple:
    """The interventions a condition runs under, checked against the model (one error before any work)."""
    if lm.family is Family.VIT and not condition.image:
        raise InputError(
            f"condition {condition.name!r}: a vision model has no text to capture without its image; "
            "capture vision models with the image (e.g. the default condition)"
        )
    if condition.intervention is None:
        return ()
    if lm.family is not Family.LVLM:
        raise InputError(
            f"condition {condition.name!r}: {condition.intervention.upper()} edits a vision-language model's "
            f"attention to the image; {lm.model_type} is a {lm.family.value}"
        )
    from headlab.runs.answering import condition_interventions

    return condition_interventions(condition.intervention, lm.tower("lm").n_layers)[0]


@dataclass(frozen=True)
class _Loaded:
    item: PromptItem
    image: object | None  # the opened PIL image this condition uses, decoded once; None: text only


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
    """One condition of a capture run: loads items, runs batches (splitting failed ones), appends, and adds
    to the shared report."""

    def __init__(
        self,
        lm,
        store,
        condition: Condition,
        edits: tuple,
        plan: _Plan,
        report,
        batch_size,
        *,
        tagged,
        id_kind,
    ):
        self.lm, self.store, self.condition, self.edits, self.plan = lm, store, condition, edits, plan
        self.report: BatchReport = report
        self.batch_size = batch_size
        self.tagged = tagged  # several conditions: messages name this one
        self.bar: tqdm | None = None
        # the ids' kind while the store holds none (None: the first item's)
        self.id_kind: str | None = id_kind

    def run(self, items: Sequence[PromptItem], progress: bool) -> bool:
        """Capture every pending item under this condition; False when Ctrl-C stopped it."""
        name = self.condition.name
        done = self.store.committed(name)
        todo = [it for it in items if it.id not in done]
        self.report.skipped += len(items) - len(todo)
        self.bar = tqdm(total=len(todo), desc=f"capture [{name}]", unit="ex", disable=not progress)
        kind = self.store.id_kind or self.id_kind or (kind_of(todo[0].id) if todo else None)
        pending: dict[bool, list[_Loaded]] = {True: [], False: []}  # with pixels / text only
        try:
            for item in todo:
                loaded = self.load(item, kind)
                if loaded is None:
                    continue
                group = pending[loaded.image is not None]
                group.append(loaded)
                if len(group) == self.batch_size:
                    self.batch(group[:])
                    group.clear()
            for group in pending.values():
                self.batch(group)
        except KeyboardInterrupt:
            self.report.interrupted = True
        finally:
            self.bar.close()
        return not self.report.interrupted

    def load(self, item: PromptItem, kind: str | None) -> _Loaded | None:
        """The item with the image this condition uses opened, or None after listing why it cannot be."""
        if kind is not None and kind_of(item.id) != kind:
            return self._fail(item, InputError(_kind_mismatch(kind_of(item.id), kind, self.store.id_kind)))
        if item.image is None and self.condition.intervention is not None:
            return self._fail(
                item,
                InputError(
                    f"{self.condition.intervention.upper()} acts on the image and this line has none; it is "
                    "captured text-only under the conditions without an intervention"
                ),
            )
        if item.image is None or self.lm.family is Family.LLM or not self.condition.image:
            return _Loaded(item, None)
        try:
            return _Loaded(item, open_image(item.image))
        except HeadlabError as err:
            return self._fail(item, err)

    def batch(self, batch: list[_Loaded]) -> None:
        """Capture `batch` as one shard; if that fails, each half on its own, down to the failing item."""
        committed = self.store.committed(self.condition.name) if batch else set()
        fresh = [b for b in batch if b.item.id not in committed]
        self._resolved(len(batch) - len(fresh), skipped=True)
        if not fresh:
            return
        try:
            rec, infos = self._forward(fresh)
        except Exception as err:  # any failure is the batch's; splitting finds its item
            if len(fresh) == 1:
                self._fail(fresh[0].item, err)
                return
            half = len(fresh) // 2
            self.batch(fresh[:half])
            self.batch(fresh[half:])
            return
        self._append(fresh, rec, infos)

    def _forward(self, batch: list[_Loaded]):
        """(the record of one forward pass over `batch`, an ExampleInfo per item)."""
        import torch

        images = [b.image for b in batch if b.image is not None]
        inputs = prepare(self.lm, [b.item.prompt or "" for b in batch], images)
        plan = self.plan
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.edits:
                from headlab.interventions import intervene

                stack.enter_context(intervene(self.lm, *self.edits))
            first = plan.compact[0] if plan.compact else None
            rec = stack.enter_context(
                capture(self.lm, stats=plan.stats, compact=first, head_outputs=plan.head_outputs)
            )
            # the probe records compact attention of one tower per block: one more block per other tower
            more = [stack.enter_context(capture(self.lm, stats=None, compact=s)) for s in plan.compact[1:]]
            self.lm.run(inputs)  # a text-only input to BLIP-2 runs its language model
        for other in more:
            rec.compact.extend(other.compact)
        return rec, self._infos(batch, example_tokens(self.lm, inputs))

    def _infos(self, batch: list[_Loaded], tokens: list) -> list[ExampleInfo]:
        """What went into the model for each item of a prepared batch (module docstring)."""
        out = []
        for b, toks in zip(batch, tokens, strict=True):
            prompt = b.item.prompt
            if prompt is not None and b.image is None:
                prompt = text_only_prompt(self.lm, prompt)
            out.append(
                ExampleInfo(
                    prompt=prompt,
                    token_ids=None if toks is None else toks[0],
                    tokens=None if toks is None else toks[1],
                    image=b.item.image_name if b.image is not None else None,
                    thumbnail=thumbnail_png(b.image) if b.image is not None else None,
                    label=b.item.meta.get("label"),
                    answer=b.item.meta.get("answer"),
                )
            )
        return out

    def _append(self, batch: list[_Loaded], rec, infos: list[ExampleInfo]) -> None:
        """Commit the batch's shard; items another writer committed meanwhile are skipped (first wins)."""
        name = self.condition.name
        items = [b.item for b in batch]
        ids = {it.id for it in items}
        if self.store.committed(name) & ids:
            self.batch(batch)  # redone without them
            return
        try:
            self.store.append(
                rec,
                examples=[it.id for it in items],
                condition=name,
                meta=[it.meta for it in items],
                info=infos,
            )
        except StoreError as err:
            if self.store.committed(name) & ids:  # committed between the check and the append
                self.batch(batch)
                return
            for item in items:
                self._fail(item, err)
            return
        self.report.done += len(items)
        self._resolved(len(items))

    def _fail(self, item: PromptItem, err: Exception) -> None:
        where = f"{item.describe()} [{self.condition.name}]" if self.tagged else item.describe()
        self.report.failed.append(f"{where}: {reason(err)}")
        self._resolved(1)

    def _resolved(self, n: int, *, skipped: bool = False) -> None:
        if skipped:
            self.report.skipped += n
        if self.bar is not None and n:
            self.bar.update(n)
