"""PINE's evaluation: position bias with and without PINE on headlab's synthetic tasks, the
pairwise-judge flip rate (`judge_bias`) and multi-document QA accuracy by gold slot (`multi_doc_accuracy`).
These run the model; PINE itself, the intervention, is `interventions.pine`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headlab.datasets import synthetic
from headlab.errors import InputError, SelectionError
from headlab.interventions import PINE, intervene, pine_inputs
from headlab.loading import LoadedModel


@torch.no_grad()
def last_logits(
    lm: LoadedModel, items: Sequence[tuple[str, Sequence[str], str]], *, pine: bool, batch: int = 64
):
    """[len(items), vocab] next-token logits of (prefix, segments, suffix) prompts, plain or with PINE;
    prompts with the same length and spans run as one batch."""
    built = [pine_inputs(lm.tokenizer, *item) for item in items]
    by_layout: dict[tuple, list[int]] = {}
    for i, (inputs, spans) in enumerate(built):
        by_layout.setdefault((inputs["input_ids"].shape[1], spans), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(items)
    for (_, spans), members in by_layout.items():
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            ids = torch.cat([built[i][0]["input_ids"] for i in chunk])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if pine:
                with intervene(lm, PINE(spans=spans)):
                    logits = lm.model(**inputs).logits[:, -1]
            else:
                logits = lm.model(**inputs).logits[:, -1]
            for i, row in zip(chunk, logits, strict=True):
                out[i] = row.float()
    return torch.stack(out)


_JUDGE = re.compile(
    r"(Question: .*?\?) (Response [AB]: .*?) (Response [AB]: .*?) (Which response is better.*)"
)


def judge_parts(prompt: str) -> tuple[str, list[str], str]:
    """A `synthetic.pairwise_judge` prompt as (prefix, [option A block, option B block], suffix); the
    labels stay inside their blocks and move with them."""
    match = _JUDGE.fullmatch(prompt)
    if match is None:
        raise InputError(f"not a pairwise_judge prompt (its template may have changed): {prompt!r}")
    return match[1], [match[2], match[3]], match[4]


@dataclass(frozen=True)
class JudgeBias:
    flip_rate: float  # share of examples whose verdict (the content of the chosen response) changes
    accuracy: float  # share of verdicts, over both orders, that pick the better response
    margin_shift: float  # mean |change| of the logit margin logit("A") - logit("B") between the two orders
    n: int


def judge_bias(
    lm: LoadedModel, n: int = 100, *, seed: int = 10_000, pine: bool, swap: str = "blocks"
) -> JudgeBias:
    """Position bias of the judge on `synthetic.pairwise_judge`: each prompt in two orders, as (prefix,
    [option block, option block], suffix) with the labels inside the blocks. A verdict is the label the
    model prefers as the next token ("A" or "B"), read as the content that label marks in that prompt.

    swap="blocks": the two blocks trade places with their labels ("Response B: .. Response A: .."), a pure
    permutation of the segments, so PINE's verdicts never flip. swap="contents": the contents trade places
    and the labels stay in order (the RewardBench protocol of the official eval script); the segment texts
    then differ, so PINE removes the position effect but not a preference for one label."""
    if swap not in ("blocks", "contents"):
        raise SelectionError(f"swap must be 'blocks' or 'contents', got {swap!r}")
    exs = synthetic.pairwise_judge(n, seed=seed)
    items = [judge_parts(e.prompt) for e in exs]  # the better response is option A
    if swap == "blocks":
        other = [(pre, segs[::-1], suf) for pre, segs, suf in items]
    else:
        other = [judge_parts(e.corrupted) for e in exs]  # the better response is option B
    a, b = (lm.tokenizer.convert_tokens_to_ids(t) for t in ("A", "B"))
    first, second = (last_logits(lm, x, pine=pine) for x in (items, other))
    margin, margin_other = first[:, a] - first[:, b], second[:, a] - second[:, b]
    good, good_other = margin > 0, (margin_other > 0) if swap == "blocks" else (margin_other <= 0)
    return JudgeBias(
        flip_rate=(good != good_other).float().mean().item(),
        accuracy=(good.float().mean().item() + good_other.float().mean().item()) / 2,
        margin_shift=(margin - margin_other).abs().mean().item(),
        n=n,
    )


def judge_flip_rate(lm: LoadedModel, n: int = 100, *, seed: int = 10_000, pine: bool) -> float:
    """Share of judge verdicts that change when the two labelled option blocks swap places (`judge_bias`)."""
    return judge_bias(lm, n, seed=seed, pine=pine).flip_rate


_DOC = re.compile(r"Document \[\d+\]: [^.]*\.")


def multi_doc_accuracy(lm: LoadedModel, n: int = 50, *, k: int = 4, seed: int = 10_000, pine: bool) -> dict:
    """{gold slot: top-1 accuracy} on `synthetic.multi_doc_qa` (lost in the middle) with prefix = BOS only,
    segments = the "Document [i]: ..." entries (index attached) and suffix = the question."""
    acc = {}
    for gold in range(k):
        exs = synthetic.multi_doc_qa(n, k=k, gold=gold, seed=seed)
        items = []
        for e in exs:
            docs = _DOC.findall(e.prompt)
            items.append(("", docs, e.prompt[e.prompt.index(docs[-1]) + len(docs[-1]) :].strip()))
        logits = last_logits(lm, items, pine=pine)
        want = torch.tensor([lm.tokenizer.convert_tokens_to_ids(e.answer.strip()) for e in exs])
        acc[gold] = (logits.argmax(-1) == want).float().mean().item()
    return acc
