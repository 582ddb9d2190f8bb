"""Retrieval heads (Wu et al. 2024, arXiv 2404.15574): the retrieval score, the masking experiment and NIAH
accuracy. Spec: methods/longctx.md section 1 (official code nightdessert/Retrieval_Head @3ac171a6).

Retrieval score, exactly as `retrieval_head_detection.py` defines it (spec 1.3), per query head:
- per probe, [a, b) = `needle_span`: the first window of len(real_needle ids) prompt tokens whose token SET
  overlaps the real_needle token set by more than 0.9 (`find_needle_idx`);
- greedy decoding; the decode row that PRODUCES token w_t (the prefill's last prompt row for w_1, then the
  row of w_(t-1)) has its argmax key j*_t; a copy-paste event is a <= j*_t < b and w_t == prompt[j*_t];
- R(p) = events / (b - a) (events, not a set recall: a token copied twice counts twice);
- the score is the mean of R(p) over SUCCESSFUL probes only: ROUGE-1 recall(real_needle, answer) > 0.5
  (`rouge1_recall`, on tokens); a head with no successful probe has NaN.
What it needs: one attention row per decode step per head, captured by headlab (`hl.capture(...,
patterns=Select(queries=[-1]))` while generating), O(n) memory per row, never the [n, n] pattern; the argmax
is taken in float32. `teacher_forced=True` is the prefill VARIANT of spec 5: the gold answer is appended, the
rows p = len(prompt) - 1 .. are captured in one pass and tested against the gold token x_(p+1); success is
ROUGE-1 recall of the rows' argmax predictions. It equals the original when the greedy answer is the gold.

Masking (spec 1.4): `RetrievalMask` sets the selected query heads' query to 0 after RoPE (uniform attention
over the cached keys, the head outputs the mean of the values) during DECODING only, as the official code;
`kind="zero"` (zero ablation of the head output) and `decode_only=False` are switches. `random_heads`
draws the control: the official `construct_random_head` never excludes retrieval heads (it compares tuples
against a list of lists, spec 1.6); headlab's control excludes them (`official=True` reproduces the bug).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from headlab.analyses.registry import Analysis, Option
from headlab.datasets.needles import NeedleProbe
from headlab.errors import InputError, SelectionError
from headlab.interventions.core import AttentionCall, Intervention, Patch, intervene
from headlab.kernels.fused import fused_attention
from headlab.loading import LoadedModel
from headlab.probe.capture import capture
from headlab.probe.select import Select

Head = tuple[int, int]  # (layer, query head)
RETRIEVAL_THRESHOLD = 0.1  # paper: a retrieval head has score > 0.1 (spec 1.3; the code only ranks)
SUCCESS_ROUGE = 0.5  # official: ROUGE-1 recall x 100 > 50
SPAN_OVERLAP = 0.9  # official find_needle_idx: token-set overlap > 0.9


# ------------------------------------------------------------------------------------------- text metrics


def rouge1_recall(reference: Sequence, candidate: Sequence) -> float:
    """ROUGE-1 recall on tokens: sum over unigrams w of min(#w in reference, #w in candidate) / len(reference)
    (clipped unigram overlap, as rouge_score's rouge1 recall on its own word tokens; here the units are
    whatever is given: token ids or words). 0 for an empty reference."""
    if not reference:
        return 0.0
    ref, cand = Counter(reference), Counter(candidate)
    return sum(min(n, cand[w]) for w, n in ref.items()) / len(reference)


def needle_span(prompt_ids: Sequence[int], needle_ids: Sequence[int], *, overlap: float = SPAN_OVERLAP):
    """[a, b) of the first window of len(needle_ids) prompt tokens whose token set overlaps the needle's
    token set by more than `overlap` (official `find_needle_idx`); InputError if none does."""
    want = set(needle_ids)
    n = len(needle_ids)
    if not n:
        raise InputError("the real_needle tokenizes to nothing; give a non-empty real_needle")
    for a in range(len(prompt_ids) - n + 1):
        if len(set(prompt_ids[a : a + n]) & want) / len(want) > overlap:
            return a, a + n
    raise InputError(
        f"the real_needle ({n} tokens) is not in the prompt (no window overlaps its tokens by > {overlap}); "
        "check that the prompt contains the needle and that both are tokenized by the model's tokenizer"
    )


# --------------------------------------------------------------------------------------------- masking


class _MaskPatch(Patch):
    def __init__(self, by_layer: dict[int, list[int]], kind: str, decode_only: bool) -> None:
        self.by_layer, self.kind, self.decode_only = by_layer, kind, decode_only

    def touches(self, tower: str, layer: int) -> bool:
        return tower == "lm" and layer in self.by_layer

    def replace(self, call: AttentionCall) -> torch.Tensor | None:
        # decode_only: the official code prefills prompt[:-1] unmasked and feeds the last prompt token as the
        # first (masked) decode step; with causal attention that is the prefill with only its last row masked
        rows = slice(call.n_q - 1, call.n_q) if self.decode_only and call.step == 0 else slice(None)
        heads = self.by_layer[call.layer]
        if self.kind == "zero":
            out = call.plain[0].clone()
            out[:, heads, rows] = 0.0
            return out
        q = call.q.clone()
        q[:, heads, rows] = 0.0  # scores 0 (soft-cap keeps 0): uniform over the keys the mask lets it see
        return fused_attention(q, call.k, call.v, call.spec()).out.float()


@dataclass(frozen=True)
class RetrievalMask(Intervention):
    """Mask query heads `heads` [(layer, head), ...] as Wu et al. do: kind "uniform" (query := 0 after RoPE,
    uniform attention, output = mean of the visible values) or "zero" (head output 0); decode_only (the
    paper's setting): the prompt is left alone except its last token, which the official code feeds as the
    first decode step (so the first answer token is produced masked, as there)."""

    heads: tuple[Head, ...]
    kind: str = "uniform"
    decode_only: bool = True

    def bind(self, lm: LoadedModel) -> Patch:
        if self.kind not in ("uniform", "zero"):
            raise SelectionError(f"RetrievalMask kind must be 'uniform' or 'zero', got {self.kind!r}")
        return _MaskPatch(_by_layer(lm, self.heads), self.kind, self.decode_only)


def _by_layer(lm: LoadedModel, heads) -> dict[int, list[int]]:
    info = lm.tower("lm")
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < info.n_layers and 0 <= head < info.n_heads):
            raise SelectionError(
                f"head ({layer}, {head}) is out of range: the model has {info.n_layers} layers x {info.n_heads} heads"
            )
        out.setdefault(int(layer), []).append(int(head))
    return out


# ------------------------------------------------------------------------------------------ generation


def _tokenizer(lm: LoadedModel):
    tok = getattr(lm.processor, "tokenizer", None) if lm.processor is not None else None
    tok = tok or lm.tokenizer
    if tok is None:
        raise InputError(f"{lm.model_type} has no tokenizer; retrieval probes are text")
    return tok


def _device(lm: LoadedModel) -> torch.device:
    return next(lm.model.parameters()).device


@dataclass(frozen=True)
class _Probe:
    """A needle probe tokenized: prompt ids, gold answer ids, the needle span and the stop ids."""

    prompt: list[int]
    answer: list[int]
    span: tuple[int, int]


def _tokenized(lm: LoadedModel, probe: NeedleProbe) -> _Probe:
    tok = _tokenizer(lm)
    prompt = tok(probe.prompt)["input_ids"]
    answer = tok(probe.real_needle, add_special_tokens=False)["input_ids"]
    limit = lm.tower("lm").max_positions
    if limit is not None and len(prompt) + len(answer) + 2 > limit:
        raise InputError(
            f"a needle probe has {len(prompt)} prompt tokens but {lm.model_type} was trained on at most {limit}; "
            "use shorter lengths in needle_probes"
        )
    return _Probe(prompt, answer, needle_span(prompt, answer))


def _stop_ids(lm: LoadedModel, stop: Sequence[str]) -> set[int]:
    tok = _tokenizer(lm)
    ids = {tok.convert_tokens_to_ids(s) for s in stop}
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def _cut(generated: list[int], stops: set[int]) -> list[int]:
    """The generated ids up to and including the first stop token."""
    for i, t in enumerate(generated):
        if t in stops:
            return generated[: i + 1]
    return generated


@torch.no_grad()
def _generate(lm: LoadedModel, p: _Probe, max_new: int) -> list[int]:
    ids = torch.tensor([p.prompt], device=_device(lm))
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=_tokenizer(lm).pad_token_id,
    )
    return out[0, len(p.prompt) :].tolist()


def _answer_text(ids: Sequence[int], stops: set[int]) -> list[int]:
    return [t for t in ids if t not in stops]


def niah_scores(
    lm: LoadedModel,
    probes: Sequence[NeedleProbe],
    *,
    mask: Sequence[Head] = (),
    kind: str = "uniform",
    decode_only: bool = True,
    stop: Sequence[str] = (".",),
    extra_tokens: int = 2,
) -> dict[str, float]:
    """Mean NIAH scores of greedy answers, with query heads `mask` masked (RetrievalMask): "rouge" = ROUGE-1
    recall of real_needle in the answer (the paper's metric / 100), "exact" = the answer starts with the
    real_needle's tokens. Answers stop at a `stop` token or after len(real_needle) + extra_tokens tokens."""
    if not probes:
        raise InputError("niah_accuracy needs at least one probe (headlab.datasets.needles.needle_probes)")
    stops = _stop_ids(lm, stop)
    rouge, exact = [], []
    for probe in probes:
        p = _tokenized(lm, probe)
        if mask:
            with intervene(lm, RetrievalMask(tuple(mask), kind=kind, decode_only=decode_only)):
                got = _generate(lm, p, len(p.answer) + extra_tokens)
        else:
            got = _generate(lm, p, len(p.answer) + extra_tokens)
        answer = _answer_text(_cut(got, stops), stops)
        rouge.append(rouge1_recall(p.answer, answer))
        exact.append(float(answer[: len(p.answer)] == p.answer))
    return {"rouge": float(np.mean(rouge)), "exact": float(np.mean(exact))}


def niah_accuracy(lm: LoadedModel, probes: Sequence[NeedleProbe], *, metric: str = "rouge", **kw) -> float:
    """One of `niah_scores` ("rouge" or "exact"); the other keywords as there."""
    if metric not in ("rouge", "exact"):
        raise SelectionError(f"metric must be 'rouge' or 'exact', got {metric!r}")
    return niah_scores(lm, probes, **kw)[metric]


# ------------------------------------------------------------------------------------- retrieval score


def _decode_rows(lm: LoadedModel, p: _Probe, max_new: int, stops: set[int]):
    """(emitted ids, argmax key per row [row, layer, head]) of a greedy decode, the row that produced each
    emitted token captured by headlab (O(n) per row)."""
    info = lm.tower("lm")
    with capture(lm, stats=None, patterns=Select(queries=[-1])) as rec:
        got = _generate(lm, p, max_new)
    got = _cut(got, stops)
    argmax = torch.full((len(got), info.n_layers, info.n_heads), -1, dtype=torch.long)
    for rows in rec.patterns:
        if rows.step < len(got):  # step s's row produced emitted token s
            argmax[rows.step, rows.layer, rows.head] = rows.probs[-1].float().argmax()
    return got, argmax


def _forced_rows(lm: LoadedModel, p: _Probe):
    """Teacher-forced variant: (gold ids, argmax key per row [row, layer, head], argmax predictions)."""
    info = lm.tower("lm")
    ids = torch.tensor([p.prompt + p.answer], device=_device(lm))
    rows = list(range(len(p.prompt) - 1, len(p.prompt) + len(p.answer) - 1))
    with capture(lm, stats=None, patterns=Select(queries=rows)) as rec, torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0]
    argmax = torch.full((len(rows), info.n_layers, info.n_heads), -1, dtype=torch.long)
    for r in rec.patterns:
        argmax[:, r.layer, r.head] = r.probs.float().argmax(-1)
    return p.answer, argmax, logits[rows].argmax(-1).tolist()


def probe_retrieval(
    lm: LoadedModel, probe: NeedleProbe, *, teacher_forced: bool = False, stop=(".",), extra_tokens: int = 2
) -> tuple[np.ndarray, bool, float]:
    """([layer, head] R(p) = copy-paste events / (b - a), success, ROUGE-1 recall) of one probe."""
    p = _tokenized(lm, probe)
    stops = _stop_ids(lm, stop)
    a, b = p.span
    if teacher_forced:
        emitted, argmax, predicted = _forced_rows(lm, p)
        recall = rouge1_recall(p.answer, predicted)
    else:
        emitted, argmax = _decode_rows(lm, p, len(p.answer) + extra_tokens, stops)
        recall = rouge1_recall(p.answer, _answer_text(emitted, stops))
    prompt = torch.tensor(p.prompt)
    in_span = (argmax >= a) & (argmax < b)  # [row, layer, head]
    copied = prompt[argmax.clamp(0, len(p.prompt) - 1)] == torch.tensor(emitted)[:, None, None]
    events = (in_span & copied).sum(0).numpy()
    return events / (b - a), recall > SUCCESS_ROUGE, recall


def retrieval_scores(
    lm: LoadedModel, probes: Sequence[NeedleProbe], *, teacher_forced: bool = False, stop=(".",)
) -> pd.DataFrame:
    """Per query head: retrieval_score (mean R(p) over successful probes; NaN if none), n_success, n_probes,
    and is_retrieval (score > 0.1, the paper's threshold)."""
    if not probes:
        raise InputError("retrieval_scores needs at least one probe (headlab.datasets.needles.needle_probes)")
    per_probe, ok = [], 0
    for probe in probes:
        r, success, _ = probe_retrieval(lm, probe, teacher_forced=teacher_forced, stop=stop)
        if success:
            per_probe.append(r)
            ok += 1
    info = lm.tower("lm")
    mean = np.mean(per_probe, 0) if per_probe else np.full((info.n_layers, info.n_heads), np.nan)
    layer, head = np.meshgrid(range(info.n_layers), range(info.n_heads), indexing="ij")
    frame = pd.DataFrame(
        {
            "tower": "lm",
            "layer": layer.ravel(),
            "head": head.ravel(),
            "retrieval_score": mean.ravel(),
            "n_success": ok,
            "n_probes": len(probes),
        }
    )
    frame["is_retrieval"] = frame.retrieval_score > RETRIEVAL_THRESHOLD
    return frame


def top_heads(scores: pd.DataFrame, k: int) -> list[Head]:
    """The k query heads with the highest retrieval_score (ties by (layer, head)); NaN scores never."""
    ranked = scores.dropna(subset=["retrieval_score"]).sort_values(
        ["retrieval_score", "layer", "head"], ascending=[False, True, True]
    )
    return [(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples()]


def random_heads(
    scores: pd.DataFrame,
    k: int,
    *,
    seed: int = 0,
    exclude_top: int | None = None,
    threshold: float = RETRIEVAL_THRESHOLD,
    official: bool = False,
) -> list[Head]:
    """k random query heads for the control. headlab's control draws among NON-retrieval heads: it excludes
    heads with score > `threshold` and the top `exclude_top` heads (default k: the masked set). official=True
    reproduces `construct_random_head`: any head may be drawn (its exclusion never matches, spec 1.6)."""
    every = [(int(la), int(h)) for la, h in zip(scores.layer, scores["head"], strict=True)]
    if official:
        pool = every
    else:
        banned = set(top_heads(scores, k if exclude_top is None else exclude_top))
        banned |= {
            (int(r.layer), int(r.head)) for r in scores[scores.retrieval_score > threshold].itertuples()
        }
        pool = [h for h in every if h not in banned]
    if k > len(pool):
        raise SelectionError(
            f"cannot draw {k} random heads from {len(pool)} non-retrieval heads; lower k or the exclusions"
        )
    return sorted(random.Random(seed).sample(pool, k))


# ------------------------------------------------------------------------------------------- analyses


def grid_from_options(options: dict) -> list[NeedleProbe]:
    """The needle grid an analysis entry asks for: `lengths` and `depths` as comma-separated text."""
    from headlab.datasets.needles import needle_probes

    def numbers(key: str, cast):
        try:
            values = [cast(x) for x in str(options[key]).split(",") if x.strip()]
        except ValueError:
            values = []
        if not values:
            raise SelectionError(f"option {key}={options[key]!r} is not a comma-separated list of numbers")
        return values

    return needle_probes(
        numbers("lengths", int), numbers("depths", float), per_cell=options["per_cell"], seed=options["seed"]
    )


def _run_retrieval(store, options: dict) -> pd.DataFrame:
    from headlab.analyses.registry import store_model

    lm = store_model(store)
    return retrieval_scores(lm, grid_from_options(options), teacher_forced=options["teacher_forced"])


NEEDLE_OPTIONS = {
    "lengths": Option(type=str, default="64,128,192,256", help="haystack lengths (pieces), comma-separated"),
    "depths": Option(type=str, default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1], comma-separated"),
    "per_cell": Option(type=int, default=2, ge=1, help="probes per (length, depth) cell"),
    "seed": Option(type=int, default=0, ge=0, help="seed of the needle probes"),
}

ANALYSES = {
    "retrieval-heads": Analysis(
        name="retrieval-heads",
        description=(
            "Wu et al. 2024 retrieval score per head (copy-paste events / needle span on greedy decode rows, "
            "mean over probes with ROUGE-1 recall > 0.5); runs the model on needle-in-a-haystack probes"
        ),
        run=_run_retrieval,
        options={
            **NEEDLE_OPTIONS,
            "teacher_forced": Option(
                type=bool, default=False, help="prefill variant: teacher-force the gold answer (spec 5)"
            ),
        },
    )
}
