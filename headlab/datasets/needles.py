"""Long-context probes with known ground truth: needle-in-a-haystack (NIAH) and repeated random tokens.

- `needle_probes(lengths, depths, ...)`: the retrieval-head detection grid of Wu et al. 2024 (spec
  methods/longctx.md 1.2) in headlab's closed vocabulary. A haystack of filler sentences ("Mary has a red
  ball .") of `length` pieces, a needle sentence ("The secret code is v3 v17 v42 v8 .") inserted at
  int(length * depth) and walked back to just after the previous period (as the official `insert_needle`
  walks back to a period token), then the question ("Tell me the secret code . The secret code is"; "is"
  occurs nowhere else but in the needle, so the answer is one unambiguous copy).
  `real_needle` is the answer clause only ("v3 v17 v42 v8"), the span the retrieval score is counted on.
  Lengths count haystack pieces (words and punctuation), which are tokens for the zoo's word tokenizer.
  Probes are deterministic given the seed: the same (length, depth, needle) cell gives the same prompt.
- `repeated_random_tokens(length, ...)`: RazorAttention's probe (spec 3.2): `length` token ids drawn iid
  uniformly from `ids`, the block repeated `repeats` times, BOS in front (N = 1 + repeats * length).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from headlab.datasets.synthetic import COLORS, NAMES, THINGS
from headlab.errors import InputError

# the needle subjects (each asks for its own code) and the value tokens a needle's answer is made of
SUBJECTS = ("secret code", "passkey", "magic word")
VALUES = tuple(f"v{i}" for i in range(64))
_VERBS = ("has", "likes", "sees", "keeps", "wants")


@dataclass(frozen=True, kw_only=True)
class NeedleProbe:
    """One NIAH probe. `prompt` = context with the needle + " " + question; the gold answer is
    `real_needle`. `needle_at` is the piece index where the needle sentence starts in the context."""

    prompt: str
    needle: str
    question: str
    real_needle: str
    length: int  # haystack pieces before the needle was inserted
    depth: float  # requested depth in [0, 1]
    needle_at: int
    seed: int


def haystack(n_pieces: int, *, seed: int = 0) -> list[str]:
    """Filler sentences "<name> <verb> a <color> <thing> ." cut to exactly `n_pieces` pieces."""
    rng = random.Random(seed)
    pieces: list[str] = []
    while len(pieces) < n_pieces:
        pieces += [rng.choice(NAMES), rng.choice(_VERBS), "a", rng.choice(COLORS), rng.choice(THINGS), "."]
    return pieces[:n_pieces]


def needle(subject: str, values: Sequence[str]) -> tuple[str, str, str]:
    """(needle, question, real_needle) for `subject` ("secret code") and its answer `values`."""
    answer = " ".join(values)
    return (f"The {subject} is {answer} .", f"Tell me the {subject} . The {subject} is", answer)


def _insert_at(context: list[str], depth: float) -> int:
    """int(len * depth), walked back to just after the previous period (the start if there is none)."""
    at = int(len(context) * depth)
    while at > 0 and context[at - 1] != ".":
        at -= 1
    return at


def needle_probe(length: int, depth: float, *, answer_len: int = 4, seed: int = 0) -> NeedleProbe:
    """One probe: haystack of `length` pieces (seeded), needle of `answer_len` distinct value tokens."""
    if length < 0 or not 0.0 <= depth <= 1.0:
        raise InputError(f"a needle probe needs length >= 0 and depth in [0, 1]; got {length}, {depth}")
    if not 1 <= answer_len <= len(VALUES):
        raise InputError(f"answer_len must be in 1..{len(VALUES)}, got {answer_len}")
    rng = random.Random(seed)
    subject = rng.choice(SUBJECTS)
    text, question, real = needle(subject, rng.sample(VALUES, answer_len))
    context = haystack(length, seed=rng.randrange(2**31))
    at = _insert_at(context, depth)
    pieces = context[:at] + text.split() + context[at:]
    return NeedleProbe(
        prompt=" ".join(pieces) + " " + question,
        needle=text,
        question=question,
        real_needle=real,
        length=length,
        depth=depth,
        needle_at=at,
        seed=seed,
    )


def needle_probes(
    lengths: Sequence[int] = (64, 128, 192, 256),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    per_cell: int = 1,
    answer_len: int = 4,
    seed: int = 0,
) -> list[NeedleProbe]:
    """The depths x lengths grid (length-major), `per_cell` probes per cell with seeds derived from `seed`."""
    if not lengths or not depths or per_cell < 1:
        raise InputError("needle_probes needs at least one length, one depth and per_cell >= 1")
    out = []
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            for k in range(per_cell):
                cell_seed = seed * 1_000_003 + (i * len(depths) + j) * per_cell + k
                out.append(needle_probe(length, depth, answer_len=answer_len, seed=cell_seed))
    return out


@dataclass(frozen=True, kw_only=True)
class RepeatedTokens:
    """RazorAttention's probe: input_ids = [bos] + block * repeats, with len(block) == length."""

    input_ids: tuple[int, ...]
    length: int
    repeats: int


def repeated_random_tokens(
    length: int, *, ids: Sequence[int], bos_id: int, repeats: int = 4, seed: int = 0, distinct: bool = False
) -> RepeatedTokens:
    """`length` ids drawn iid uniformly from `ids` (distinct=True: without replacement, which removes the
    within-copy repeats the official probe has, spec 3.5), repeated `repeats` times, `bos_id` in front.
    The official probe: length 2500, ids range(10000, 12501), repeats 4."""
    ids = list(ids)
    if length < 1 or repeats < 2:
        raise InputError(
            f"the repeated-token probe needs length >= 1 and repeats >= 2; got {length}, {repeats}"
        )
    if distinct and length > len(ids):
        raise InputError(f"distinct=True needs at least {length} ids to draw from; got {len(ids)}")
    if not ids:
        raise InputError("the repeated-token probe needs a non-empty set of ids to draw from")
    rng = random.Random(seed)
    block = rng.sample(ids, length) if distinct else [rng.choice(ids) for _ in range(length)]
    return RepeatedTokens(input_ids=(bos_id, *(block * repeats)), length=length, repeats=repeats)
