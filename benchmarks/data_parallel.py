"""Benchmark: data-parallel `headlab capture`, one process against `torchrun --nproc-per-node 2` on the CPU.

The same capture each time: a prompt file of 64 prompts (about 120-260 tokens each) into a fresh store, on a
random GPT-2 of 4 layers, 8 heads, width 256 (`zoo.random_models.build_random`), batch size 8, with the
CLI's defaults (head statistics of every head, compact attention of every layer, head outputs). Each way
runs as the user would type it, in fresh processes, and is timed from start to exit (so model loading,
process start-up and, for torchrun, the rendezvous and the final gather are included):
- `headlab capture` in one process, torch's default intra-op threads (one per core);
- the same with OMP_NUM_THREADS=1 (what each torchrun worker gets);
- `torchrun --standalone --nproc-per-node 2 -m headlab capture` (gloo; each worker 1 thread);
- and each again on the complete store (nothing left to capture: the fixed cost of starting).
`--repeats` timed runs each (default 5) after one warm-up run, interleaved; the median and the fastest run
are reported, with the speed-up of each way over one process from both (on a shared machine the fastest run
is the best estimate of what the way costs without other load), and the fastest rerun (the fixed cost).
What the cores can give is measured beside it: a one-thread torch matmul loop alone, then two at once in two
processes (on cores that share their vector units, or a host that is busy, each of the two is slower than
alone and data parallelism cannot gain much there). The machine may be shared: other load shows up as spread.

Writes JSON and Markdown to benchmarks/results/. Usage: python benchmarks/data_parallel.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPTS = 64
WORDS = ("the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "past", "red", "house", "and")


def _prompt_file(path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40 + (i * 37) % 45)]
        lines.append(json.dumps({"id": i, "prompt": " ".join(words), "label": i % 2}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _ways(model: Path, data: Path, out: Path) -> dict[str, tuple[list[str], dict]]:
    """name -> (command, extra environment)."""
    capture = ["capture", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "8"]
    headlab = [sys.executable, "-m", "headlab", *capture]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return {
        "1 process": (headlab, {}),
        "1 process, 1 thread": (headlab, {"OMP_NUM_THREADS": "1"}),
        "torchrun, 2 processes x 1 thread": ([*torchrun, "-m", "headlab", *capture], {}),
    }


def _env(extra: dict) -> dict:
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"}
    return {k: v for k, v in os.environ.items() if k not in drop} | extra


_MATMUL = (
    "import time, torch; torch.set_num_threads(1); a = torch.randn(512, 512); t = time.perf_counter()\n"
    "for _ in range(300): a @ a\n"
    "print(time.perf_counter() - t)"
)


def matmul_slowdown() -> float:
    """How much slower each of two concurrent one-thread matmul processes is than one alone (1.0: 2 cores)."""
    command = [sys.executable, "-c", _MATMUL]
    alone = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    pair = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    together = [float(p.communicate()[0]) for p in pair]
    return statistics.mean(together) / alone


def _timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
        )
    return elapsed


def measure(root: Path, repeats: int) -> list[dict]:
    """Median wall seconds of each way: a full capture into a fresh store, and a rerun on the full store."""
    from headlab.zoo.random_models import build_random

    model = build_random("gpt2", root / "model", n_layer=4, n_embd=256, n_head=8, n_positions=512)
    data = _prompt_file(root / "prompts.jsonl", PROMPTS)
    out = root / "store"
    ways = _ways(model, data, out)
    full: dict[str, list[float]] = {name: [] for name in ways}
    rerun: dict[str, list[float]] = {name: [] for name in ways}
    for attempt in range(repeats + 1):  # the first round warms the file cache and is not counted
        for name, (command, extra) in ways.items():
            shutil.rmtree(out, ignore_errors=True)
            seconds = _timed(command, _env(extra))
            again = _timed(command, _env(extra))
            if attempt:
                full[name].append(seconds)
                rerun[name].append(again)
    base, base_min = statistics.median(full["1 process"]), min(full["1 process"])
    rows = []
    for name in ways:
        median, best = statistics.median(full[name]), min(full[name])
        rows.append(
            {
                "way": name,
                "capture_s": median,
                "min_s": best,
                "max_s": max(full[name]),
                "rerun_min_s": min(rerun[name]),
                "speedup_median": base / median,
                "speedup_min": base_min / best,
                "examples_per_s": PROMPTS / best,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per way (default 5)")
    parser.add_argument("--quick", action="store_true", help="one timed run each, results not saved")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    import torch

    slowdown = [matmul_slowdown()]  # before and after: the machine's parallel capacity can change meanwhile
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), repeats)
    slowdown.append(matmul_slowdown())
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Python "
        f"{platform.python_version()}"
    )
    payload = {
        "machine": machine,
        "prompts": PROMPTS,
        "repeats": repeats,
        "matmul_slowdown_two_processes": slowdown,
        "rows": rows,
    }
    lines = render(payload)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "data_parallel.json").write_text(json.dumps(payload, indent=2) + "\n")
        (RESULTS / "data_parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def render(payload: dict) -> list[str]:
    """The Markdown of a run (data_parallel.json's payload)."""
    rows, slowdown = payload["rows"], payload["matmul_slowdown_two_processes"]
    base_work = rows[0]["min_s"] - rows[0]["rerun_min_s"]
    lines = [
        f"Machine: {payload['machine']}. {payload['prompts']} prompts (120-260 tokens), random GPT-2 (4 layers, "
        f"8 heads, width 256), batch 8, CLI defaults; {payload['repeats']} runs of each way after a warm-up, "
        "interleaved; wall time from start to exit.",
        "",
        "| way | median s | fastest s | speed-up (median) | speed-up (fastest) | examples/s (fastest) "
        "| rerun, nothing to do, fastest s | work: fastest - rerun s (speed-up) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        work = r["min_s"] - r["rerun_min_s"]
        lines.append(
            f"| {r['way']} | {r['capture_s']:.1f} | {r['min_s']:.1f} | {r['speedup_median']:.2f}x "
            f"| {r['speedup_min']:.2f}x | {r['examples_per_s']:.1f} | {r['rerun_min_s']:.1f} "
            f"| {work:.1f} ({base_work / work:.2f}x) |"
        )
    lines += [
        "",
        f"Two one-thread torch matmul processes at once: each {slowdown[0]:.2f}x (before) and "
        f"{slowdown[1]:.2f}x (after the runs) as slow as one alone (1.0 = two independent cores).",
    ]
    return lines


if __name__ == "__main__":
    main()
