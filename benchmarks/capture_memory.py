"""Benchmark: capturing per-head attention of every head, headlab vs the ecosystem's tools.

GPT-2-small-shaped model (12 layers, d_model 768, 12 heads; random weights, small vocabulary), batch 1,
n = 1024, 2048, 4096, on whatever machine runs it (CPU by default). Each (method, n) runs in a fresh
subprocess, so peak memory is that method's alone:

    (a) plain     plain SDPA forward (the baseline)
    (b) headlab   hl.capture(lm) with the default statistics of ALL heads (fused, O(n) memory)
        headlab_lite  the same without entropy (mass, distance, alpha): entropy needs K as extra values
    (c) hf_eager  HF `output_attentions=True` (eager attention, returns every [n, n] pattern)
    (d) tlens     TransformerLens 4 TransformerBridge.run_with_cache limited to hook_pattern
    (e) nnsight   nnsight trace saving every layer's attention weights (eager attention)

Timing drifts on a shared machine, so the sweep runs `--rounds` times with the methods interleaved; time is
the median over rounds of each child's median warm run, memory the first round's. Peak memory is the rise of the process's peak RSS over its RSS after loading the model and a 64-token
warm-up run (measured on the first run at n). Time is the median of the following warm runs. Writes JSON and a Markdown table
to benchmarks/results/. Usage: python benchmarks/capture_memory.py [--sizes 1024 2048 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("plain", "headlab", "headlab_lite", "hf_eager", "tlens", "nnsight")
RESULTS = Path(__file__).parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, model_dir: str, n: int, repeats: int) -> dict:
    """Runs in the child process: load, one cold run (memory), `repeats` warm runs (time)."""
    import torch

    import headlab as hl

    torch.manual_seed(0)
    warm_ids = torch.randint(5, 250, (1, 64))
    ids = torch.randint(5, 250, (1, n))
    eager = method in ("hf_eager", "nnsight")
    lm = hl.load(model_dir, attn_implementation="eager" if eager else "sdpa")
    if method == "tlens":
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(model_dir, tokenizer=lm.tokenizer, device="cpu")
        del lm
        names = {f"blocks.{i}.attn.hook_pattern" for i in range(12)}

        def step():
            _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in names)
            return cache
    elif method == "nnsight":
        from nnsight import NNsight

        wrapped = NNsight(lm.model)

        def step():
            saved = []
            with wrapped.trace(ids):
                for i in range(12):
                    saved.append(wrapped.transformer.h[i].attn.output[1].save())
            return saved
    elif method == "hf_eager":

        def step():
            return lm.model(ids, output_attentions=True).attentions
    elif method == "headlab":

        def step():
            with hl.capture(lm) as rec:
                lm.model(ids)
            return rec.head_stats
    else:

        def step():
            return lm.model(ids).logits

    with torch.no_grad():
        ids, real_ids = warm_ids, ids
        step()  # one-time costs (thread pools, allocator, lazy imports) out of the measurement
        ids = real_ids
        before = _rss_mb()
        start = time.perf_counter()
        out = step()
        cold = time.perf_counter() - start
        peak = _peak_mb() - before
        del out
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - start)
            del out
    return {
        "method": method,
        "n": n,
        "seconds": statistics.median(times) if times else cold,
        "cold_seconds": cold,
        "peak_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--merge", action="store_true", help="update the rows of an earlier results file")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the whole sweep")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "MODEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, model_dir, n = args.child
        print(json.dumps(run_one(method, model_dir, int(n), args.repeats)))
        return

    from headlab.zoo.random_models import build_random

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(
            build_random(
                "gpt2",
                Path(tmp) / "gpt2-small-shaped",
                n_layer=12,
                n_embd=768,
                n_head=12,
                n_positions=max(args.sizes),
            )
        )
        for n in args.sizes:
            runs: dict[str, list[dict]] = {m: [] for m in args.methods}
            for _ in range(args.rounds):
                for method in args.methods:
                    runs[method].append(_child(method, model_dir, n, args.repeats))
                    print(runs[method][-1], flush=True)
            for results in runs.values():
                ok = [r for r in results if "error" not in r]
                if not ok:
                    rows.append(results[0])
                    continue
                rows.append(
                    {
                        **ok[0],
                        "seconds": statistics.median(r["seconds"] for r in ok),
                        "seconds_all": [r["seconds"] for r in ok],
                    }
                )
    if args.merge and (RESULTS / "capture_memory.json").is_file():
        old = json.loads((RESULTS / "capture_memory.json").read_text())["rows"]
        fresh = {(r["method"], r["n"]) for r in rows}
        rows = [r for r in old if (r["method"], r["n"]) not in fresh] + rows
        rows.sort(key=lambda r: (r["n"], METHODS.index(r["method"])))
    report(rows)


def _child(method: str, model_dir: str, n: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--repeats", str(repeats), "--child", method, model_dir, str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"method": method, "n": n, "error": f"failed (exit {proc.returncode}): {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(rows: list[dict]) -> None:
    import torch

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "capture_memory.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    base = {r["n"]: r for r in rows if r["method"] == "plain" and "error" not in r}
    lines = [
        f"Machine: {machine}. GPT-2-small shape, batch 1.",
        "",
        "| n | method | time (s) | x plain | peak memory (MB) | x plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['method']} | {r['error']} | | | |")
            continue
        b = base.get(r["n"])
        tx = f"{r['seconds'] / b['seconds']:.2f}" if b else "-"
        mx = f"{r['peak_mb'] / b['peak_mb']:.2f}" if b and b["peak_mb"] > 0 else "-"
        lines.append(f"| {r['n']} | {r['method']} | {r['seconds']:.2f} | {tx} | {r['peak_mb']:.0f} | {mx} |")
    (RESULTS / "capture_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
