"""KV-head roles for long context: DuoAttention's streaming vs retrieval heads and RazorAttention's echo and
induction heads. Spec: methods/longctx.md sections 2, 3 and 5.

DuoAttention (Xiao et al. 2024, mit-han-lab/duo-attention @fe93c314). The paper's gates alpha are trained by
distillation (spec 2.2); they are not an attention statistic (spec 2.5). headlab offers two criteria:
- `streaming_scores` (the attention proxy of spec 2.5, unvalidated against trained alpha): per query head,
  the mass a QA row (question + teacher-forced answer rows) puts on the streaming keys (the first `sink`
  keys and the last `recent` keys up to the query, DuoAttention's streaming mask: j < s or i - r < j <= i),
  averaged over the QA rows; distant = 1 - that. It needs the QA rows only: captured as rows by headlab
  (O(n) per row), never the [n, n] pattern. Per KV head (the official gates are per KV head, shared by the
  GQA group) the distant mass is the MAX over the group's query heads: a KV head's cache serves all of
  them, so it must stay full if any of them reads far away.
- `streaming_deviation` (the output-deviation criterion, closer to the distillation objective): per KV head,
  the relative change ||H_full - H_stream|| / ||H_full|| of the final hidden state (after the last norm,
  DuoAttention's target) at the QA rows when that KV head's query heads alone run streaming attention
  (`StreamingHeads`, the exact streaming mask; one forward pass per KV head).
Binarisation (`binarize`, official `sparsify_attention_heads`): add U(0, 1e-6) noise, tau = the
sparsity-quantile of the scores (sigma = fraction of streaming heads), retrieval iff score >= tau.

RazorAttention (Tang et al. 2024; golden-stick's MindSpore code, spec 3.2). Probe: `repeated_random_tokens`
(BOS + L random ids repeated R times, N = 1 + R L). Echo mask E: (i, i - kL) for i >= kL, k = 1..R (with
the official mask's BOS entries: row kL sees key 0); induction mask I: (i, i - kL + 1) for i >= kL.
echo_h = sum_E A / N^2, induction_h = sum_I A / N^2; per KV head the max over its query heads; pooled over
the model, the top round(0.01 x count) echo and round(0.14 x count) induction KV heads are kept, their
union is Razor's retrieval set. Computed WITHOUT the [n, n] pattern: the probe's offset
statistic (`Stats(offsets=...)`) sums A[i, i - D] over all rows, each entry rebuilt exactly from q_i . k_(i-D)
and the row logsumexp (O(n R) per head); the induction sum drops the R entries A[kL - 1, 0] (row kL - 1,
BOS), read from those rows (captured, O(n) each). Besides Razor's N^2-normalised scores the frame has
`echo` / `induction` = the same sums per repeated query (sum / (N - L)): the mean attention a token of a
later copy puts on its earlier occurrences / on the tokens after them, 1 for a perfect head; with 2 copies
of distinct tokens it is the zoo's induction score. These are the units of the atlas's rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from headlab.analyses.registry import Analysis, Option, store_model
from headlab.analyses.retrieval import NEEDLE_OPTIONS, _device, _tokenized, grid_from_options
from headlab.datasets.needles import NeedleProbe, RepeatedTokens
from headlab.errors import InputError, SelectionError
from headlab.interventions.core import AttentionCall, Intervention, Patch, intervene
from headlab.kernels.fused import fused_attention
from headlab.kernels.reference import expand_kv
from headlab.loading import LoadedModel
from headlab.probe.capture import capture
from headlab.probe.select import Select, Stats

ECHO_RATIO, INDUCTION_RATIO = 0.01, 0.14  # golden-stick ra_config defaults


# ------------------------------------------------------------------------------------- DuoAttention


def _qa(lm: LoadedModel, probe: NeedleProbe) -> tuple[torch.Tensor, list[int]]:
    """Input ids (prompt + gold answer) and the QA rows: the question's tokens and the answer rows."""
    p = _tokenized(lm, probe)
    tok = lm.tokenizer
    n_question = len(tok(probe.question, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([p.prompt + p.answer], device=_device(lm))
    start = len(p.prompt) - n_question
    return ids, list(range(start, ids.shape[1] - 1))


def streaming_mass(probs: torch.Tensor, queries: Sequence[int], *, sink: int, recent: int) -> torch.Tensor:
    """Per row of `probs` [q, k] (query positions `queries`): mass on keys j < sink or q - recent < j <= q."""
    keys = torch.arange(probs.shape[-1])[None, :]
    pos = torch.as_tensor(list(queries))[:, None]
    keep = (keys < sink) | ((keys > pos - recent) & (keys <= pos))
    return (probs.float() * keep).sum(-1)


def _check_window(sink: int, recent: int) -> None:
    if sink < 0 or recent < 1:
        raise SelectionError(f"streaming attention needs sink >= 0 and recent >= 1; got {sink}, {recent}")


def streaming_scores(
    lm: LoadedModel, probes: Sequence[NeedleProbe], *, sink: int = 4, recent: int = 16
) -> pd.DataFrame:
    """Per query head: `local_mass` (sink + recent, mean over QA rows and probes) and `distant_mass`."""
    _check_window(sink, recent)
    if not probes:
        raise InputError("streaming_scores needs at least one needle probe")
    info = lm.tower("lm")
    total = torch.zeros(info.n_layers, info.n_heads)
    for probe in probes:
        ids, rows = _qa(lm, probe)
        with capture(lm, stats=None, patterns=Select(queries=rows)) as rec, torch.no_grad():
            lm.model(input_ids=ids)
        for r in rec.patterns:
            total[r.layer, r.head] += streaming_mass(r.probs, r.queries, sink=sink, recent=recent).mean()
    local = (total / len(probes)).numpy()
    return _frame(lm, {"local_mass": local.ravel(), "distant_mass": 1.0 - local.ravel()})


def _frame(lm: LoadedModel, columns: dict) -> pd.DataFrame:
    info = lm.tower("lm")
    layer, head = np.meshgrid(range(info.n_layers), range(info.n_heads), indexing="ij")
    group = info.n_heads // info.n_kv_heads
    return pd.DataFrame(
        {
            "tower": "lm",
            "layer": layer.ravel(),
            "head": head.ravel(),
            "kv_head": head.ravel() // group,
            **columns,
        }
    )


def per_kv_head(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """(layer, kv_head, column): the max of `column` over each KV head's query heads."""
    return frame.groupby(["layer", "kv_head"], as_index=False)[column].max()


def binarize(scores: np.ndarray, *, sparsity: float, seed: int = 0) -> np.ndarray:
    """Official `sparsify_attention_heads`: scores + U(0, 1e-6) noise, tau = quantile(sparsity), keep (True =
    retrieval / full attention) iff score >= tau; `sparsity` is the fraction of streaming heads."""
    if not 0.0 <= sparsity <= 1.0:
        raise SelectionError(f"sparsity is a fraction of heads in [0, 1], got {sparsity}")
    noisy = np.asarray(scores, dtype=float) + np.random.default_rng(seed).uniform(0, 1e-6, np.shape(scores))
    return noisy >= np.quantile(noisy, sparsity)


class _StreamingPatch(Patch):
    def __init__(self, by_layer: dict[int, list[int]], sink: int, recent: int) -> None:
        self.by_layer, self.sink, self.recent = by_layer, sink, recent

    def touches(self, tower: str, layer: int) -> bool:
        return tower == "lm" and layer in self.by_layer

    def replace(self, call: AttentionCall) -> torch.Tensor:
        heads = self.by_layer[call.layer]
        out = call.plain[0].clone()
        kpos = call.ctx.key_pos.to(call.q.device)  # [b, k] example positions
        qpos = kpos[:, -call.n_q :]
        near = (kpos[:, None, :] > qpos[:, :, None] - self.recent) & (kpos[:, None, :] <= qpos[:, :, None])
        keep = ((kpos[:, None, :] < self.sink) | near) & (kpos[:, None, :] >= 0)  # [b, q, k]
        keep = keep[:, None]  # [b, 1, q, k]
        if call.mask is not None:
            keep = keep & call.mask[..., -call.n_q :, :]
        k = expand_kv(call.k, call.n_heads)[:, heads]
        v = expand_kv(call.v, call.n_heads)[:, heads]
        spec = dataclasses.replace(call.spec(), mask=keep)
        out[:, heads] = fused_attention(call.q[:, heads], k, v, spec).out.float()
        return out


@dataclass(frozen=True)
class StreamingHeads(Intervention):
    """Run query heads `heads` [(layer, head), ...] with DuoAttention's streaming attention: each query sees
    only the first `sink` keys and the last `recent` keys up to itself (exact mask; all passes)."""

    heads: tuple[tuple[int, int], ...]
    sink: int = 4
    recent: int = 16

    def bind(self, lm: LoadedModel) -> Patch:
        from headlab.analyses.retrieval import _by_layer

        _check_window(self.sink, self.recent)
        return _StreamingPatch(_by_layer(lm, self.heads), self.sink, self.recent)


@torch.no_grad()
def _final_hidden(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    return lm.model.model(input_ids=ids).last_hidden_state[0].float()  # after the final norm


def streaming_deviation(
    lm: LoadedModel, probes: Sequence[NeedleProbe], *, sink: int = 4, recent: int = 16
) -> pd.DataFrame:
    """Per KV head (layer, kv_head): `deviation` = mean over probes and QA rows of ||H_full - H_stream|| /
    ||H_full||, the final hidden state when that KV head's query heads alone run streaming attention."""
    _check_window(sink, recent)
    if not probes:
        raise InputError("streaming_deviation needs at least one needle probe")
    info = lm.tower("lm")
    group = info.n_heads // info.n_kv_heads
    dev = np.zeros((info.n_layers, info.n_kv_heads))
    for probe in probes:
        ids, rows = _qa(lm, probe)
        full = _final_hidden(lm, ids)[rows]
        for layer in range(info.n_layers):
            for kv in range(info.n_kv_heads):
                heads = tuple((layer, kv * group + g) for g in range(group))
                with intervene(lm, StreamingHeads(heads, sink=sink, recent=recent)):
                    mixed = _final_hidden(lm, ids)[rows]
                change = (full - mixed).norm(dim=-1) / full.norm(dim=-1)  # [QA row]
                dev[layer, kv] += change.mean().item() / len(probes)
    layer, kv = np.meshgrid(range(info.n_layers), range(info.n_kv_heads), indexing="ij")
    return pd.DataFrame(
        {"tower": "lm", "layer": layer.ravel(), "kv_head": kv.ravel(), "deviation": dev.ravel()}
    )


def duo_heads(
    lm: LoadedModel,
    probes: Sequence[NeedleProbe],
    *,
    sink: int = 4,
    recent: int = 16,
    sparsity: float = 0.5,
    criterion: str = "mass",
    seed: int = 0,
) -> pd.DataFrame:
    """Per query head: the KV head's score (criterion "mass": max distant mass over the group; "deviation":
    the output deviation) and `streaming` (True where binarize says not retrieval), plus distant_mass."""
    if criterion not in ("mass", "deviation"):
        raise SelectionError(f"criterion must be 'mass' or 'deviation', got {criterion!r}")
    heads = streaming_scores(lm, probes, sink=sink, recent=recent)
    if criterion == "mass":
        kv = per_kv_head(heads, "distant_mass").rename(columns={"distant_mass": "duo_score"})
    else:
        kv = streaming_deviation(lm, probes, sink=sink, recent=recent).rename(
            columns={"deviation": "duo_score"}
        )
    kv = kv[["layer", "kv_head", "duo_score"]].copy()
    kv["streaming"] = ~binarize(kv.duo_score.to_numpy(), sparsity=sparsity, seed=seed)
    return heads.merge(kv, on=["layer", "kv_head"], how="left")


# ------------------------------------------------------------------------------------- RazorAttention


def razor_scores(lm: LoadedModel, probe: RepeatedTokens) -> pd.DataFrame:
    """Per query head: echo_razor / induction_razor (sum over Razor's mask / N^2), echo / induction (the
    sums per repeated query, N - L of them), and per KV head (max over the group) the selection flags
    razor_echo, razor_induction and razor_retrieval (their union)."""
    n, block, reps = len(probe.input_ids), probe.length, probe.repeats
    limit = lm.tower("lm").max_positions
    if limit is not None and n > limit:
        raise InputError(f"the repeated-token probe has {n} tokens; {lm.model_type} takes at most {limit}")
    echo_d = tuple(k * block for k in range(1, reps + 1))  # k = R reaches BOS from the last row only
    ind_d = tuple(k * block - 1 for k in range(1, reps + 1))
    offsets = tuple(dict.fromkeys(echo_d + ind_d))
    # row kL - 1 sees key 0 (BOS) at offset kL - 1, which is not in the induction mask
    bos_rows = [k * block - 1 for k in range(1, reps + 1)]
    ids = torch.tensor([probe.input_ids], device=_device(lm))
    stats = Stats(which=(), offsets=offsets)
    with capture(lm, stats=stats, patterns=Select(queries=bos_rows)) as rec, torch.no_grad():
        lm.model(input_ids=ids)
    hs = rec.head_stats
    d = (
        hs[hs.stat == "offset"]
        .pivot_table(index=["layer", "head"], columns="role", values="value")
        .fillna(0.0)
    )
    bos = {}
    for r in rec.patterns:
        bos[(r.layer, r.head)] = float(r.probs[:, 0].sum())
    rows = float(n - block)  # the queries i >= L, each with its echo / induction entries
    frame = d.reset_index()[["layer", "head"]].copy()
    echo_sum = sum(d[f"d:{x}"] for x in echo_d).to_numpy()
    ind_sum = sum(d[f"d:{x}"] for x in ind_d).to_numpy() - np.array(
        [bos.get((int(la), int(h)), 0.0) for la, h in d.index]
    )
    frame["echo_razor"], frame["induction_razor"] = echo_sum / n**2, ind_sum / n**2
    frame["echo"], frame["induction"] = echo_sum / rows, ind_sum / rows
    info = lm.tower("lm")
    frame.insert(0, "tower", "lm")
    frame["kv_head"] = frame["head"] // (info.n_heads // info.n_kv_heads)
    for name, ratio in (("echo", ECHO_RATIO), ("induction", INDUCTION_RATIO)):
        kv = frame.groupby(["layer", "kv_head"])[f"{name}_razor"].max()
        keep = kv.sort_values(ascending=False, kind="stable").head(round(ratio * len(kv))).index
        frame[f"razor_{name}"] = [
            (la, k) in set(keep) for la, k in zip(frame.layer, frame.kv_head, strict=True)
        ]
    frame["razor_retrieval"] = frame.razor_echo | frame.razor_induction
    return frame


# ------------------------------------------------------------------------------------------- analyses


def vocabulary_ids(lm: LoadedModel) -> list[int]:
    """Every non-special token id of the model's tokenizer (the zoo's stand-in for Razor's id range)."""
    tok = lm.tokenizer
    special = set(tok.all_special_ids)
    return [i for i in range(len(tok)) if i not in special]


def _run_streaming(store, options: dict) -> pd.DataFrame:
    lm = store_model(store)
    return duo_heads(
        lm,
        grid_from_options(options),
        sink=options["sink"],
        recent=options["recent"],
        sparsity=options["sparsity"],
        criterion=options["criterion"],
        seed=options["seed"],
    )


def _run_razor(store, options: dict) -> pd.DataFrame:
    from headlab.datasets.needles import repeated_random_tokens

    lm = store_model(store)
    limit = lm.tower("lm").max_positions or 10_001
    length = options["length"] or min(2500, (limit - 1) // options["repeats"])
    ids = vocabulary_ids(lm)
    probe = repeated_random_tokens(
        length,
        ids=ids,
        bos_id=lm.tokenizer.bos_token_id,
        repeats=options["repeats"],
        seed=options["seed"],
        distinct=options["distinct"],
    )
    return razor_scores(lm, probe)


ANALYSES = {
    "streaming-heads": Analysis(
        name="streaming-heads",
        description=(
            "DuoAttention-style streaming vs retrieval KV heads: distant mass (1 - sink + recent mass) of the "
            "QA rows, or the output deviation under streaming attention, binarised by the sparsity quantile"
        ),
        run=_run_streaming,
        options={
            **NEEDLE_OPTIONS,
            "sink": Option(type=int, default=4, ge=0, help="sink tokens a streaming head keeps"),
            "recent": Option(type=int, default=16, ge=1, help="recent tokens a streaming head keeps"),
            "sparsity": Option(type=float, default=0.5, ge=0, le=1, help="fraction of streaming KV heads"),
            "criterion": Option(
                type=str,
                default="mass",
                choices=("mass", "deviation"),
                help="distant mass or output deviation",
            ),
        },
    ),
    "razor-heads": Analysis(
        name="razor-heads",
        description=(
            "RazorAttention echo and induction scores on repeated random tokens (offset masses rebuilt from "
            "the logsumexp, no [n, n] pattern), top 1% echo + 14% induction KV heads"
        ),
        run=_run_razor,
        options={
            "length": Option(
                type=int, default=None, optional=True, ge=1, help="block length L (none: min(2500, fit))"
            ),
            "repeats": Option(type=int, default=4, ge=2, help="copies of the block"),
            "seed": Option(type=int, default=0, ge=0, help="seed of the random block"),
            "distinct": Option(
                type=bool, default=False, help="draw the block without repeats (official: iid, with repeats)"
            ),
        },
    ),
}
