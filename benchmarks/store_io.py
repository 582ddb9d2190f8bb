"""Benchmark: the activation store's write throughput, random pattern-read latency and compact size.

1. Write throughput: GPT-2-small-shaped compact attention (12 layers, 12 heads, d_head 64; post-RoPE q, k
   and the row logsumexp) plus head outputs and tidy head statistics for batches of examples, appended as
   atomic shards (checksummed, fsynced), against raw `numpy.save` of the same arrays (with and without
   fsync), in MB/s of array data.
2. Pattern-read latency: stores of 1,000 and 10,000 small examples (100 examples per shard); the median
   and 95th percentile of one random exact pattern read, `store.pattern(example, layer, head)`, after
   the one-off index load (also reported). Target: under 20 ms, independent of store size.
3. Compact attention size against dense float32 patterns at n = 1024 and 4096 (GPT-2-small shape): the
   measured bytes of the stored compact arrays against 4 * heads * n^2 dense bytes per layer.

Writes JSON and Markdown to benchmarks/results/. Usage: python benchmarks/store_io.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headlab.probe.record import CompactAttention, HeadOutputs, Record
from headlab.store.shard import ShardWriter
from headlab.store.store import Store
from headlab.store.write import write_arrays

RESULTS = Path(__file__).parent / "results"


class _FakeLM:
    """Just enough of a LoadedModel for a store manifest (the benchmark writes synthetic captures)."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(2, 2)
        self.model.config = type("C", (), {"to_dict": lambda self: {"model_type": "bench"}})()
        self.model_type = "bench"
        self.source = "synthetic"


def synthetic_record(n_examples: int, n: int, *, layers: int, heads: int, d: int, seed: int = 0) -> Record:
    g = torch.Generator().manual_seed(seed)
    rec = Record()
    rows = []
    for e in range(n_examples):
        rec._examples.append({"example": e, "tower": "lm", "n_tokens": n, "roles": "bos,text"})
        for layer in range(layers):
            q, k = torch.randn(heads, n, d, generator=g), torch.randn(heads, n, d, generator=g)
            lse = (
                torch.logsumexp((q @ k.transpose(1, 2)) * d**-0.5, -1)
                if n <= 256
                else torch.randn(heads, n, generator=g)
            )
            rec.compact.append(
                CompactAttention(e, "lm", layer, tuple(range(heads)), q, k, lse, d**-0.5, True, None, 1)
            )
            rec.head_outputs.append(
                HeadOutputs(
                    e, "lm", 0, layer, tuple(range(heads)), (n - 1,), torch.randn(1, heads, d, generator=g)
                )
            )
            for h in range(heads):
                rows.append((e, "lm", 0, layer, h, "entropy", "", float(h)))
    frame = pd.DataFrame(rows, columns=["example", "tower", "step", "layer", "head", "stat", "role", "value"])
    rec._stat_chunks.append({c: frame[c].to_numpy() for c in frame.columns})
    return rec


def array_bytes(rec: Record) -> int:
    return (
        sum(c.q.numel() + c.k.numel() + c.lse.numel() for c in rec.compact) * 4
        + sum(h.z.numel() for h in rec.head_outputs) * 4
    )


def bench_write(tmp: Path, n: int, batches: int) -> dict:
    recs = [synthetic_record(4, n, layers=12, heads=12, d=64, seed=i) for i in range(batches)]
    mb = sum(array_bytes(r) for r in recs) / 1e6
    store = Store.create(tmp / "w", _FakeLM())
    start = time.perf_counter()
    for i, rec in enumerate(recs):
        store.append(rec, examples=list(range(4 * i, 4 * i + 4)))
    t_store = time.perf_counter() - start
    out = {}
    for sync in (False, True):
        folder = tmp / f"npy{int(sync)}"
        folder.mkdir()
        start = time.perf_counter()
        for i, rec in enumerate(recs):
            for j, c in enumerate(rec.compact):
                for name, arr in (("q", c.q), ("k", c.k), ("lse", c.lse)):
                    path = folder / f"{i}_{j}_{name}.npy"
                    with open(path, "wb") as f:
                        np.save(f, arr.numpy())
                        if sync:
                            f.flush()
                            os.fsync(f.fileno())
        out[sync] = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in (tmp / "w").rglob("*") if f.is_file()) / 1e6
    return {
        "n": n,
        "array_mb": mb,
        "store_mb_s": mb / t_store,
        "numpy_save_mb_s": mb / out[False],
        "numpy_save_fsync_mb_s": mb / out[True],
        "stored_mb": stored,
    }


def bench_read(tmp: Path, n_examples: int, reads: int) -> dict:
    store = Store.create(tmp / f"r{n_examples}", _FakeLM())
    per_shard = 100
    for s in range(n_examples // per_shard):
        rec = synthetic_record(per_shard, 64, layers=2, heads=4, d=16, seed=s)
        store.append(rec, examples=list(range(s * per_shard, (s + 1) * per_shard)))
    fresh = Store.open(store.root)
    start = time.perf_counter()
    fresh.pattern(0, 0, 0)
    first = time.perf_counter() - start
    rng = np.random.default_rng(0)
    times = []
    for _ in range(reads):
        e, layer, head = int(rng.integers(n_examples)), int(rng.integers(2)), int(rng.integers(4))
        start = time.perf_counter()
        p = fresh.pattern(e, layer, head)
        times.append(time.perf_counter() - start)
        assert p.shape == (64, 64)
    times.sort()
    return {
        "examples": n_examples,
        "first_read_ms": first * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "p95_ms": times[int(0.95 * len(times))] * 1e3,
    }


def bench_size(tmp: Path, n: int) -> dict:
    rec = synthetic_record(1, n, layers=1, heads=12, d=64)
    rec.head_outputs.clear()
    writer = ShardWriter(tmp / f"size{n}")
    write_arrays(writer, rec, {0: 0}, "default")
    compact = sum(f.stat().st_size for f in (writer.tmp / "arrays.zarr").rglob("*") if f.is_file())
    writer.abort()
    dense = 4 * 12 * n * n
    return {"n": n, "compact_mb": compact / 1e6, "dense_mb": dense / 1e6, "ratio": dense / compact}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write = bench_write(tmp, 256 if args.quick else 1024, 2 if args.quick else 4)
        reads = [
            bench_read(tmp, n, 50 if args.quick else 200)
            for n in ((200, 1000) if args.quick else (1000, 10000))
        ]
        sizes = [bench_size(tmp, n) for n in (1024, 4096)]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    result = {"machine": machine, "write": write, "reads": reads, "sizes": sizes}
    lines = [
        f"Machine: {machine}.",
        "",
        "| write (MB/s of arrays) | headlab store (atomic, checksummed, fsynced) | numpy.save | numpy.save + fsync |",
        "|---|---|---|---|",
        f"| n = {write['n']}, {write['array_mb']:.0f} MB | {write['store_mb_s']:.0f} | {write['numpy_save_mb_s']:.0f} "
        f"| {write['numpy_save_fsync_mb_s']:.0f} |",
        "",
        "| store size | first read (index load) ms | random pattern read, median ms | p95 ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['examples']} examples | {r['first_read_ms']:.1f} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} |"
        for r in reads
    ]
    lines += [
        "",
        "| n | compact attention per layer (MB, stored) | dense float32 patterns (MB) | dense / compact |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['n']} | {s['compact_mb']:.1f} | {s['dense_mb']:.0f} | {s['ratio']:.0f}x |" for s in sizes
    ]
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "store_io.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "store_io.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
