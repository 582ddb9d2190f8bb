"""The activation store: round trip, lazy exact patterns, conditions, crash safety (SIGKILL), concurrent
writers, verification of corrupted files, model and schema checks, and the resumable CLI capture."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import eager_attentions, inputs_for
from PIL import Image
from typer.testing import CliRunner

import headlab as hl
from headlab.cli import app
from headlab.store import ExampleInfo, Store

SELECT = dict(
    compact=hl.Select(),
    head_outputs=hl.Select(queries=[-1]),
    patterns=hl.Select(layers=[1], heads=[2], queries=[-1]),
    residuals=hl.Select(queries=[0]),
)


def _record(lm, inputs, **kwargs):
    with torch.no_grad(), hl.capture(lm, **{**SELECT, **kwargs}) as rec:
        lm.model(**inputs)
    return rec


@pytest.fixture()
def llama_store(tiny, tmp_path):
    lm = tiny("llama")
    inputs = inputs_for(lm, padding_side="left")
    rec = _record(lm, inputs)
    store = Store.create(tmp_path / "store", lm)
    store.append(rec, examples=[10, 11], meta=[{"prompt": "a"}, {"prompt": "b"}])
    return lm, inputs, rec, store


def test_round_trip(llama_store):
    lm, _, rec, store = llama_store
    assert store.committed() == {10, 11}
    stats = store.head_stats(stat="entropy", layers=[1])
    assert set(stats.example) == {10, 11} and set(stats.layer) == {1} and set(stats.stat) == {"entropy"}
    want = rec.head_stats.query("stat == 'entropy' and layer == 1").value.to_numpy()
    np.testing.assert_allclose(np.sort(stats.value.to_numpy()), np.sort(want), rtol=1e-6)
    ex = store.examples()
    assert json.loads(ex[ex.example == 11].meta.iloc[0]) == {"prompt": "b"}
    index, z = store.head_outputs(0, position="last")
    assert z.shape == (2, lm.n_heads, lm.head_dim) and list(index.example) == [10, 11]
    torch.testing.assert_close(torch.from_numpy(z[1]), rec.z(0)[1, 0])
    assert set(store.residuals().position) == {0}


def test_stored_patterns_are_exact(llama_store):
    lm, inputs, rec, store = llama_store
    eager = eager_attentions(lm, inputs)
    valid = inputs["attention_mask"].bool()
    for example, b in ((10, 0), (11, 1)):
        for layer in range(2):
            for head in range(lm.n_heads):
                want = eager[layer][b, head][valid[b]][:, valid[b]].numpy()
                np.testing.assert_allclose(store.pattern(example, layer, head), want, atol=1e-5)
    compact = next(c for c in rec.compact if (c.example, c.layer) == (1, 1))
    np.testing.assert_allclose(compact.rows(3).numpy(), store.pattern(11, 1, 3), atol=1e-6)
    last = store.pattern(11, 1, 2, queries=[-1])
    np.testing.assert_allclose(last, rec.pattern(1, 1, 2).probs.numpy(), atol=1e-6)


def test_conditions_side_by_side(tiny, tmp_path):
    lm = tiny("gpt2")
    store = Store.create(tmp_path / "s", lm)
    for condition, prompt in (("with", "a red square"), ("without", "a blue circle")):
        rec = _record(lm, lm.tokenizer([prompt], return_tensors="pt"))
        store.append(rec, examples=[7], condition=condition)
    assert store.conditions() == ["with", "without"]
    stats = store.head_stats(stat="entropy")
    wide = stats.pivot_table(index=["example", "layer", "head"], columns="condition", values="value")
    assert wide.shape == (2 * 4, 2) and not wide.isna().any().any()
    for condition in ("with", "without"):
        np.testing.assert_allclose(store.pattern(7, 0, 0, condition=condition).sum(-1), 1.0, rtol=1e-5)


def test_verify_reports_truncated_and_corrupted_files(llama_store):
    store = llama_store[3]
    assert store.verify().ok
    shard = store.root / "shards" / store.shard_ids()[0]
    table = shard / "head_stats.parquet"
    table.write_bytes(table.read_bytes()[:100])
    chunk = next(p for p in (shard / "arrays.zarr").rglob("*") if p.is_file() and "c" in p.parts)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = store.verify()
    assert not report.ok
    assert any("head_stats.parquet" in p and "truncated" in p for p in report.problems)
    assert any(chunk.name in p and "checksum" in p for p in report.problems)
    result = CliRunner().invoke(app, ["store", "verify", str(store.root)])
    assert result.exit_code == 1 and "head_stats.parquet" in result.output
    with pytest.raises(hl.StoreError, match=r"head_stats\.parquet"):
        Store.open(store.root).head_stats()


def test_other_model_and_newer_schema_are_clear_errors(llama_store, tiny):
    store = llama_store[3]
    with pytest.raises(hl.StoreError, match="another model"):
        Store.open(store.root, tiny("qwen2"))
    assert Store.open(store.root, tiny("qwen2"), allow_model_mismatch=True).committed() == {10, 11}
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(hl.StoreError, match="newer"):
        Store.open(store.root)
    with pytest.raises(hl.StoreError, match="not a headlab store"):
        Store.open(store.root / "shards")


def test_nothing_is_pickled(llama_store):
    root = llama_store[3].root
    for path in root.rglob("*"):
        if path.is_file():
            assert b"\x80\x04\x95" not in path.read_bytes()[:64], path  # no pickle stream anywhere
    shard = root / "shards" / llama_store[3].shard_ids()[0]
    group = zarr.open_group(shard / "arrays.zarr", mode="r")
    arrays = [m for _, m in group.members(max_depth=None) if isinstance(m, zarr.Array)]
    assert len(arrays) >= 3  # head outputs, compact attention, selected rows
    for array in arrays:
        assert np.issubdtype(array.dtype, np.number)


def _prompts(path: Path, n: int, bad: bool = False) -> Path:
    lines = [json.dumps({"id": i, "prompt": f"example number {i} is here", "label": i % 2}) for i in range(n)]
    if bad:
        lines.insert(3, "{not json")
        lines.insert(5, json.dumps({"id": 999}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "headlab.cli", *args]


def _capture_args(model: str, data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    """`headlab capture` arguments (without the program name)."""
    return [
        "capture",
        "--model",
        model,
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
        *extra,
    ]


def test_cli_capture_reports_bad_lines_and_resumes(model_dirs, tmp_path):
    data = _prompts(tmp_path / "p.jsonl", 6, bad=True)
    args = _capture_args(model_dirs["gpt2"], data, tmp_path / "s", 2)
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output  # 1: some lines bad, the others in the store
    assert "6 captured" in first.output and "2 bad" in first.output
    assert "p.jsonl:4: not valid JSON" in first.output and "p.jsonl:6: no prompt" in first.output
    again = CliRunner().invoke(app, args)
    assert "0 captured, 6 already in the store" in again.output
    assert Store.open(tmp_path / "s").committed() == set(range(6))


@pytest.mark.slow
def test_sigkill_mid_run_loses_only_the_open_shard(model_dirs, tmp_path):
    data = _prompts(tmp_path / "p.jsonl", 60)
    out = tmp_path / "s"
    args = _cli(*_capture_args(model_dirs["gpt2"], data, out, 1, "--attention", "all"))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_shards(out, 4, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store.open(out)
    report = store.verify()
    assert report.ok, report.problems
    done = store.committed()
    assert 4 <= len(done) < 60 and len(store.shard_ids()) == len(done)
    for example in done:  # every committed example is whole and readable
        assert store.pattern(example, 1, 0).shape[0] > 0
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store.open(out)
    assert store.committed() == set(range(60)) and store.verify().ok
    assert len(store.examples()) == 60  # nothing captured twice


def _wait_for_shards(out: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        shards = out / "shards"
        if shards.is_dir() and len([p for p in shards.iterdir() if not p.name.startswith(".")]) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the writer did not commit {n} shards in time")


@pytest.mark.slow
def test_ctrl_c_keeps_every_finished_batch(model_dirs, tmp_path):
    data = _prompts(tmp_path / "p.jsonl", 60)
    out = tmp_path / "s"
    args = _cli(*_capture_args(model_dirs["gpt2"], data, out, 1))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _wait_for_shards(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stdout and "rerun the same command" in stdout
    store = Store.open(out)
    assert store.verify().ok and 3 <= len(store.committed()) < 60
    info = CliRunner().invoke(app, ["store", "info", str(out)])
    assert info.exit_code == 0 and "examples" in info.output and "GPT2LMHeadModel" in info.output


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(model_dirs, tmp_path):
    out = tmp_path / "s"
    files = []
    for w in range(3):
        lines = [json.dumps({"id": 100 * w + i, "prompt": f"writer {w} example {i}"}) for i in range(8)]
        files.append(tmp_path / f"w{w}.jsonl")
        files[-1].write_text("\n".join(lines))
    lm = hl.load(model_dirs["gpt2"])
    Store.create(out, lm)
    procs = [
        subprocess.Popen(
            _cli(*_capture_args(model_dirs["gpt2"], f, out, 2)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for f in files
    ]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    store = Store.open(out)
    assert store.committed() == {100 * w + i for w in range(3) for i in range(8)}
    assert store.verify().ok and len(store.manifest["runs"]) == 3


@pytest.mark.parametrize("top_k", [None, 3])
def test_selected_rows_dense_and_top_k(tiny, tmp_path, top_k):
    lm = tiny("gpt2")
    inputs = lm.tokenizer(["The quick brown fox jumps over the lazy dog"], return_tensors="pt")
    with (
        torch.no_grad(),
        hl.capture(lm, patterns=hl.Select(layers=[1], heads=[0, 2], queries=[-1, 2])) as rec,
    ):
        lm.model(**inputs)
    store = Store.create(tmp_path / "s", lm)
    store.append(rec, examples=[5], top_k=top_k)
    want = rec.pattern(0, 1, 2).probs.numpy()  # rows for queries (2, last)
    got = store.pattern(5, 1, 2)
    assert got.shape == want.shape
    if top_k is None:
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        assert ((got > 0).sum(-1) == top_k).all()
        for g, w in zip(got, want, strict=True):
            top = np.sort(np.argsort(-w)[:top_k])
            np.testing.assert_allclose(g[top], w[top], rtol=1e-6)
    np.testing.assert_allclose(store.pattern(5, 1, 2, queries=[-1]), got[-1:], rtol=1e-6)
    with pytest.raises(hl.StoreError, match="no attention stored"):
        store.pattern(5, 0, 0)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])  # gemma2: also soft-capped scores
def test_sliding_window_patterns_rebuild_exactly(tiny, tmp_path, name):
    lm = tiny(name)  # sliding window 6, prompts of ~30 tokens
    inputs = lm.tokenizer(
        ["The quick brown fox jumps over the lazy dog again and again"], return_tensors="pt"
    )
    assert inputs["input_ids"].shape[1] > 12
    eager = eager_attentions(lm, inputs)
    with torch.no_grad(), hl.capture(lm, compact=hl.Select()) as rec:
        lm.model(**inputs)
    assert rec.compact[0].softcap == (2.0 if name == "gemma2" else None)
    store = Store.create(tmp_path / "s", lm)
    store.append(rec, examples=[0])
    for layer in range(2):
        for head in range(lm.n_heads):
            np.testing.assert_allclose(
                store.pattern(0, layer, head), eager[layer][0, head].numpy(), atol=1e-5
            )
    assert (eager[0][0, 0, -1, :-6] == 0).all()  # the window really cuts


def _info(lm, prompt: str, **fields) -> ExampleInfo:
    ids = lm.tokenizer(prompt)["input_ids"]
    tokens = tuple(lm.tokenizer.batch_decode([[i] for i in ids]))
    return ExampleInfo(prompt=prompt, token_ids=tuple(ids), tokens=tokens, **fields)


def _thumbnail() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_example_inputs_round_trip(tiny, tmp_path):
    lm = tiny("gpt2")
    store = Store.create(tmp_path / "s", lm)
    prompts = ["a red square", "a blue circle"]
    infos = [
        _info(lm, prompts[0], label="yes"),
        _info(lm, prompts[1], image="x/1.png", thumbnail=_thumbnail()),
    ]
    rec = _record(lm, lm.tokenizer(prompts, return_tensors="pt", padding=True))
    store.append(rec, examples=[4, 5], condition="with", info=infos)
    assert store.example_info(4) == infos[0] and store.example_info(5) == infos[1]
    assert store.tokens(4) == list(infos[0].tokens) and store.image(4) is None
    assert store.image(5).size == (20, 10) and store.image(5).getpixel((0, 0)) == (200, 30, 30)
    assert store.info()["stored"]["with"] == {
        "head stats": 2,
        "residuals": 2,
        "head outputs": 2,
        "compact attention": 2,
        "attention rows": 2,
        "tokens": 2,
        "images": 1,
        "labels": 1,
    }
    with pytest.raises(hl.StoreError, match="2 tokens for 3 token ids"):
        ExampleInfo(token_ids=(1, 2, 3), tokens=("a", "b"))
    with pytest.raises(hl.StoreError, match="got 1 ExampleInfo for a record of 2 examples"):
        store.append(rec, examples=[6, 7], condition="with", info=infos[:1])


def test_a_store_without_example_inputs_reads_none(llama_store):
    store = llama_store[3]  # appended with meta only, as every store before the inputs table
    info = store.example_info(11)
    assert info == ExampleInfo(prompt="b")  # the prompt from the meta; the rest None, never an error
    assert store.tokens(10) is None and store.image(10) is None
    assert "tokens" not in store.stored()["default"]


def test_shards_with_and_without_each_field_read_together(tiny, tmp_path):
    """inputs.parquet has a fixed schema: a shard whose columns are all null (a ViT, a text-only LVLM line)
    reads together with one that fills them, in either order."""
    lm = tiny("gpt2")
    infos = {1: ExampleInfo(label=3), 2: _info(lm, "two words", thumbnail=_thumbnail())}
    for order in ((1, 2), (2, 1)):
        store = Store.create(tmp_path / f"s{order[0]}", lm)
        for example in order:
            rec = _record(lm, lm.tokenizer(["two words"], return_tensors="pt"))
            store.append(rec, examples=[example], info=[infos[example]])
        assert store.example_info(1) == infos[1] and store.example_info(2) == infos[2]
        assert store.image(2) is not None and store.image(1) is None
        assert store.stored()["default"]["tokens"] == 1


def test_annotations_attach_answers_and_the_latest_wins(llama_store):
    store = llama_store[3]
    store.annotate({10: {"answer": "yes", "label": "no"}, 11: {"answer": "no"}}, condition="default")
    store.annotate({10: {"answer": "maybe"}}, condition="default")
    assert store.committed() == {10, 11}  # annotation shards commit no example
    first = store.example_info(10)
    assert (first.answer, first.label, first.prompt) == ("maybe", "no", "a")
    assert store.stored()["default"]["answers"] == 2 and store.stored()["default"]["labels"] == 1
    assert Store.open(store.root).example_info(11).answer == "no" and store.verify().ok
    shown = CliRunner().invoke(app, ["store", "info", str(store.root), "--example", "10"])
    assert shown.exit_code == 0 and 'answer: "maybe"' in shown.output and "tokens: -" in shown.output
