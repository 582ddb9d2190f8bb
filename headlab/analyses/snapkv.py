"""SnapKV's observation window (Li et al. 2024, arXiv 2404.14469) as a head analysis. Spec: methods/longctx.md
sections 4 and 5 (official code FasterDecoding/SnapKV @e216ddc8, `snapkv/monkeypatch/snapkv_utils.py`,
`SnapKVCluster.update_kv`).

SnapKV's selection, per QUERY head (the official cache is stored after `repeat_kv`), on a prompt of N tokens:
- `window_scores`: s_h[j] = sum over the last w prompt rows i of A_h[i, j], for the prefix keys j < N - w;
  A is the softmax over all N keys (causal inside the window), in float32. headlab captures the w window
  rows only (`hl.capture(lm, patterns=Select(queries=window rows))`, O(w n) per head, never [n, n]): the
  column sums over that row subset are exactly SnapKV's `attn_weights[..., -w:, :-w].sum(-2)`.
- `pooled`: the official `F.max_pool1d` / `F.avg_pool1d(s, kernel_size=k, padding=k // 2, stride=1)`.
  torch's max_pool1d pads with -inf (padding never wins the max); avg_pool1d pads with ZEROS and, with
  the default count_include_pad=True, divides by k at the edges as well (the first and last k // 2
  entries are shrunk). headlab calls the same torch functions with the same arguments, so it matches the
  official code including those edges. Only odd k is accepted: with an even k torch returns N - w + 1
  entries and the official topk may pick index N - w, the first window token (an off-by-one of the
  official code headlab does not reproduce). Official LongBench configs: maxpool, k = 7 (the default
  here); the `SnapKVCluster` class default is avgpool, k = 5 (`pool="avg", kernel=5`).
- `kept_keys`: compression happens only if N >= capacity (C, `max_capacity_prompt`, default 2048); then
  the top C - w prefix positions by the pooled score are kept, plus the w window tokens; otherwise all N.
  Ties: torch.topk leaves their order unspecified; headlab breaks them towards the EARLIER position (a
  stable sort), so a larger capacity keeps a superset of the keys.

The head-level score is headlab's own summary built on SnapKV's selection, NOT a number from the paper.
SnapKV's observation is that the window's attention predicts which prefix keys later (generated) tokens
attend to. `hit_rates` measures it per head: the prompt (prompt ids, the last w prompt rows are the window)
is followed by a continuation (for needle probes: the gold answer, teacher-forced), and for each
continuation row (the queries that would read the compressed cache while decoding; the row that produced
the first answer token is the prefill's last row, whose attention is not compressed, and is not counted)
- `hit_rate`: the attention mass on the keys a SnapKV cache still holds: the kept prompt keys plus every
  continuation key (decoding appends without eviction); 1 when the prompt is not compressed;
- `prompt_hit_rate`: the mass on the kept prompt keys / the mass on all prompt keys (the share of the
  prompt attention that survives the selection; NaN for a row that puts no mass on the prompt);
both averaged over the continuation rows (and the probes). Window rows and continuation rows are captured
in ONE forward pass (causal attention: the window rows do not see the continuation), O((w + a) n) per head.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from headlab.analyses.longctx import _frame
from headlab.analyses.registry import Analysis, Option, store_model
from headlab.analyses.retrieval import NEEDLE_OPTIONS, _device, _tokenized, grid_from_options
from headlab.datasets.needles import NeedleProbe
from headlab.errors import InputError, SelectionError
from headlab.loading import LoadedModel
from headlab.probe.capture import capture
from headlab.probe.select import Select

WINDOW = 32  # init_snapkv default and every shipped config (the class default is 64)
CAPACITY = 2048  # max_capacity_prompt default
KERNEL, POOL = 7, "max"  # LongBench configs (ablation_c*_w32_k7_maxpool.json); class default: avg, 5


def _check(window: int, capacity: int | None = None, kernel: int | None = None, pool: str | None = None):
    if window < 1:
        raise SelectionError(f"the observation window needs at least 1 row, got window={window}")
    if capacity is not None and capacity <= window:
        raise SelectionError(
            f"capacity ({capacity}) must exceed the window ({window}): it keeps capacity - window"
        )
    if kernel is not None and (kernel < 1 or kernel % 2 == 0):
        raise SelectionError(
            f"the pooling kernel must be odd and >= 1 (stride 1, padding k // 2), got {kernel}"
        )
    if pool is not None and pool not in ("max", "avg"):
        raise SelectionError(f"pool must be 'max' or 'avg', got {pool!r}")


def _ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise InputError(f"window_scores takes one sequence, got a batch of {ids.shape[0]}")
        ids = ids[0]
    if ids.dim() != 1:
        raise InputError(f"input_ids must be [n] or [1, n], got shape {tuple(ids.shape)}")
    return ids


def _rows(lm: LoadedModel, ids: torch.Tensor, queries: list[int]) -> torch.Tensor:
    """[layer, head, len(queries), n] float32 attention rows of `queries`, captured by headlab."""
    info = lm.tower("lm")
    out = torch.zeros(info.n_layers, info.n_heads, len(queries), len(ids))
    with capture(lm, stats=None, patterns=Select(queries=queries)) as rec, torch.no_grad():
        lm.model(input_ids=ids[None].to(_device(lm)))
    for r in rec.patterns:
        out[r.layer, r.head] = r.probs.float().cpu()
    return out


def _window_sum(rows: torch.Tensor, n: int, window: int) -> torch.Tensor:
    return rows[..., : n - window].sum(-2)  # column sums over the window rows, prefix keys only


def window_scores(lm: LoadedModel, input_ids, *, window: int = WINDOW) -> torch.Tensor:
    """s [layer, head, N - window]: per query head, the attention of the last `window` prompt rows summed
    over those rows, on each prefix key j < N - window (float32; the rows are captured, O(window n))."""
    _check(window)
    ids = _ids(input_ids)
    n = len(ids)
    if n <= window:
        raise InputError(
            f"the prompt has {n} tokens; the observation window ({window}) needs a prefix before it"
        )
    return _window_sum(_rows(lm, ids, list(range(n - window, n))), n, window)


def pooled(s: torch.Tensor, kernel: int = KERNEL, pool: str = POOL) -> torch.Tensor:
    """The official pooling over the key axis (last): max_pool1d / avg_pool1d(kernel, stride 1, padding
    kernel // 2); avg counts the zero padding (count_include_pad=True), max ignores it. Same shape as s."""
    _check(1, kernel=kernel, pool=pool)
    flat = s.float().reshape(-1, 1, s.shape[-1])
    fn = F.max_pool1d if pool == "max" else F.avg_pool1d
    return fn(flat, kernel_size=kernel, padding=kernel // 2, stride=1).reshape(s.shape)


def kept_keys(
    s: torch.Tensor,
    *,
    window: int = WINDOW,
    capacity: int = CAPACITY,
    kernel: int = KERNEL,
    pool: str = POOL,
) -> torch.Tensor:
    """Bool [..., N] (N = s.shape[-1] + window): the prompt keys SnapKV keeps per head from the window
    scores s [..., N - window]. If N >= capacity: the top capacity - window prefix keys by pooled(s) (ties
    to the earlier key) and the window; else all N keys (no compression)."""
    _check(window, capacity, kernel, pool)
    prefix = s.shape[-1]
    n = prefix + window
    keep = torch.ones(*s.shape[:-1], n, dtype=torch.bool)
    if n < capacity:
        return keep
    score = pooled(s, kernel, pool)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., : capacity - window]
    keep[..., :prefix] = False
    keep[..., :prefix].scatter_(-1, order, True)
    return keep


def hit_rates(
    lm: LoadedModel,
    prompt_ids,
    continuation_ids,
    *,
    window: int = WINDOW,
    capacity: int = CAPACITY,
    kernel: int = KERNEL,
    pool: str = POOL,
) -> dict[str, torch.Tensor]:
    """Per query head [layer, head]: hit_rate and prompt_hit_rate of the continuation rows (module doc),
    plus keep [layer, head, N], the kept prompt keys, and compressed (N >= capacity)."""
    _check(window, capacity, kernel, pool)
    prompt, cont = _ids(prompt_ids), _ids(continuation_ids)
    n, a = len(prompt), len(cont)
    if n <= window:
        raise InputError(
            f"the prompt has {n} tokens; the observation window ({window}) needs a prefix before it"
        )
    if a < 1:
        raise InputError(
            "hit_rates needs a continuation (the generated or answer tokens) of at least 1 token"
        )
    ids = torch.cat([prompt, cont.to(prompt.dtype)])
    queries = list(range(n - window, n)) + list(range(n, n + a))
    rows = _rows(lm, ids, queries)
    s = _window_sum(rows[:, :, :window], n, window)
    keep = kept_keys(s, window=window, capacity=capacity, kernel=kernel, pool=pool)  # [layer, head, n]
    later = rows[:, :, window:]  # [layer, head, a, n + a]
    on_prompt = later[..., :n]
    kept_prompt = (on_prompt * keep[:, :, None, :]).sum(-1)
    hit = (kept_prompt + later[..., n:].sum(-1)).mean(-1)
    total = on_prompt.sum(-1)
    prompt_hit = torch.where(total > 0, kept_prompt / total.clamp_min(1e-30), torch.nan).nanmean(-1)
    return {"hit_rate": hit, "prompt_hit_rate": prompt_hit, "keep": keep, "compressed": n >= capacity}


def snapkv_heads(
    lm: LoadedModel,
    probes: Sequence[NeedleProbe],
    *,
    window: int = WINDOW,
    capacity: int = CAPACITY,
    kernel: int = KERNEL,
    pool: str = POOL,
) -> pd.DataFrame:
    """Per query head on needle probes (prompt = haystack + question, continuation = the gold answer,
    teacher-forced): hit_rate and prompt_hit_rate averaged over the probes, kept_fraction (kept prompt keys
    / prompt keys, mean over probes), n_compressed (probes with N >= capacity), n_probes."""
    _check(window, capacity, kernel, pool)
    if not probes:
        raise InputError(
            "snapkv_heads needs at least one needle probe (headlab.datasets.needles.needle_probes)"
        )
    hit, prompt_hit, kept, compressed = [], [], [], 0
    for probe in probes:
        p = _tokenized(lm, probe)
        got = hit_rates(lm, p.prompt, p.answer, window=window, capacity=capacity, kernel=kernel, pool=pool)
        hit.append(got["hit_rate"].numpy())
        prompt_hit.append(got["prompt_hit_rate"].numpy())
        kept.append(got["keep"].float().mean(-1).numpy())
        compressed += int(got["compressed"])
    with np.errstate(all="ignore"):
        columns = {
            "hit_rate": np.mean(hit, 0).ravel(),
            "prompt_hit_rate": np.nanmean(np.stack(prompt_hit), 0).ravel(),
            "kept_fraction": np.mean(kept, 0).ravel(),
        }
    frame = _frame(lm, columns)
    frame["n_compressed"], frame["n_probes"] = compressed, len(probes)
    frame["window"], frame["capacity"] = window, capacity
    return frame


# ------------------------------------------------------------------------------------------- analyses


def _run_snapkv(store, options: dict) -> pd.DataFrame:
    lm = store_model(store)
    return snapkv_heads(
        lm,
        grid_from_options(options),
        window=options["window"],
        capacity=options["capacity"],
        kernel=options["kernel"],
        pool=options["pool"],
    )


ANALYSES = {
    "snapkv-heads": Analysis(
        name="snapkv-heads",
        description=(
            "SnapKV observation window per query head: the keys its pooled window scores keep (top "
            "capacity - window + the window, only if the prompt has >= capacity tokens) and the share of the "
            "answer rows' attention on them (hit rate, headlab's summary); runs the model on needle probes"
        ),
        run=_run_snapkv,
        options={
            **NEEDLE_OPTIONS,
            "window": Option(type=int, default=WINDOW, ge=1, help="observation window: the last prompt rows"),
            "capacity": Option(
                type=int, default=CAPACITY, ge=2, help="max_capacity_prompt: kept keys (compress iff N >= it)"
            ),
            "kernel": Option(
                type=int, default=KERNEL, ge=1, help="pooling kernel (odd; stride 1, padding k//2)"
            ),
            "pool": Option(
                type=str, default=POOL, choices=("max", "avg"), help="maxpool (configs) or avgpool"
            ),
        },
    )
}
