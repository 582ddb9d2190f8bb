"""Answering runs of the LVLM benchmark reports (POPE, MME, AMBER, CHAIR): greedy answers of a vision-language
model to every question of a few question files, under each intervention condition, logged as they come.

Conditions: "none" (the plain model), "vhr" (`VHR()`, paper defaults), "var" (`VAR(tau=...)`; models
whose default VAR range 2..L-2 is empty, i.e. with at most 3 language layers, get layers (0, 1) and the
note says so) and "paint" (`PAINT()`, the official code's defaults: alpha 0.7, beta 0.3, ratio 0.25, the
layers 2..31 of 32 scaled to the model's depth; the boost only, without PAI's CFG branch). `CONDITIONS` is
the default set of a report; `KNOWN_CONDITIONS` every condition a report takes. Prompts are the model's own format around the question text (`inputs.question_prompt`).

Batches (`answer_all(batch_size=N)`): N questions are answered by one `generate` call, left-padded, each
row under its own intervention state: VHR selects each example's heads from that example alone, VAR's
rules act per row and PAINT boosts each row's last query toward its own image's tokens, so the answers are those of batch 1 up to floating-point rounding (tested equal on the
zoo LLaVA); VAR's counts are kept per row, so every answer still has its own `VarSeen`.

Rules (`answer_all`):
- answers go to the `runs.answers.AnswerLog` as they come, so a rerun skips what is there and Ctrl-C keeps
  everything answered so far (`AnswerRun.interrupted`);
- a question whose answer fails (its image does not decode, is a decompression bomb, the processor or the
  model raises) is listed in `AnswerRun.failed` (its split, condition, id and the reason) and stays
  unanswered; every other question is answered, and a rerun tries it again;
- a `Split` holds only usable questions: a question whose image path is unusable or names no file is listed
  in `missing_images` by `Split.add` and never asked; malformed records are listed in `problems`;
- `outcome` is the run's `runs.outcome.Outcome`: usable questions x conditions, how many are answered;
- under "var", what VAR saw and did for each question answered (`interventions.var.SinkCounts`: sink tokens
  and the largest sink score phi per layer, attention rows redistributed) is kept in `AnswerRun.var_seen`,
  one `VarSeen` per answer, so a report can say whether VAR changed anything (`reports.var_sinks`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from headlab.datasets.pope import PopeQuestion
from headlab.errors import InputError
from headlab.runs.answers import AnswerLog
from headlab.runs.outcome import Outcome, Progress, reason

CONDITIONS = ("none", "vhr", "var")  # a report's default conditions
KNOWN_CONDITIONS = (*CONDITIONS, "paint")


@dataclass
class Split:
    """One question file: its usable questions (the first `n`), and the records left out with the reason."""

    name: str
    path: Path
    images: Path
    questions: list[PopeQuestion]
    problems: list[str] = field(default_factory=list)  # malformed records
    missing_images: list[str] = field(default_factory=list)  # left out: image path unusable or absent

    def image_file(self, q: PopeQuestion) -> Path:
        """The image file of `q` inside the image folder (`inputs.image_path`: InputError if it leads out)."""
        from headlab.inputs import image_path

        return image_path(q.image, self.images)

    def add(self, q: PopeQuestion, where: str) -> None:
        """Keep `q` when its image file exists; else list it in `missing_images` ("where: why")."""
        try:
            path = self.image_file(q)
        except InputError as err:
            self.missing_images.append(f"{where}: {err}")
            return
        if path.is_file():
            self.questions.append(q)
        else:
            self.missing_images.append(f"{where}: image {path} does not exist")


def condition_interventions(name: str, n_layers: int, *, var_tau: float = 20.0) -> tuple[tuple, str]:
    """The interventions of a condition for a language model of `n_layers` layers, and a note on them."""
    from headlab.interventions import VAR, VHR
    from headlab.interventions.paint import PAINT, default_layers

    if name == "none":
        return (), "the plain model"
    if name == "vhr":
        return (VHR(),), "VHR(), paper defaults (alpha 2)"
    if name == "var":
        if len(range(2, n_layers - 1)) == 0:
            note = (
                f"VAR(tau={var_tau}, layers=(0, 1)): the default range 2..L-2 is empty for a "
                f"{n_layers}-layer language model, so layers 0 and 1 are used"
            )
            return (VAR(tau=var_tau, layers=(0, 1)),), note
        return (VAR(tau=var_tau),), f"VAR(tau={var_tau}), official-code defaults (layers 2..L-2)"
    if name == "paint":
        layers = default_layers(n_layers)
        return (PAINT(),), (
            f"PAINT(), official-code defaults (alpha 0.7, beta 0.3, ratio 0.25; language layers "
            f"{layers[0]}..{layers[-1]}), without PAI's CFG branch"
        )
    raise InputError(f"unknown condition {name!r}: choose from {', '.join(KNOWN_CONDITIONS)}")


@dataclass(frozen=True, kw_only=True)
class VarSeen:
    """What VAR saw and did while one question was answered (`SinkCounts`, per layer in `layers` order)."""

    split: str
    question_id: int | str
    layers: tuple[int, ...]
    prefills: int
    rows: int  # attention rows (head x query) redistributed
    width: int  # hidden size: phi <= sqrt(width)
    sinks: tuple[int, ...]  # tokens with phi > tau entering each layer (every type)
    visual_sinks: tuple[int, ...]  # image tokens among them
    max_phi: tuple[float, ...]  # largest phi entering each layer

    @classmethod
    def of(cls, split: str, question_id: int | str, layers: Sequence[int], counts) -> VarSeen:
        return cls(
            split=split,
            question_id=question_id,
            layers=tuple(layers),
            prefills=counts.prefills,
            rows=counts.rows,
            width=counts.width,
            sinks=tuple(counts.sinks.get(layer, 0) for layer in layers),
            visual_sinks=tuple(counts.visual_sinks.get(layer, 0) for layer in layers),
            max_phi=tuple(counts.max_phi.get(layer, 0.0) for layer in layers),
        )


@dataclass(frozen=True, kw_only=True)
class Failure:
    """One answer that could not be given in this run."""

    condition: str
    split: str
    question_id: int | str
    reason: str


@dataclass
class AnswerRun:
    done: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    var_seen: list[VarSeen] = field(default_factory=list)  # one per question answered under "var"

    def then(self, more: AnswerRun) -> AnswerRun:
        """This run followed by `more` (its interruption is the last word)."""
        return AnswerRun(
            self.done + more.done,
            self.skipped + more.skipped,
            self.failed + more.failed,
            more.interrupted,
            self.seconds + more.seconds,
            self.var_seen + more.var_seen,
        )

    @classmethod
    def merged(cls, runs: Sequence[AnswerRun]) -> AnswerRun:
        """One run of a data-parallel report from its ranks' runs (in rank order; the slowest's seconds)."""
        return cls(
            done=sum(r.done for r in runs),
            skipped=sum(r.skipped for r in runs),
            failed=[f for r in runs for f in r.failed],
            interrupted=any(r.interrupted for r in runs),
            seconds=max((r.seconds for r in runs), default=0.0),
            var_seen=[v for r in runs for v in r.var_seen],
        )

    def failures(self, split: str) -> dict[str, list[str]]:
        """{condition: ["question ID: reason", ...]} of one split."""
        out: dict[str, list[str]] = {}
        for f in self.failed:
            if f.split == split:
                out.setdefault(f.condition, []).append(f"question {f.question_id!r}: {f.reason}")
        return out


def generate_answers(lm, prompts: Sequence[str], images: Sequence, max_new_tokens: int) -> list[str]:
    """The greedy continuations (at most `max_new_tokens` tokens) of prompts with their images (paths or
    PIL images), generated together in one left-padded batch, as text."""
    import torch

    from headlab.inputs import prepare

    tokenizer = getattr(lm.processor, "tokenizer", None) or lm.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues every row's end
    try:
        inputs = prepare(lm, list(prompts), list(images))
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = lm.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    n = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[n:], skip_special_tokens=True).strip() for row in out]


def prompt_for(lm, question: PopeQuestion) -> str:
    """The question in `lm`'s prompt format (`headlab.inputs.question_prompt`: its family's template, else its
    processor's chat template)."""
    from headlab.inputs import question_prompt

    return question_prompt(lm, question.text)


def answer_all(
    lm,
    splits: Sequence[Split],
    conditions: Sequence[str],
    log: AnswerLog,
    *,
    max_new_tokens: int = 4,
    var_tau: float = 20.0,
    batch_size: int = 1,
    progress: Progress | None = None,
    world=None,
) -> AnswerRun:
    """Answer every question not yet in `log`, per condition and split, `batch_size` questions at a time
    (module docstring); a failing question is listed in `failed` and the others go on; Ctrl-C stops with
    `interrupted`. `world` (`runs.distributed.World`): a data-parallel rank answers only its slice of each
    split's unanswered questions (the others' are left to them)."""
    if batch_size < 1:
        raise InputError(f"the batch size must be at least 1, got {batch_size}")
    from headlab.interventions import intervene

    run, start = AnswerRun(), time.perf_counter()
    n_layers = lm.tower("lm").n_layers
    try:
        for condition in conditions:
            interventions, _ = condition_interventions(condition, n_layers, var_tau=var_tau)
            for split in splits:
                have = log.get(condition, split.name)
                todo = [q for q in split.questions if q.question_id not in have]
                run.skipped += len(split.questions) - len(todo)
                if world is not None:
                    todo = world.shard(todo, key=lambda q: q.question_id)
                if not todo:
                    continue
                tick = progress(f"{condition} / {split.name}", len(todo)) if progress else None
                scope = intervene(lm, *interventions) if interventions else contextlib.nullcontext()
                with scope as runner:
                    asking = _Asking(lm, split, condition, log, run, max_new_tokens, _var_patch(runner), tick)
                    for first in range(0, len(todo), batch_size):
                        asking.batch(todo[first : first + batch_size])
    except KeyboardInterrupt:
        run.interrupted = True
    run.seconds = time.perf_counter() - start
    return run


def _var_patch(runner):
    """The bound VAR of an intervene block (whose counts are read per question), or None."""
    from headlab.interventions.var import VARPatch

    patches = getattr(runner, "patches", ())
    return next((p for p in patches if isinstance(p, VARPatch)), None)


@dataclass
class _Asking:
    """Answering the questions of one split under one condition, a batch at a time."""

    lm: object
    split: Split
    condition: str
    log: AnswerLog
    run: AnswerRun
    tokens: int
    var: object  # the bound VARPatch, whose counts are read per batch row, or None
    tick: object  # progress callback, one call per question, or None

    def batch(self, questions: Sequence[PopeQuestion]) -> None:
        """Answer `questions` in one generate call and log each answer; a question whose image or prompt
        fails is listed alone, and a batch whose generation fails is answered again one question at a time,
        so one bad question never takes another with it."""
        from headlab.inputs import open_image

        ready = []
        for q in questions:
            try:
                ready.append((q, prompt_for(self.lm, q), open_image(self.split.image_file(q))))
            except Exception as err:  # the question's own input: listed, the others go on
                self._failed(q, err)
        if not ready:
            return
        try:
            texts = generate_answers(self.lm, [p for _, p, _ in ready], [i for _, _, i in ready], self.tokens)
        except Exception as err:  # only Ctrl-C stops the run
            self._taken_rows()  # a failed generation's counts belong to no answer
            if len(ready) == 1:
                self._failed(ready[0][0], err)
            else:
                for q, _, _ in ready:
                    self.batch([q])
            return
        rows = self._taken_rows()
        for i, ((q, _, _), text) in enumerate(zip(ready, texts, strict=True)):
            self.log.append(self.condition, self.split.name, q.question_id, text)
            self.run.done += 1
            if rows is not None:
                from headlab.interventions.var import SinkCounts

                counts = rows[i] if i < len(rows) else SinkCounts()  # a row VAR never saw: nothing counted
                self.run.var_seen.append(VarSeen.of(self.split.name, q.question_id, self.var.layers, counts))
            if self.tick:
                self.tick()

    def _taken_rows(self):
        return None if self.var is None else self.var.take_rows()

    def _failed(self, q: PopeQuestion, err: Exception) -> None:
        self.run.failed.append(
            Failure(
                condition=self.condition, split=self.split.name, question_id=q.question_id, reason=reason(err)
            )
        )
        if self.tick:
            self.tick()


def outcome(
    splits: Sequence[Split], conditions: Sequence[str], log: AnswerLog, run: AnswerRun, bad_input: int
) -> Outcome:
    """The run's `Outcome`: usable questions x conditions, how many are answered, what failed or was bad."""
    items = answered = 0
    for split in splits:
        for c in conditions:
            have = log.get(c, split.name)
            items += len(split.questions)
            answered += sum(q.question_id in have for q in split.questions)
    return Outcome(
        items=items,
        answered=answered,
        failed=len(run.failed),
        bad_input=bad_input,
        interrupted=run.interrupted,
    )
