"""Benchmark: the activation store's write throughput, random pattern-read latency, the cost of verified
reads, and compact size.

1. Write throughput: GPT-2-small-shaped compact attention (12 layers, 12 heads, d_head 64; post-RoPE q, k
   and the row logsumexp) plus head outputs and tidy head statistics for batches of examples, appended as
   atomic shards (checksummed, fsynced), with a CRC-32C per Zarr chunk (what headlab writes) and without
   (the format before chunk checksums), against raw `numpy.save` of the same arrays (with and without
   fsync), in MB/s of array data.
2. Pattern-read latency: stores of 1,000 and 10,000 small examples (100 examples per shard); the median
   and 95th percentile of one random exact pattern read, `store.pattern(example, layer, head)`, and the
   first read of a freshly opened store (index load and, when verified, the sha256 of the index tables).
   Three ways to read, in the same run:
   - verified: what headlab does (chunks with CRC-32C checked on every read; tables and Zarr metadata
     checked against their sha256 once per process; every shard's file list checked when it appears);
   - unverified: the same reads without any check, on a store without chunk CRCs (what reads cost before);
   - legacy verified: a store written before chunk CRCs, read by this headlab (each array's files checked
     against their sha256 when the array is first opened).
   Each way is timed 3 times, interleaved, from a cold start (fresh Store, empty verification cache); the
   tables show the median of the 3. Target: under 20 ms, independent of store size.
3. Compact attention size against dense float32 patterns at n = 1024 and 4096 (GPT-2-small shape): the
   measured bytes of the stored compact arrays against 4 * heads * n^2 dense bytes per layer.

Writes JSON and Markdown to benchmarks/results/. Usage: python benchmarks/store_io.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import headlab.store.catalog as catalog_module
import headlab.store.store as store_module
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


@contextmanager
def chunk_checksums(on: bool) -> Iterator[None]:
    """Stores written inside have a CRC-32C per chunk (on) or are in the format before chunk checksums."""
    original = store_module.ShardWriter
    store_module.ShardWriter = functools.partial(original, chunk_checksums=on)
    try:
        yield
    finally:
        store_module.ShardWriter = original


def _store_write(root: Path, recs: list[Record], *, checksums: bool) -> float:
    store = Store.create(root, _FakeLM())
    start = time.perf_counter()
    with chunk_checksums(checksums):
        for i, rec in enumerate(recs):
            store.append(rec, examples=list(range(4 * i, 4 * i + 4)))
    return time.perf_counter() - start


def bench_write(tmp: Path, n: int, batches: int) -> dict:
    recs = [synthetic_record(4, n, layers=12, heads=12, d=64, seed=i) for i in range(batches)]
    mb = sum(array_bytes(r) for r in recs) / 1e6
    t_crc = _store_write(tmp / "w_crc", recs, checksums=True)
    t_plain = _store_write(tmp / "w_plain", recs, checksums=False)
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
    stored = sum(f.stat().st_size for f in (tmp / "w_crc").rglob("*") if f.is_file()) / 1e6
    return {
        "n": n,
        "array_mb": mb,
        "store_mb_s": mb / t_crc,
        "store_no_crc_mb_s": mb / t_plain,
        "crc_write_ratio": t_crc / t_plain,
        "numpy_save_mb_s": mb / out[False],
        "numpy_save_fsync_mb_s": mb / out[True],
        "stored_mb": stored,
    }


def build_read_store(root: Path, n_examples: int, *, checksums: bool) -> Path:
    store = Store.create(root, _FakeLM())
    per_shard = 100
    with chunk_checksums(checksums):
        for s in range(n_examples // per_shard):
            rec = synthetic_record(per_shard, 64, layers=2, heads=4, d=16, seed=s)
            store.append(rec, examples=list(range(s * per_shard, (s + 1) * per_shard)))
    return store.root


def time_reads(root: Path, n_examples: int, reads: int, *, checked: bool) -> dict:
    """First read of a freshly opened store, then `reads` random pattern reads (same seed every way)."""
    fresh = Store.open(root)
    fresh._catalog.checked = checked  # False: the unverified baseline (no stat, sha256 or CRC checks)
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
        "first_read_ms": first * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "p95_ms": times[int(0.95 * len(times))] * 1e3,
    }


WAYS = {  # name -> (store written with chunk CRCs, reads checked)
    "unverified": (False, False),
    "verified": (True, True),
    "legacy_verified": (False, True),
}


def bench_read(tmp: Path, n_examples: int, reads: int, repeats: int) -> dict:
    """Each way of reading timed `repeats` times, interleaved (the machine's load drifts); per metric the
    median over repeats. Every repeat starts cold: a fresh Store and an empty verification cache."""
    roots = {
        crc: build_read_store(tmp / f"r{n_examples}_{crc}", n_examples, checksums=crc)
        for crc in (True, False)
    }
    time_reads(
        roots[False], n_examples, 20, checked=False
    )  # warm-up: page cache, lazy imports (not recorded)
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(repeats):
        for way, (crc, checked) in WAYS.items():
            catalog_module._VERIFIED.clear()
            runs[way].append(time_reads(roots[crc], n_examples, reads, checked=checked))
    out: dict = {"examples": n_examples, "repeats": repeats}
    for way, found in runs.items():
        out[way] = {k: statistics.median(r[k] for r in found) for k in found[0]}
    base = out["unverified"]
    out["ratio"] = {k: out["verified"][k] / base[k] for k in base}
    out["legacy_ratio"] = {k: out["legacy_verified"][k] / base[k] for k in base}
    return out


def bench_size(tmp: Path, n: int) -> dict:
    rec = synthetic_record(1, n, layers=1, heads=12, d=64)
    rec.head_outputs.clear()
    (tmp / f"size{n}").mkdir()
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
            bench_read(tmp, n, 50 if args.quick else 200, 2 if args.quick else 3)
            for n in ((200, 1000) if args.quick else (1000, 10000))
        ]
        sizes = [bench_size(tmp, n) for n in (1024, 4096)]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    result = {"machine": machine, "write": write, "reads": reads, "sizes": sizes}
    lines = [f"Machine: {machine}.", "", *_write_table(write), "", *_read_table(reads), ""]
    lines += [
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


def _write_table(w: dict) -> list[str]:
    return [
        "| write (MB/s of arrays) | headlab store (chunk CRC-32C) | store without chunk CRC | CRC time ratio "
        "| numpy.save | numpy.save + fsync |",
        "|---|---|---|---|---|---|",
        f"| n = {w['n']}, {w['array_mb']:.0f} MB | {w['store_mb_s']:.0f} | {w['store_no_crc_mb_s']:.0f} "
        f"| {w['crc_write_ratio']:.2f}x | {w['numpy_save_mb_s']:.0f} | {w['numpy_save_fsync_mb_s']:.0f} |",
    ]


def _read_table(reads: list[dict]) -> list[str]:
    lines = [
        "| store size | reads | first read (index load) ms | random pattern read, median ms | p95 ms |",
        "|---|---|---|---|---|",
    ]
    for r in reads:
        for way in ("unverified", "verified", "legacy_verified"):
            t = r[way]
            lines.append(
                f"| {r['examples']} examples | {way.replace('_', ' ')} | {t['first_read_ms']:.1f} "
                f"| {t['median_ms']:.2f} | {t['p95_ms']:.2f} |"
            )
        q, g = r["ratio"], r["legacy_ratio"]
        lines.append(
            f"| {r['examples']} examples | verified / unverified | {q['first_read_ms']:.2f}x "
            f"| {q['median_ms']:.2f}x | {q['p95_ms']:.2f}x |"
        )
        lines.append(
            f"| {r['examples']} examples | legacy verified / unverified | {g['first_read_ms']:.2f}x "
            f"| {g['median_ms']:.2f}x | {g['p95_ms']:.2f}x |"
        )
    return lines


if __name__ == "__main__":
    main()
