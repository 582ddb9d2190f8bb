"""Synthetic text tasks with known ground truth, generated from a seed.

Every generator is deterministic given its seed and returns frozen examples that carry the prompt, the
correct answer and, where the circuit literature uses one, a minimally different corrupted prompt:

- `induction`: a random token sequence repeated; from the second copy on, the next token is the one that
  followed the current token in the first copy (ground truth for induction / previous-token heads).
- `ioi`: indirect-object identification, "When Mary and John went to the store, John gave a drink to" ->
  " Mary"; ABBA and BABA templates; corrupted = the ABC variant (a third name replaces the repeated one).
- `colored_objects`: one-shot "what color is the X" over three colored objects; corrupted = the same prompt
  asking for another of the three objects (minimal difference, different answer).
- `greater_than`: "The war lasted from the year 17YY to the year 17" -> any two-digit year > YY; corrupted =
  the start year 1701 ("01"), which makes every later year right.
- `multi_doc_qa`: k documents with the gold one at a chosen slot (lost in the middle); the answer is in the
  gold document only; `gold` is the slot.
- `pairwise_judge`: a question, a good and a bad response as options A/B, and the same prompt with the options
  swapped; a position-invariant judge gives the same verdict on both (flip rate).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ("Mary", "John", "Alice", "Bob", "Tom", "Anna", "Paul", "Sara", "Mike", "Lucy", "Emma", "Jack")
PLACES = ("store", "park", "school", "office", "garden", "station")
OBJECTS = ("drink", "book", "ball", "key", "letter", "cake")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
THINGS = ("ball", "cup", "book", "pen", "hat", "box", "key", "shoe")
NOUNS = ("war", "trip", "strike", "festival", "drought", "expedition")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    corrupted: str | None = None
    corrupted_answer: str | None = None
    meta: tuple[tuple[str, object], ...] = ()

    def get(self, key: str):
        return dict(self.meta)[key]


def induction(
    n: int,
    *,
    length: int | tuple[int, int] = 12,
    vocab: int = 64,
    prefix: tuple[int, int] = (0, 0),
    seed: int = 0,
) -> list[Example]:
    """Sequences "p1 .. pP t1 .. tL t1 .. tL" of token names "w<i>" (the repeated segment's tokens are distinct,
    so each continuation is unique); answer: the continuation at a random cut inside the second copy.

    length / prefix: fixed, or (low, high) ranges drawn per example, so a model cannot copy from a fixed
    offset. meta: tokens (the full sequence), `first_copy` (L) and `start` (where the first copy begins)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = length if isinstance(length, int) else rng.randint(*length)
        lead = rng.randint(*prefix)
        seq = [f"w{i}" for i in rng.sample(range(vocab), size)]
        full = [f"w{rng.randrange(vocab)}" for _ in range(lead)] + seq + seq
        cut = rng.randrange(lead + size + 1, lead + 2 * size)  # predict full[cut] from full[:cut]
        out.append(
            Example(
                " ".join(full[:cut]),
                full[cut],
                meta=(("tokens", tuple(full)), ("first_copy", size), ("start", lead)),
            )
        )
    return out


def ioi(n: int, *, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rng.sample(NAMES, 3)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        abba = i % 2 == 0
        pair, pair_abc = ((a, b), (a, c)) if abba else ((b, a), (c, a))
        prompt = f"When {pair[0]} and {pair[1]} went to the {place}, {b} gave a {obj} to"
        corrupted = f"When {pair_abc[0]} and {pair_abc[1]} went to the {place}, {b} gave a {obj} to"
        out.append(
            Example(
                prompt,
                f" {a}",
                corrupted,
                None,
                meta=(("template", "ABBA" if abba else "BABA"), ("io", a), ("s", b)),
            )
        )
    return out


def colored_objects(n: int, *, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        things = rng.sample(THINGS, 3)
        colors = rng.sample(COLORS, 3)
        scene = ", ".join(f"{_a(c)} {t}" for c, t in zip(colors, things, strict=True))
        ask, other = rng.sample(range(3), 2)

        def prompt(k: int, scene=scene, things=things) -> str:
            return f"On the table, I see {scene}. What color is the {things[k]}? Answer:"

        out.append(
            Example(
                prompt(ask),
                f" {colors[ask]}",
                prompt(other),
                f" {colors[other]}",
                meta=(("objects", tuple(things)), ("colors", tuple(colors))),
            )
        )
    return out


def greater_than(n: int, *, seed: int = 0) -> list[Example]:
    """answer: the start year's two digits YY; a correct continuation is any two-digit year > YY."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        yy = rng.randrange(2, 98)
        noun = rng.choice(NOUNS)
        prompt = f"The {noun} lasted from the year 17{yy:02d} to the year 17"
        corrupted = f"The {noun} lasted from the year 1701 to the year 17"
        out.append(Example(prompt, f"{yy:02d}", corrupted, "01", meta=(("start", yy),)))
    return out


def multi_doc_qa(n: int, *, k: int = 5, gold: int | None = None, seed: int = 0) -> list[Example]:
    """Documents "Document [i]: <name> has a <color> <thing>."; the question asks one name's thing color.

    gold: the gold slot (0-based; None = uniformly random per example); meta `gold` holds it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        names = rng.sample(NAMES, k)
        slot = rng.randrange(k) if gold is None else gold
        thing = rng.choice(THINGS)
        colors = [rng.choice(COLORS) for _ in range(k)]
        docs = [f"Document [{i + 1}]: {names[i]} has {_a(colors[i])} {thing}." for i in range(k)]
        prompt = " ".join(docs) + f" Question: what color is the {thing} of {names[slot]}? Answer:"
        out.append(Example(prompt, f" {colors[slot]}", meta=(("gold", slot), ("k", k))))
    return out


def judge_prompt(question: str, blocks: list[tuple[str, str]]) -> str:
    """The pairwise-judge prompt: the question, then each (label, response) block, then the verdict request."""
    shown = " ".join(f"Response {label}: {text}" for label, text in blocks)
    return f"{question} {shown} Which response is better, A or B? Answer:"


def pairwise_judge(n: int, *, seed: int = 0) -> list[Example]:
    """prompt: good response as option A; corrupted: the same with the options swapped (answer flips).

    meta: `question`, `good` and `bad` (to lay the blocks out in any order with `judge_prompt`)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(range(2, 20), 2)
        good, bad = f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + rng.randrange(1, 5)}."
        question = f"Question: what is {a} + {b}?"
        out.append(
            Example(
                judge_prompt(question, [("A", good), ("B", bad)]),
                " A",
                judge_prompt(question, [("A", bad), ("B", good)]),
                " B",
                meta=(("question", question), ("good", good), ("bad", bad)),
            )
        )
    return out


TASKS = {
    "induction": induction,
    "ioi": ioi,
    "colored_objects": colored_objects,
    "greater_than": greater_than,
    "multi_doc_qa": multi_doc_qa,
    "pairwise_judge": pairwise_judge,
}
