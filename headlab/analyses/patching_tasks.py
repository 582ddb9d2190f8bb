"""The clean/corrupted minimal pairs that circuit discovery patches between, and its one metric.

`PatchingData` is a tokenized clean/corrupted batch of one task (`PAIR_TASKS`: ioi, colored_objects,
induction; see headlab.analyses.circuits for how each corrupts its prompt); `logit_diff` is the metric,
logit(correct) - logit(counterfactual) at the last real token; `normalised` turns a patched metric into the
score (1 = the patch moves the metric the whole way from one run to the other).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from headlab.datasets import synthetic
from headlab.errors import InputError, SelectionError
from headlab.loading import LoadedModel

Pair = tuple[str, str, str, str]  # (clean prompt, corrupted prompt, correct answer, counterfactual answer)
DIRECTIONS = ("denoising", "noising")


def induction_pairs(
    n: int, *, length: tuple[int, int] = (8, 16), prefix: tuple[int, int] = (0, 4), seed: int = 0
) -> list[Pair]:
    """Clean/corrupted induction prompts (see the module docstring: the query token's first occurrence
    swapped with another first-copy token); answers: the clean continuation and the one after the swap."""
    rng = random.Random(seed + 1)
    pairs = []
    for ex in synthetic.induction(n, length=length, prefix=prefix, seed=seed):
        size, lead = ex.get("first_copy"), ex.get("start")
        clean = ex.prompt.split()
        j = len(clean) - lead - size  # the answer is t_j; the prompt ends with the query token t_(j-1)
        m = rng.choice([i for i in range(size - 1) if i not in (j - 1, j)])
        corrupted = list(clean)
        a, b = lead + j - 1, lead + m
        corrupted[a], corrupted[b] = corrupted[b], corrupted[a]
        pairs.append((" ".join(clean), " ".join(corrupted), ex.answer, corrupted[b + 1]))
    return pairs


def _ioi_pairs(n: int, seed: int) -> list[Pair]:
    pairs = []
    for e in synthetic.ioi(n, seed=seed):
        io, s = e.get("io"), e.get("s")
        flipped = e.prompt.replace(f", {s} gave", f", {io} gave")  # S2 -> IO: the answer becomes S
        if flipped == e.prompt:
            raise InputError(f"cannot find the subject's second mention in the IOI prompt {e.prompt!r}")
        pairs.append((e.prompt, flipped, e.answer, f" {s}"))
    return pairs


def _colored_pairs(n: int, seed: int) -> list[Pair]:
    exs = synthetic.colored_objects(n, seed=seed)
    return [(e.prompt, e.corrupted, e.answer, e.corrupted_answer) for e in exs]


PAIR_TASKS: dict[str, Callable[[int, int], list[Pair]]] = {
    "ioi": _ioi_pairs,
    "colored_objects": _colored_pairs,
    "induction": lambda n, seed: induction_pairs(n, seed=seed),
}


@dataclass(frozen=True, kw_only=True)
class PatchingData:
    """A tokenized clean/corrupted batch: inputs {input_ids, attention_mask} [b, n] of identical shape and
    mask; `correct`, `wrong` [b] answer token ids; `last` [b] the index of each row's last real token."""

    task: str
    clean: dict
    corrupted: dict
    correct: torch.Tensor
    wrong: torch.Tensor
    last: torch.Tensor


def _answer_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"the answer {word!r} tokenizes to nothing")
    return ids[0]  # the next-token target is the answer's first token


def patching_data(lm: LoadedModel, task: str, n: int = 32, seed: int = 0) -> PatchingData:
    """`n` clean/corrupted pairs of `task` (a key of PAIR_TASKS), tokenized for `lm`."""
    if task not in PAIR_TASKS:
        raise SelectionError(f"no patching task named {task!r}; choose one of {sorted(PAIR_TASKS)}")
    if n < 1:
        raise InputError(f"need at least one {task} example, got n={n}")
    pairs = PAIR_TASKS[task](n, seed)
    tok = lm.tokenizer
    clean = dict(tok([p[0] for p in pairs], return_tensors="pt", padding=True))
    corrupted = dict(tok([p[1] for p in pairs], return_tensors="pt", padding=True))
    if clean["input_ids"].shape != corrupted["input_ids"].shape or not torch.equal(
        clean["attention_mask"], corrupted["attention_mask"]
    ):
        raise InputError(
            f"{task}: clean and corrupted prompts tokenize to different lengths; patching needs minimal "
            "pairs of the same length (one token per changed word)"
        )
    correct = torch.tensor([_answer_id(tok, p[2]) for p in pairs])
    wrong = torch.tensor([_answer_id(tok, p[3]) for p in pairs])
    if bool((correct == wrong).any()):
        raise InputError(f"{task}: some pairs have the same correct and counterfactual answer token")
    mask = clean["attention_mask"]
    last = (mask * torch.arange(mask.shape[1])).argmax(1)  # the last real token, whichever side pads
    return PatchingData(task=task, clean=clean, corrupted=corrupted, correct=correct, wrong=wrong, last=last)


def logit_diff(logits: torch.Tensor, data: PatchingData) -> torch.Tensor:
    """Mean over the batch of logit(correct) - logit(counterfactual) at the last real token (a scalar)."""
    rows = torch.arange(logits.shape[0])
    final = logits[rows, data.last]  # [b, vocab]
    return (final[rows, data.correct] - final[rows, data.wrong]).mean()


def normalised(patched: float, clean: float, corrupted: float, direction: str) -> float:
    """The patching score: denoising (patched - corrupted) / (clean - corrupted); noising
    (patched - clean) / (corrupted - clean). 1 = the patch moves the metric the whole way."""
    if direction not in DIRECTIONS:
        raise SelectionError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if abs(clean - corrupted) < 1e-6:
        raise InputError(
            f"clean and corrupted logit differences coincide ({clean:.4g}); the task gives the model no "
            "signal to patch"
        )
    if direction == "denoising":
        return (patched - corrupted) / (clean - corrupted)
    return (patched - clean) / (corrupted - clean)
