"""Benchmark: headlab's Triton fused attention (statistics capture and patched attention) against torch
SDPA's flash kernel, compiled FlexAttention and naive eager attention, one attention call (no model).

Shape: Llama-7B attention, batch 1, 32 query heads of dim 128, bf16, causal (square: n queries over n
keys), n = 4k, 8k, 16k, 32k; two variants: MHA (32 kv heads) and GQA (8 kv heads). The token roles follow
a LLaVA prompt: BOS, a system prompt (32 tokens), an image span (576 tokens), then text; PINE's documents
are 4 equal segments of the text between that prefix and a 64-token question at the end.

Configurations (each guarded: an error or OOM is recorded as the row's result and the sweep goes on):

    (a) sdpa_flash   F.scaled_dot_product_attention(is_causal=True) under
                     sdpa_kernel(SDPBackend.FLASH_ATTENTION): the baseline. GQA through enable_gqa=True
                     (if the flash kernel refuses it, k/v are expanded once outside the timing; the row's
                     note says which).
    (b) hl_stats     statistics capture through the Triton kernel: causal, key_class = the 4 token roles
                     (BOS / system / image / text, [1, 1, n]), entropy, 1-D distance moments
                     (query_pos = key_pos = arange(n)). Target <= 1.25x sdpa_flash.
    (c) hl_patch     patched attention through the Triton kernel, the combination an LVLM study stacks:
                     VHR's head_scale (8 of the 32 heads x 1.5), PINE's segments (the 4 text documents
                     see each other bidirectionally) and an additive per-key bias [1, 1, 1, n] (+log 2 on
                     the image span's keys, a PAI-style visual-attention boost). Target <= 1.3x.
        hl_groups    group redistribution through the Triton kernel: causal, key_class with 3 atoms
                     (0 = BOS sink, 1 = visual sinks (every 32nd image token), 2 = the other image keys,
                     -1 = the rest) and class_outputs=True, the masses and per-group outputs ACT and VAR
                     edit. Target <= 1.3x.
    (d) flex_causal  torch.compile(flex_attention) with a causal BlockMask;
        flex_patch   the same with hl_patch's edits: the bias as a score_mod, causal | cross-document as
                     the mask_mod of a BlockMask (create_block_mask, built once outside the timing; its
                     build time is the row's setup_s), head_scale as a multiply of the output.
    (e) naive        eager softmax(Q K^T + causal mask) V as HF's eager attention does it (bf16 scores, fp32
                     softmax, k/v repeated for GQA); n <= --naive-max (8k) only, to show the n^2 memory.
        hl_flex_*    opt-in (name them in --configs): hl_stats / hl_patch / hl_groups' specs through
                     headlab's own flex backend, fused_attention(..., backend="flex"). Not in the default
                     GPU sweep because its compile behaviour is not this script's to budget.

Measured: time = median of --repeats (10) runs timed with CUDA events, after 2 warm-up runs (Triton JIT and
torch.compile happen there); memory = torch.cuda.max_memory_allocated during one call minus what was
allocated before it (q, k, v, the spec's tensors and the BlockMask are inputs), minus the bytes of `out`:
"extra MB" is workspace + returned statistics (lse included), "stats MB" the returned statistics alone.
Ratios are against sdpa_flash at the same n and kv heads. At n <= 4096 every output is also checked against
fused_attention(..., backend="reference") (the explicit oracle; max error / max |reference|).

Writes benchmarks/results/fused_attention.{json,md} (rewritten after every n, so a run cut short keeps what
it measured), with the device name and torch/triton versions. Budget: the default sweep is meant to finish
well inside 10 minutes on an H100; --budget (450 s) skips the configurations still to run once it is spent.

--quick: a correctness smoke test of every configuration, tiny shapes (4 heads, 2 kv heads for GQA, d 16,
n = 64, 128; fp32 on the CPU, bf16 on CUDA), 1 warm-up and 1 timed run, every output checked against the
reference, nothing written. Without CUDA the Triton kernel runs under TRITON_INTERPRET=1 (set below before
headlab imports triton), "sdpa_flash" is torch's default CPU SDPA, flex runs eager and times are perf_counter.
Without CUDA and without --quick the script says the numbers are meant for a GPU, runs the quick smoke test
instead (CPU numbers of an interpreted Triton kernel would mean nothing). The quick run exits 0 when every
configuration ran and matched the reference, 1 otherwise (so it can gate a test run).

Usage: python benchmarks/fused_attention.py [--quick] [--sizes 4096 8192 16384 32768] [--repeats 10]
       [--variants mha gqa] [--configs sdpa_flash hl_stats ...] [--naive-max 8192] [--budget 450]
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton reads this when headlab's kernel is decorated, at import time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch.nn.functional as F

from headlab.kernels.fused import fused_attention
from headlab.kernels.spec import Attended, Distance, FusedSpec

RESULTS = Path(__file__).parent / "results"
NAME = "fused_attention"
CONFIGS = (
    "sdpa_flash",
    "hl_stats",
    "hl_patch",
    "hl_groups",
    "flex_causal",
    "flex_patch",
    "naive",
    "hl_flex_stats",
    "hl_flex_patch",
    "hl_flex_groups",
)
DEFAULT_CONFIGS = CONFIGS[:7]
TARGETS = {"hl_stats": 1.25, "hl_patch": 1.3, "hl_groups": 1.3}
SECTION = {
    "sdpa_flash": "(a)",
    "hl_stats": "(b)",
    "hl_patch": "(c)",
    "hl_groups": "(c)",
    "flex_causal": "(d)",
    "flex_patch": "(d)",
    "naive": "(e)",
}
CHECK_MAX_N = 4096  # outputs are checked against the explicit reference up to this n


# ------------------------------------------------------------------------------------------- inputs


@dataclass
class Case:
    """Inputs of one (n, variant): q, k, v and the prompt layout every configuration derives from."""

    n: int
    heads: int
    kv_heads: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    roles: torch.Tensor  # [n] 0 BOS, 1 system, 2 image, 3 text
    segments: torch.Tensor  # [n] 0 outside the documents, 1..4 PINE's documents
    groups: torch.Tensor  # [n] 0 BOS sink, 1 visual sinks, 2 other image keys, -1 the rest
    key_bias: torch.Tensor  # [n] fp32, +log 2 on image keys
    head_scale: torch.Tensor  # [heads] fp32
    specs: dict[str, FusedSpec] = field(default_factory=dict)
    refs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.q.shape[-1])


def layout(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(roles, segments, groups) of a LLaVA-like prompt of n tokens (shrunk proportionally for tiny n)."""
    system = min(32, max(1, n // 16))
    image = min(576, n // 4)
    suffix = min(64, max(1, n // 16))
    roles = torch.full((n,), 3, dtype=torch.int32)
    roles[0] = 0
    roles[1 : 1 + system] = 1
    roles[1 + system : 1 + system + image] = 2
    prefix = 1 + system + image
    segments = torch.zeros(n, dtype=torch.int32)
    edges = torch.linspace(prefix, n - suffix, 5).long().tolist()
    for i, (a, b) in enumerate(pairwise(edges)):
        segments[a:b] = i + 1
    groups = torch.full((n,), -1, dtype=torch.int32)
    groups[0] = 0
    groups[1 + system : prefix] = 2
    groups[1 + system : prefix : 32] = 1
    return roles, segments, groups


def make_case(n: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype, device: torch.device) -> Case:
    g = torch.Generator(device=device).manual_seed(n * 100 + kv_heads)
    q, k, v = (
        torch.randn(1, h, n, d, generator=g, device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads)
    )
    roles, segments, groups = (x.to(device) for x in layout(n))
    key_bias = torch.where(roles == 2, math.log(2.0), 0.0).float()
    head_scale = torch.ones(heads, device=device)
    head_scale[:: max(2, heads // 8)] = 1.5  # VHR: 8 "vision-aware" heads of 32 amplified
    case = Case(n, heads, kv_heads, q, k, v, roles, segments, groups, key_bias, head_scale)
    pos = torch.arange(n, device=device, dtype=torch.float32)[None]
    case.specs = {
        "causal": FusedSpec(scale=case.scale, causal=True),
        "stats": FusedSpec(
            scale=case.scale,
            causal=True,
            key_class=roles[None, None],
            n_classes=4,
            entropy=True,
            distance=Distance(query_pos=pos, key_pos=pos),
        ),
        "patch": FusedSpec(
            scale=case.scale,
            causal=True,
            segments=(segments[None], segments[None]),
            bias=key_bias[None, None, None],
            head_scale=head_scale,
        ),
        "groups": FusedSpec(
            scale=case.scale, causal=True, key_class=groups[None, None], n_classes=3, class_outputs=True
        ),
    }
    return case


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


# ------------------------------------------------------------------------------------ configurations


def build(name: str, case: Case, cuda: bool):
    """(fn, reference spec key, note) of configuration `name`; fn() runs one attention call and returns a
    Tensor (the output) or an Attended."""
    q, k, v = case.q, case.k, case.v
    gqa = case.kv_heads != case.heads
    if name == "sdpa_flash":
        fn, note = build_sdpa(case, cuda)
        return fn, "causal", note
    if name.startswith("hl_"):
        backend = "flex" if name.startswith("hl_flex_") else "triton"
        spec = case.specs[name.rsplit("_", 1)[1]]
        key = name.rsplit("_", 1)[1]
        return (lambda: fused_attention(q, k, v, spec, backend=backend)), key, f"backend={backend}"
    if name.startswith("flex_"):
        return build_flex(name, case, cuda)
    if name == "naive":
        keep_not = ~torch.ones(case.n, case.n, dtype=torch.bool, device=q.device).tril()

        def naive():
            kk, vv = repeat_kv(k, case.heads), repeat_kv(v, case.heads)
            s = torch.matmul(q, kk.transpose(-1, -2)) * case.scale
            s = s.masked_fill(keep_not, float("-inf"))
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(p, vv)

        return naive, "causal", "k/v repeated per call" if gqa else ""
    raise ValueError(f"unknown configuration {name!r}")


def build_sdpa(case: Case, cuda: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = case.q, case.k, case.v

    def call(kk, vv, gqa):
        if cuda:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(
                    q, kk, vv, is_causal=True, scale=case.scale, enable_gqa=gqa
                )
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=case.scale, enable_gqa=gqa)

    backend = "flash" if cuda else "torch default (CPU)"
    if case.kv_heads == case.heads:
        return (lambda: call(k, v, False)), backend
    try:
        call(k, v, True)
        return (lambda: call(k, v, True)), f"{backend}, enable_gqa=True"
    except RuntimeError as e:  # the flash kernel refused GQA: expand k/v once, outside the timing
        kk, vv = repeat_kv(k, case.heads), repeat_kv(v, case.heads)
        why = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
        return (lambda: call(kk, vv, False)), f"{backend}, k/v expanded outside timing (enable_gqa: {why})"


_FLEX = None


def flex_fn(cuda: bool):
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    return _FLEX


def build_flex(name: str, case: Case, cuda: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = case.q, case.k, case.v
    gqa = case.kv_heads != case.heads
    flex = flex_fn(cuda)
    n, device = case.n, q.device
    if name == "flex_causal":

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, None, None, n, n, device=device)
        return (
            (lambda: flex(q, k, v, block_mask=block_mask, scale=case.scale, enable_gqa=gqa)),
            "causal",
            "compiled" if cuda else "eager",
        )
    if name == "flex_patch":
        seg, key_bias = case.segments, case.key_bias
        head_scale = case.head_scale.to(q.dtype)[None, :, None, None]

        def pine(b, h, q_idx, kv_idx):
            sq, sk = seg[q_idx], seg[kv_idx]
            return (q_idx >= kv_idx) | ((sq > 0) & (sk > 0) & (sq != sk))

        def bias(score, b, h, q_idx, kv_idx):
            return score + key_bias[kv_idx]

        block_mask = create_block_mask(pine, None, None, n, n, device=device)

        def patched():
            out = flex(q, k, v, score_mod=bias, block_mask=block_mask, scale=case.scale, enable_gqa=gqa)
            return out * head_scale

        return patched, "patch", ("compiled" if cuda else "eager") + ", head_scale as an output multiply"
    raise ValueError(f"unknown configuration {name!r}")


# ------------------------------------------------------------------------------------------ measuring


def fields(res) -> dict[str, torch.Tensor]:
    if isinstance(res, Attended):
        names = ("out", "lse", "class_mass", "class_out", "entropy", "distance")
        return {f: getattr(res, f) for f in names if getattr(res, f) is not None}
    return {"out": res}


def max_error(res: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per field: max |res - ref| / max(max |ref|, 1), over the fields both have."""
    errors = {}
    for f, x in res.items():
        if f not in ref:
            continue
        r = ref[f].float()
        x = x.float()
        finite = torch.isfinite(r)
        if not torch.equal(finite, torch.isfinite(x)):
            errors[f] = float("inf")
            continue
        diff = (x - r).abs()[finite]
        scale = max(float(r[finite].abs().max()) if finite.any() else 0.0, 1.0)
        errors[f] = float(diff.max()) / scale if diff.numel() else 0.0
    return errors


def reference(case: Case, key: str) -> dict[str, torch.Tensor]:
    if key not in case.refs:
        case.refs[key] = fields(fused_attention(case.q, case.k, case.v, case.specs[key], backend="reference"))
    return case.refs[key]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(fn, *, cuda: bool, warmup: int, repeats: int):
    """(median seconds, all seconds, peak extra bytes, result of the memory run)."""
    res = None
    for _ in range(warmup):
        res = fn()
    if cuda:
        del res
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        res = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:  # no memory statistics: the last warm-up's result serves the check
        res, peak = res if res is not None else fn(), None
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), times, peak, res


def run_config(
    name: str, case: Case, *, cuda: bool, warmup: int, repeats: int, check: bool, tol: float
) -> dict:
    row = {"n": case.n, "kv_heads": case.kv_heads, "config": name}
    try:
        t = time.perf_counter()
        fn, ref_key, note = build(name, case, cuda)
        row["setup_s"] = time.perf_counter() - t
        row["note"] = note
        t = time.perf_counter()
        seconds, all_seconds, peak, res = measure(fn, cuda=cuda, warmup=warmup, repeats=repeats)
        row["wall_s"] = time.perf_counter() - t  # warm-up (compiles) + memory run + timed runs
        row["seconds"] = seconds
        row["seconds_all"] = all_seconds
        got = fields(res)
        del res
        stats_bytes = nbytes(x for f, x in got.items() if f != "out")
        row["stats_mb"] = stats_bytes / 2**20
        if peak is not None:
            row["extra_mb"] = (peak - nbytes([got["out"]])) / 2**20
        if check:
            errors = max_error(got, reference(case, ref_key))
            row["max_error"] = errors
            row["check"] = "ok" if all(e <= tol for e in errors.values()) else f"FAILED (tol {tol:g})"
        del got
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # one configuration failing (flex compile, missing backend, ...) ends only its row
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {first[:200]}"
    finally:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------- reporting


def with_ratios(rows: list[dict]) -> list[dict]:
    base = {
        (r["n"], r["kv_heads"]): r["seconds"] for r in rows if r["config"] == "sdpa_flash" and "seconds" in r
    }
    for r in rows:
        b = base.get((r["n"], r["kv_heads"]))
        if b and "seconds" in r:
            r["x_sdpa"] = r["seconds"] / b
            if r["config"] in TARGETS:
                r["target"] = TARGETS[r["config"]]
                r["met"] = r["x_sdpa"] <= TARGETS[r["config"]]
    return rows


def line(r: dict) -> str:
    head = f"n={r['n']} kv={r['kv_heads']} {r['config']}"
    if "error" in r:
        return f"{head}: {r['error']}"
    text = f"{head}: {r['seconds'] * 1e3:.3f} ms"
    if "x_sdpa" in r:
        text += f" ({r['x_sdpa']:.2f}x sdpa)"
    if "extra_mb" in r:
        text += f", extra {r['extra_mb']:.1f} MB"
    if "check" in r:
        worst = max(r["max_error"].values(), default=0.0)
        text += f", check {r['check']} (max err {worst:.1e})"
    return text + (f" [{r['note']}]" if r.get("note") else "")


def environment(cuda: bool, dtype: torch.dtype, heads: int, d: int) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "not installed"
    return {
        "device": torch.cuda.get_device_name() if cuda else "CPU (TRITON_INTERPRET=1)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": f"batch 1, {heads} query heads, head dim {d}, causal, n queries over n keys",
    }


def write(rows: list[dict], env: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}.",
        f"Llama-7B attention: {env['shape']}, {env['dtype']}; kv heads per row (32 = MHA, 8 = GQA).",
        f"Time: median of {env['repeats']} CUDA-event timed runs after {env['warmup']} warm-up runs.",
        "Extra memory: peak allocated during the call beyond q, k, v, the spec's tensors and out (workspace",
        "+ returned statistics; stats MB: the returned statistics alone, lse included).",
        "",
        "| n | kv heads | config | time (ms) | x SDPA flash | target | extra MB | stats MB | check | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = f"{SECTION.get(r['config'], '')} {r['config']}".strip()
        if "error" in r:
            lines.append(
                f"| {r['n']} | {r['kv_heads']} | {cfg} | {r['error']} | | | | | | {r.get('note', '')} |"
            )
            continue
        ratio = f"{r['x_sdpa']:.2f}x" if "x_sdpa" in r else "-"
        target = f"<= {r['target']}x {'met' if r['met'] else 'MISSED'}" if "target" in r else ""
        extra = f"{r['extra_mb']:.0f}" if "extra_mb" in r else "-"
        check = r.get("check", "")
        if check:
            check += f" ({max(r['max_error'].values(), default=0.0):.0e})"
        lines.append(
            f"| {r['n']} | {r['kv_heads']} | {cfg} | {r['seconds'] * 1e3:.2f} | {ratio} | {target} | {extra} "
            f"| {r['stats_mb']:.1f} | {check} | {r.get('note', '')} |"
        )
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, every output checked, nothing written"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="n (default 4096 8192 16384 32768; quick: 64 128)"
    )
    parser.add_argument("--repeats", type=int, help="timed runs per configuration (default 10; quick: 1)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 2; quick: 1)")
    parser.add_argument("--variants", nargs="+", choices=("mha", "gqa"), default=["mha", "gqa"])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, help="default: all but the hl_flex_* ones")
    parser.add_argument("--naive-max", type=int, default=8192, help="largest n of the naive configuration")
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds; later configurations are skipped"
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print(
            "No CUDA device: this benchmark's numbers are meant for a GPU (here the Triton kernel would run "
            "in the interpreter). Running the --quick smoke test instead; nothing is written.",
            flush=True,
        )
        args.quick = True
    quick = args.quick
    device = torch.device("cuda" if cuda else "cpu")
    heads, kv_heads, d = (4, 2, 16) if quick else (32, 8, 128)
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = args.sizes or ([64, 128] if quick else [4096, 8192, 16384, 32768])
    repeats = args.repeats or (1 if quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    configs = args.configs or (list(CONFIGS) if quick else list(DEFAULT_CONFIGS))
    if "sdpa_flash" not in configs:
        configs.insert(0, "sdpa_flash")  # the baseline every ratio needs
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-3
    if cuda:  # one torch.compile of flex_attention per (configuration, n, variant): more than the default 8
        import torch._dynamo.config as dynamo_config

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 256)

    env = environment(cuda, dtype, heads, d) | {"repeats": repeats, "warmup": warmup}
    print(
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}; {env['shape']}, {env['dtype']}",
        flush=True,
    )
    start, rows, failed = time.perf_counter(), [], []
    for n in sizes:
        for variant in args.variants:
            case = make_case(n, heads, heads if variant == "mha" else kv_heads, d, dtype, device)
            for name in configs:
                if name == "naive" and n > args.naive_max and not quick:
                    continue
                if not quick and time.perf_counter() - start > args.budget:
                    row = {
                        "n": n,
                        "kv_heads": case.kv_heads,
                        "config": name,
                        "error": "skipped (over --budget)",
                    }
                else:
                    check = quick or n <= CHECK_MAX_N
                    row = run_config(
                        name, case, cuda=cuda, warmup=warmup, repeats=repeats, check=check, tol=tol
                    )
                rows.append(row)
                with_ratios(rows)
                print(line(row), flush=True)
                if quick and (row.get("check", "ok") != "ok" or "error" in row):
                    failed.append(line(row))
            del case
        if not quick:
            write(rows, env)
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)
    if quick:
        if failed:
            print(f"{len(failed)} configuration(s) failed or mismatched the reference:", *failed, sep="\n  ")
            return 1
        print("quick: every configuration ran and matched the reference")
        return 0
    print((RESULTS / f"{NAME}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
