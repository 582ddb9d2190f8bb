"""ACT's offline head search (Yu et al., ICML 2024): the calibration tasks and the keep/skip search over heads.

`search_heads` calibrates one head at a time with `interventions.act.ACT` and keeps the heads whose
calibration alone raises a task's zero-shot accuracy above the plain model's (strictly; ties are skipped),
as the official code's per-head CALIBRATION runs. `TASKS` are the calibration tasks (`ChoiceTask`: the
prediction is the candidate label with the highest last-position logit), built on `datasets.synthetic`.
The ACT intervention itself, its detection and its calibration rule, is `interventions.act`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from headlab.datasets import synthetic
from headlab.errors import InputError, SelectionError, UnsupportedModelError
from headlab.interventions import intervene
from headlab.interventions.act import ACT, BETA, TAU, Head, resolve_layers
from headlab.loading import LoadedModel


@dataclass(frozen=True)
class ChoiceTask:
    """A zero-shot classification task scored as ACT's classification eval: the prediction is the candidate
    label whose (last) token has the highest logit at the prompt's last position (argmax of the code's
    log-softmax over the label logits)."""

    name: str
    generate: Callable[[int, int], list[synthetic.Example]]  # (n, seed) -> examples
    choices: Callable[[synthetic.Example], tuple[str, ...]]  # the candidate answers, `answer` among them

    def examples(self, n: int, seed: int) -> list[synthetic.Example]:
        if n < 1:
            raise InputError(f"need at least one {self.name} example, got n={n}")
        return self.generate(n, seed)

    def accuracy(
        self, lm: LoadedModel, examples: Sequence[synthetic.Example], *, batch_size: int = 32
    ) -> float:
        return choice_accuracy(lm, examples, self.choices, batch_size=batch_size)


_COLORS = tuple(f" {c}" for c in synthetic.COLORS)

TASKS: dict[str, ChoiceTask] = {
    t.name: t
    for t in (
        ChoiceTask("colored_objects", lambda n, s: synthetic.colored_objects(n, seed=s), lambda e: _COLORS),
        ChoiceTask("multi_doc_qa", lambda n, s: synthetic.multi_doc_qa(n, k=4, seed=s), lambda e: _COLORS),
        ChoiceTask(
            "ioi", lambda n, s: synthetic.ioi(n, seed=s), lambda e: (f" {e.get('io')}", f" {e.get('s')}")
        ),
    )
}


def task(name: str) -> ChoiceTask:
    if name not in TASKS:
        raise SelectionError(f"no ACT task named {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


@torch.no_grad()
def choice_accuracy(
    lm: LoadedModel,
    examples: Sequence[synthetic.Example],
    choices: Callable[[synthetic.Example], Sequence[str]],
    *,
    batch_size: int = 32,
) -> float:
    """Share of `examples` whose answer has the highest last-position logit among `choices(example)`."""
    tokenizer = lm.tokenizer
    if tokenizer is None:
        raise UnsupportedModelError(f"{lm.model_type} has no tokenizer to score text prompts with")
    if not examples:
        raise InputError("no examples to score")
    ids: dict[str, int] = {}

    def label_id(word: str) -> int:  # the code scores a label by its last token
        if word not in ids:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise InputError(f"the label {word!r} encodes to no token")
            ids[word] = tokens[-1]
        return ids[word]

    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        enc = tokenizer([e.prompt for e in batch], return_tensors="pt", padding=True)
        logits = lm.model(**enc).logits.float()  # [b, n, vocab]
        mask = enc["attention_mask"]
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # the last real token, either padding side
        for row, ex in enumerate(batch):
            words = list(choices(ex))
            if ex.answer not in words:
                raise InputError(f"the answer {ex.answer!r} is not among the choices {words}")
            label_ids = [label_id(w) for w in words]
            if len(set(label_ids)) != len(label_ids):
                raise InputError(f"the choices {words} share a last token, so they cannot be told apart")
            pick = int(logits[row, last[row], label_ids].argmax())
            correct += words[pick] == ex.answer
    return correct / len(examples)


# ----------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class HeadSearch:
    """The result of `search_heads`: `table` has one row per candidate head (layer, head, accuracy with that
    head alone calibrated, delta against `baseline`, kept, hidden_sinks = mean hidden sinks per prompt)."""

    table: pd.DataFrame
    baseline: float
    kept: tuple[Head, ...]
    layers: tuple[int, ...]
    tau: float = TAU
    beta: float = BETA
    tower: str = "lm"

    def act(self) -> ACT:
        """ACT over the kept heads with the search's settings."""
        return ACT(heads=self.kept, layers=self.layers, tau=self.tau, beta=self.beta, tower=self.tower)


def search_heads(
    lm: LoadedModel,
    examples: Sequence,
    score_fn: Callable[[LoadedModel, Sequence], float],
    *,
    layers: Collection[int] | None = None,
    heads: Collection[int] | None = None,
    tau: float = TAU,
    beta: float = BETA,
    tower: str = "lm",
    progress: Callable[[int, int], None] | None = None,
) -> HeadSearch:
    """ACT's offline head search: calibrate one head at a time and keep the heads whose calibration alone
    raises `score_fn(lm, examples)` (an accuracy on the calibration set) above the un-calibrated baseline
    (strictly: ties are skipped), as the code's per-head CALIBRATION runs and keep/skip selection.

    layers: candidate layers (None = the code's: not the first two, not the last; a model with fewer than
    four layers needs them given, e.g. range(n_layers)). heads: head indices tried in every layer (None =
    all). progress(done, total) is called after each head.
    """
    info = lm.tower(tower)
    layer_ids = resolve_layers(info, layers)
    if not layer_ids:
        raise SelectionError(
            f"the official code's layers (not the first two, not the last) leave none of the {info.n_layers} "
            f"layers of {lm.model_type}; pass the layers to search, e.g. layers=range({info.n_layers}) "
            "(CLI: --layers all)"
        )
    head_ids = tuple(range(info.n_heads)) if heads is None else tuple(sorted({int(h) for h in heads}))
    if any(not 0 <= h < info.n_heads for h in head_ids):
        raise SelectionError(f"heads {list(head_ids)} are out of range: layers have {info.n_heads} heads")
    if not len(examples):
        raise InputError("the calibration set is empty")
    candidates = [(layer, head) for layer in layer_ids for head in head_ids]
    baseline = float(score_fn(lm, examples))
    rows = []
    for done, (layer, head) in enumerate(candidates, 1):
        act = ACT(heads=((layer, head),), layers=layer_ids, tau=tau, beta=beta, tower=tower)
        with intervene(lm, act) as runner:
            accuracy = float(score_fn(lm, examples))
        prompts, found = runner.patches[0].hidden.get((layer, head), (0, 0))
        rows.append(
            {
                "layer": layer,
                "head": head,
                "accuracy": accuracy,
                "delta": accuracy - baseline,
                "kept": accuracy > baseline,
                "hidden_sinks": found / prompts if prompts else float("nan"),
            }
        )
        if progress is not None:
            progress(done, len(candidates))
    table = pd.DataFrame(rows, columns=["layer", "head", "accuracy", "delta", "kept", "hidden_sinks"])
    kept = tuple((int(r.layer), int(r.head)) for r in table.itertuples() if r.kept)
    return HeadSearch(
        table=table, baseline=baseline, kept=kept, layers=layer_ids, tau=tau, beta=beta, tower=tower
    )
