"""Data parallelism (`runs.distributed`): the slices, `torchrun -m headlab capture`, `report pope` and
`analyze` (head sweeps) on 2 CPU processes (gloo) against one process, a killed rank resumed, and several
writers contending for one store's lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from headlab.cli import app
from headlab.runs.distributed import World, process_group, shard, world
from headlab.store import Store

N = 14  # prompts; uneven lengths, so that batches pad differently in one and in two processes


def _prompts(path: Path, n: int = N) -> Path:
    lines = [
        json.dumps({"id": f"q{i}", "prompt": "the cat sat on the mat " * (1 + i % 4), "label": i % 2})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    """The test's environment without any launcher variables (the launcher sets its own)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m headlab ARGS` (or SCRIPT ARGS); --standalone picks a free
    port for the rendezvous."""
    target = [str(script)] if script else ["-m", "headlab"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *target,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


def _capture_args(model: str, data: Path, out: Path) -> list[str]:
    return ["capture", "--model", model, "--data", str(data), "--out", str(out), "--batch-size", "3"]


def _sorted(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return frame.sort_values(by).reset_index(drop=True)


# ----- the slices and the single process ------------------------------------------------------------------
def test_slices_are_disjoint_balanced_and_stable():
    ids = [*range(50), *(f"s{i}" for i in range(25)), "1"]
    slices = [shard(ids, r, 3, key=lambda x: x) for r in range(3)]
    assert sorted(str(i) for s in slices for i in s) == sorted(map(str, ids))  # each id in exactly one slice
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    for s in slices:  # input order kept
        assert [ids.index(i) for i in s] == sorted(ids.index(i) for i in s)
    reordered = list(reversed(ids))  # the split depends on the ids, not on where they are in the file
    assert [sorted(map(str, shard(reordered, r, 3, key=lambda x: x))) for r in range(3)] == [
        sorted(map(str, s)) for s in slices
    ]
    assert (1 in slices[0]) + (1 in slices[1]) + (1 in slices[2]) == 1  # int 1 and str "1" are two items
    assert shard(ids, 0, 1, key=lambda x: x) == ids


def test_one_process_never_touches_torch_distributed(monkeypatch):
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world() == (0, 1)
    with process_group() as w:
        assert w == World() and w.main and not dist.is_initialized()
        assert w.gather({"done": 3}) == [{"done": 3}] and w.shard([1, 2]) == [1, 2]
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with process_group() as w:
        assert not w.distributed and not dist.is_initialized()


def test_bad_launcher_variables_are_one_clear_error(monkeypatch):
    from headlab.errors import InputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError, match="torchrun"):
        world()
    monkeypatch.delenv("RANK")
    with pytest.raises(InputError, match="torchrun"):  # several processes, each would think it is rank 0
        world()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="not an integer"):
        world()


# ----- torchrun on 2 CPU processes ------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_capture_equals_one_process(model_dirs, tmp_path):
    data = _prompts(tmp_path / "p.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    single = CliRunner().invoke(app, _capture_args(model_dirs["gpt2"], data, one))
    assert single.exit_code == 0, single.output
    run = _torchrun(*_capture_args(model_dirs["gpt2"], data, two))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("captured") == 1  # rank 0 prints the merged summary, once
    assert f"{N} captured, 0 already in the store, 0 bad" in run.stdout
    a, b = Store.open(one), Store.open(two)
    assert b.verify().ok and len(b.manifest["runs"]) == 2  # two writers, one store
    assert b.committed() == a.committed() == {f"q{i}" for i in range(N)}
    keys = ["example", "condition", "tower"]
    pd.testing.assert_frame_equal(_sorted(b.examples(), keys), _sorted(a.examples(), keys))
    stats_a, stats_b = a.head_stats(), b.head_stats()
    keys = [c for c in stats_a.columns if c != "value"]
    pd.testing.assert_frame_equal(_sorted(stats_b, keys), _sorted(stats_a, keys), rtol=1e-5, atol=1e-6)
    assert b.example_info("q5").tokens == a.example_info("q5").tokens
    again = _torchrun(*_capture_args(model_dirs["gpt2"], data, two))
    assert again.returncode == 0 and f"0 captured, {N} already in the store" in again.stdout


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_capture(model_dirs, tmp_path):
    """`accelerate launch --multi_gpu` is torchrun underneath; on a CPU-only host it starts the processes too."""
    data = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "s"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    extra = [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
    ]
    cmd = [
        *launcher,
        *extra,
        str(_free_port()),
        "-m",
        "headlab",
        *_capture_args(model_dirs["gpt2"], data, out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("captured") == 1 and f"{N} captured" in run.stdout
    store = Store.open(out)
    assert len(store.manifest["runs"]) == 2 and len(store.examples()) == N and store.verify().ok


@pytest.mark.slow
def test_torchrun_report_equals_one_process(tmp_path):
    """`torchrun -m headlab report pope`: each rank answers its slice into the one answer log, rank 0 writes
    the report; every answer once, and the numbers (VAR's counts included) equal one process's."""
    args = ["report", "pope", "--first", "4", "--vhd-images", "0", "--var-tau", "1", "--batch-size", "2"]
    run = _torchrun(*args, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("report: ") == 1  # rank 0 alone prints the summary
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two_report, one_report = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("two", "one"))
    assert two_report["outcome"] == one_report["outcome"] and two_report["outcome"]["answered"] == 36
    assert two_report["var"] == one_report["var"]
    for split, entry in one_report["splits"].items():
        assert two_report["splits"][split]["metrics"] == entry["metrics"]
    lines = (tmp_path / "two" / "answers.jsonl").read_text().splitlines()[1:]
    keys = [(r["condition"], r["split"], r["question_id"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) == 36  # 3 conditions x 3 splits x 4 questions, each once


@pytest.mark.slow
def test_torchrun_analyses_split_their_heads(tmp_path):
    """`torchrun -m headlab analyze`: ablation importance and activation patching sweep their heads in two
    processes; rank 0 saves a result equal to one process's."""
    import headlab as hl

    for name in ("one", "two"):
        Store.create(tmp_path / name, hl.load("zoo:lm"))
    for analysis, options in (
        ("importance-ablation", ["-o", "n=8"]),
        ("activation-patching", ["-o", "n=4", "-o", "directions=noising"]),
        ("path-patching", ["-o", "n=4", "-o", "components=q"]),
    ):
        run = _torchrun("analyze", analysis, str(tmp_path / "two"), *options)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert run.stdout.count("saved the") == 1  # rank 0 alone saves and prints
        one = CliRunner().invoke(app, ["analyze", analysis, str(tmp_path / "one"), *options])
        assert one.exit_code == 0, one.output
        got, want = (Store.open(tmp_path / d).result(analysis) for d in ("two", "one"))
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_KILLER = """
import os, signal, sys
from headlab.store.store import Store

_append, _count = Store.append, [0]

def append(self, *args, **kwargs):  # rank 1 dies (SIGKILL) right after its second commit
    out = _append(self, *args, **kwargs)
    _count[0] += 1
    if os.environ.get("RANK") == "1" and _count[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

Store.append = append
from headlab.cli import main
main()
"""


@pytest.mark.slow
def test_a_killed_rank_is_resumed_with_nothing_lost_or_twice(model_dirs, tmp_path):
    data = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "s"
    killer = tmp_path / "killer.py"
    killer.write_text(_KILLER)
    args = _capture_args(model_dirs["gpt2"], data, out)
    first = _torchrun(*args, script=killer)
    assert first.returncode != 0  # torchrun reports the dead rank
    store = Store.open(out)
    assert store.verify().ok
    done = store.committed()
    assert 2 <= len(done) < N
    again = _torchrun(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{N - len(done)} captured, {len(done)} already in the store, 0 bad" in again.stdout
    store = Store.open(out)
    assert store.verify().ok
    examples = store.examples()
    assert sorted(examples.example) == sorted(f"q{i}" for i in range(N))  # each example once
    listed = [e for s in store.shard_ids() for e in _shard_examples(out, s)]
    assert sorted(listed) == sorted(examples.example)  # no shard holds a duplicate, even shadowed


def _shard_examples(root: Path, shard_id: str) -> list:
    return json.loads((root / "shards" / shard_id / "shard.json").read_text())["examples"]


def test_a_filesystem_without_locks_is_one_clear_error(tmp_path, monkeypatch):
    import errno
    import fcntl

    from headlab.errors import StoreError
    from headlab.store.lock import locked

    def refuse(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    root = tmp_path / "s"
    root.mkdir()
    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(StoreError, match="refuses file locks"), locked(root):
        pass


# ----- lock contention: several writers append to one store at once ---------------------------------------
WRITERS, IDS = 4, 10


def _writer(model: str, root: str, order: list[int], start, results) -> None:
    """Append one shard per id of `order` (the same ids as every other writer, in another order); an id
    another writer committed first is refused (StoreError), which is what the lock guarantees."""
    import headlab as hl
    from headlab.errors import StoreError

    lm = hl.load(model)
    store = Store.open(root, lm)
    with hl.capture(lm) as rec:
        lm.model(**lm.tokenizer(["a shard of one example"], return_tensors="pt"))
    start.wait()  # every writer starts appending at the same moment
    won = []
    for ident in order:
        try:
            store.append(rec, examples=[ident], condition="default")
            won.append(ident)
        except StoreError:
            pass
    results.put(won)


@pytest.mark.slow
def test_writers_contending_for_the_lock_commit_every_shard_once(model_dirs, tmp_path, tiny):
    root = tmp_path / "s"
    Store.create(root, tiny("gpt2"))
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(WRITERS), ctx.Queue()
    orders = [[(i * 3 + w) % IDS for i in range(IDS)] for w in range(WRITERS)]  # each writer its own order
    procs = [
        ctx.Process(target=_writer, args=(model_dirs["gpt2"], str(root), order, start, results))
        for order in orders
    ]
    for p in procs:
        p.start()
    won = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(i for w in won for i in w) == list(range(IDS))  # every id committed by exactly one writer
    store = Store.open(root)
    report = store.verify()
    assert report.ok, report.problems
    assert report.shards == len(store.shard_ids()) == IDS  # one shard per id: no duplicate was committed
    assert sorted(_shard_examples(root, s)[0] for s in store.shard_ids()) == list(range(IDS))
    assert sorted(store.examples().example) == list(range(IDS))
    writers = sum(1 for w in won if w)  # a writer that committed something is noted in the manifest
    assert len({r["pid"] for r in store.manifest["runs"]}) == writers
