"""The bad-input corpus of batch capture and input files: each case builds one bad input beside good ones
and states what must happen (exit code, what the output says, which ids end up in the store).

The rules under test (headlab.runs.batch, headlab.datasets.prompts / records, headlab.inputs, the CLI):
only the bad item is skipped, never its batch; ids are integers or strings as given; every bad line is one
clear message naming it; `headlab capture` exits 0 (all in the store), 1 (some lines bad, the rest in the
store) or 2 (nothing of the file in the store, or a bad option).
"""

from __future__ import annotations

import codecs
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import headlab.loading
from headlab.cli import app
from headlab.datasets.records import read_records
from headlab.errors import InputError
from headlab.store import Store

LLAVA_PROMPT = "USER: <image>\nIs there a cat? ASSISTANT:"
LONG = " ".join(["word"] * 600)  # more tokens than the tiny GPT-2's 256 positions


def _line(i, **fields) -> dict:
    return {"id": i, "prompt": f"example number {i} is here", **fields}


def _pic(i, image="ok.png", prompt=LLAVA_PROMPT) -> dict:
    return {"id": i, "prompt": prompt, "image": image}


@dataclass(frozen=True, kw_only=True)
class Case:
    """One bad input. lines: the data file (dicts as JSON, str/bytes as raw lines); images: name -> kind
    ("ok", "corrupt", "bomb") written beside the data file; expect: exit code, ids in the store, phrases."""

    id: str
    model: str = "gpt2"
    lines: list = field(default_factory=list)
    bom: bool = False
    images: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    prepare: Callable[[Path], tuple[str, ...]] | None = None  # extra setup in tmp_path -> extra args
    sabotage: str | None = None  # a prompt on which the model's forward pass raises ValueError
    exit: int = 1
    stored: set | None = None
    condition: str | None = None  # whose committed ids `stored` is (None: the store's only condition)
    says: tuple[str, ...] = ()


def _outside(tmp: Path) -> tuple[str, ...]:
    """An image outside the data folder, reached by ../, an absolute path and a symlink."""
    _image(tmp / "secret.png", "ok")
    (tmp / "data" / "link.png").symlink_to(tmp / "secret.png")
    return ()


def _out_is_a_file(tmp: Path) -> tuple[str, ...]:
    (tmp / "afile").write_text("x")
    return ("--out", str(tmp / "afile"))


CAPTURE_CASES = [
    # 1. one bad example never loses its batch
    Case(
        id="corrupt-image-in-a-batch-of-8",
        model="llava",
        lines=[_pic(i, "bad.png" if i == 3 else "ok.png") for i in range(8)],
        images={"ok.png": "ok", "bad.png": "corrupt"},
        stored={0, 1, 2, 4, 5, 6, 7},
        says=("7 captured", "1 bad", "data.jsonl:4: id 3: could not read image"),
    ),
    Case(
        id="over-long-prompt-among-short-ones",
        lines=[_line(i) if i != 5 else {"id": 5, "prompt": LONG} for i in range(8)],
        stored={0, 1, 2, 3, 4, 6, 7},
        says=("7 captured", "1 bad", "data.jsonl:6: id 5: the input has"),
    ),
    Case(
        id="model-raises-on-one-item",
        lines=[_line(i) for i in range(7)] + [{"id": 7, "prompt": "BOOM goes this one"}],
        sabotage="BOOM goes this one",
        stored=set(range(7)),
        says=("7 captured", "1 bad", "id 7: ValueError: sabotaged"),
    ),
    # 6. ids as given
    Case(
        id="string-ids-kept-verbatim",
        lines=[
            {"id": "COCO_val2014_000000000042", "prompt": "a b c"},
            {"id": "3f2b8c1e-6a1d-4c8e-9a57-0b6f5d2c9e11", "prompt": "d e f"},
            {"id": "000000001", "prompt": "g h"},
            {"id": "1", "prompt": "i j"},
            {"id": 1, "prompt": "an integer in a string-id run"},
        ],
        stored={"COCO_val2014_000000000042", "3f2b8c1e-6a1d-4c8e-9a57-0b6f5d2c9e11", "000000001", "1"},
        says=("4 captured", "data.jsonl:5: id 1: the id is an integer but this run's first id is a string"),
    ),
    Case(
        id="ids-that-are-not-integers-or-strings",
        lines=[
            _line(0),
            {"id": 1.7, "prompt": "x"},
            {"id": 1.0, "prompt": "x"},
            {"id": True, "prompt": "x"},
            {"id": None, "prompt": "x"},
            '{"id": Infinity, "prompt": "x"}',
            '{"id": NaN, "prompt": "x"}',
            {"id": 2**64, "prompt": "x"},
            {"id": [1], "prompt": "x"},
            {"id": "", "prompt": "x"},
            '{"id": 1' + "0" * 5000 + ', "prompt": "x"}',
            _line(5),
            _line(5),
        ],
        stored={0, 5},
        says=(
            "2 captured",
            "11 bad",
            "data.jsonl:2: id is the number 1.7",
            "data.jsonl:3: id is the number 1.0",
            "data.jsonl:4: id is the boolean true",
            "data.jsonl:5: id is null",
            "data.jsonl:6: id is the number Infinity",
            "data.jsonl:7: id is the number NaN",
            "data.jsonl:8: id 18446744073709551616 is outside the 64-bit integer range",
            "data.jsonl:9: id is an array",
            "data.jsonl:10: id is an empty string",
            "data.jsonl:11: not valid JSON",
            "data.jsonl:13: duplicate id 5 (first at",
        ),
    ),
    # 8. input files
    Case(id="bom-in-json-lines", lines=[_line(0), _line(1)], bom=True, exit=0, stored={0, 1}),
    Case(
        id="invalid-utf8-line",
        lines=[_line(0), b'{"id": 1, "prompt": "caf\xe9"}', _line(2)],
        stored={0, 2},
        says=("data.jsonl:2: not valid UTF-8 (byte 0xe9 at column 25)",),
    ),
    Case(
        id="null-text-and-other-non-string-prompts",
        lines=[_line(0), {"id": 1, "text": None}, {"id": 2, "prompt": 7}, {"id": 3}],
        stored={0},
        says=(
            "data.jsonl:2: the prompt 'text' is null, not a string",
            "data.jsonl:3: the prompt 'prompt' is the number 7",
            "data.jsonl:4: no prompt",
        ),
    ),
    Case(
        id="empty-prompt",
        lines=[_line(0), {"id": 1, "prompt": ""}],
        stored={0},
        says=("id 1: the prompt is empty",),
    ),
    Case(
        id="zero-or-two-image-tokens",
        model="llava",
        lines=[
            _pic(0),
            _pic(1, prompt="USER: no image token ASSISTANT:"),
            _pic(2, prompt="<image><image> x"),
        ],
        images={"ok.png": "ok"},
        stored={0},
        says=("id 1: the prompt holds 0 <image> tokens", "id 2: the prompt holds 2 <image> tokens"),
    ),
    Case(
        id="deeply-nested-brackets",
        lines=[
            _line(0),
            "[" * 100_000,
            '{"id": 2, "prompt": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
        ],
        stored={0},
        says=("data.jsonl:2: not valid JSON (nested too deeply)", "data.jsonl:3: not valid JSON (nested too"),
    ),
    Case(
        id="decompression-bomb-png-header",
        model="llava",
        lines=[_pic(0), _pic(1, "bomb.png"), _pic(2)],
        images={"ok.png": "ok", "bomb.png": "bomb"},
        stored={0, 2},
        says=("id 1: image", "bomb.png is too large to open safely"),
    ),
    Case(
        id="not-a-json-object",
        lines=[_line(0), "[1, 2]", '"text"'],
        stored={0},
        says=("data.jsonl:2: expected a JSON object, got an array", "data.jsonl:3: expected a JSON object"),
    ),
    # 13. image paths stay inside the image folder
    Case(
        id="image-paths-escaping-the-folder",
        model="llava",
        lines=[_pic(0), _pic(1, "../secret.png"), "ABSOLUTE", _pic(3, "link.png"), _pic(4, "missing.png")],
        images={"ok.png": "ok"},
        prepare=_outside,
        stored={0},
        says=(
            "data.jsonl:2: image path '../secret.png' leads outside",
            "data.jsonl:3: image path",
            "is absolute; image paths are relative to the image folder: pass --images",
            "data.jsonl:4: image path 'link.png' leads outside",
            "data.jsonl:5: image",
            "missing.png does not exist",
        ),
    ),
    Case(
        id="images-folder-given-anywhere",
        model="llava",
        lines=[_pic(0, "ok.png")],
        prepare=lambda tmp: _elsewhere(tmp),
        exit=0,
        stored={0},
    ),
    # conditions: each (line, condition) pair on its own; an LVLM line without an image is text-only
    Case(
        id="lvlm-line-without-an-image-is-text-only",
        model="llava",
        lines=[_pic(0), {"id": 1, "prompt": LLAVA_PROMPT}, {"id": 2, "prompt": "no placeholder at all"}],
        images={"ok.png": "ok"},
        exit=0,
        stored={0, 1, 2},
    ),
    Case(
        id="a-bad-image-costs-only-its-with-image-pair",
        model="llava",
        lines=[_pic(0), _pic(1, "bad.png"), _pic(2)],
        images={"ok.png": "ok", "bad.png": "corrupt"},
        args=("--condition", "with_image", "--condition", "no_image"),
        stored={0, 2},
        condition="with_image",
        says=("5 captured", "1 bad", "data.jsonl:2: id 1 [with_image]: could not read image", "pairs over"),
    ),
    Case(
        id="an-intervention-on-a-line-without-an-image",
        model="llava",
        lines=[_pic(0), {"id": 1, "prompt": LLAVA_PROMPT}],
        images={"ok.png": "ok"},
        args=("--condition", "with_image+vhr"),
        stored={0},
        says=("data.jsonl:2: id 1: VHR acts on the image and this line has none",),
    ),
    Case(
        id="vit-line-without-an-image",
        model="vit",
        lines=[{"id": 0, "image": "ok.png"}, {"id": 1, "prompt": "a prompt is not an image"}],
        images={"ok.png": "ok"},
        stored={0},
        says=("data.jsonl:2: no image, and this model needs one",),
    ),
    Case(
        id="vit-has-no-text-only-condition",
        model="vit",
        lines=[{"id": 0, "image": "ok.png"}],
        images={"ok.png": "ok"},
        args=("--condition", "no_image"),
        exit=2,
        says=("condition 'no_image': a vision model has no text",),
    ),
    Case(
        id="condition-names",
        lines=[_line(0)],
        args=("--condition", "with_image,,x"),
        exit=2,
        says=("--condition takes names separated by commas",),
    ),
    Case(
        id="condition-given-twice",
        lines=[_line(0)],
        args=("--condition", "with_image", "--condition", "with_image"),
        exit=2,
        says=("condition 'with_image' is given twice",),
    ),
    Case(
        id="condition-not-a-name",
        lines=[_line(0)],
        args=("--condition", "with image"),
        exit=2,
        says=("condition 'with image' is not a condition name",),
    ),
    Case(
        id="condition-unknown-intervention",
        lines=[_line(0)],
        args=("--condition", "with_image+none"),
        exit=2,
        says=("unknown intervention 'none'; choose from vhr, var, paint; leave out '+none'",),
    ),
    Case(
        id="condition-intervention-without-the-image",
        lines=[_line(0)],
        args=("--condition", "no_image+vhr"),
        exit=2,
        says=("VHR acts on the image tokens, and no_image has none; use with_image+vhr",),
    ),
    Case(
        id="condition-intervention-on-an-llm",
        lines=[_line(0)],
        args=("--condition", "default+var"),
        exit=2,
        says=("VAR edits a vision-language model's attention to the image",),
    ),
    Case(
        id="unknown-tower", lines=[_line(0)], args=("--towers", "vision"), exit=2, says=("no tower 'vision'",)
    ),
    Case(
        id="attention-layer-out-of-range-in-one-tower",
        model="llava",
        lines=[_pic(0)],
        images={"ok.png": "ok"},
        args=("--towers", "lm", "--attention", "2"),
        exit=2,
        says=("layer 2 is out of range", "(lm tower"),
    ),
    # 7. exit codes
    Case(
        id="every-line-bad-exits-2",
        lines=["{not json", {"id": 1.5, "prompt": "x"}],
        exit=2,
        stored=set(),
        says=("0 captured", "2 bad", "headlab: nothing of", "all 2 lines are bad"),
    ),
    Case(id="empty-file-exits-2", lines=[], exit=2, says=("it holds no examples",)),
    # 11. options, checked before any work
    Case(id="batch-size-0", lines=[_line(0)], args=("--batch-size", "0"), exit=2, says=("--batch-size",)),
    Case(
        id="out-is-a-file",
        lines=[_line(0)],
        prepare=_out_is_a_file,
        exit=2,
        says=("is a file, not a folder",),
    ),
    Case(
        id="attention-layer-out-of-range",
        lines=[_line(0)],
        args=("--attention", "9"),
        exit=2,
        says=("layer 9",),
    ),
    Case(
        id="attention-not-a-list",
        lines=[_line(0)],
        args=("--attention", "1,,x"),
        exit=2,
        says=("--attention",),
    ),
    Case(
        id="images-not-a-folder",
        lines=[_line(0)],
        args=("--images", "/nonexistent/folder"),
        exit=2,
        says=("--images /nonexistent/folder is not a folder",),
    ),
]


def _elsewhere(tmp: Path) -> tuple[str, ...]:
    folder = tmp / "pictures" / "deep"
    folder.mkdir(parents=True)
    _image(folder / "ok.png", "ok")
    return ("--images", str(folder.resolve()))


def _image(path: Path, kind: str) -> None:
    if kind == "ok":
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    elif kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    else:  # a valid PNG header claiming 30000 x 30000 pixels, with almost no data
        ihdr = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
        chunk = lambda kind, data: (  # noqa: E731
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        )


def _write_data(case: Case, folder: Path) -> Path:
    raw = []
    for line in case.lines:
        if line == "ABSOLUTE":
            line = _pic(2, str((folder.parent / "secret.png").resolve()))
        raw.append(
            line
            if isinstance(line, bytes)
            else (line if isinstance(line, str) else json.dumps(line)).encode()
        )
    data = folder / "data.jsonl"
    data.write_bytes((codecs.BOM_UTF8 if case.bom else b"") + b"\n".join(raw) + (b"\n" if raw else b""))
    for name, kind in case.images.items():
        _image(folder / name, kind)
    return data


def _sabotage(monkeypatch, prompt: str) -> None:
    """Make the loaded model's forward pass raise a plain ValueError on any batch holding `prompt`."""
    real = headlab.loading.load

    def load(source, **kwargs):
        lm = real(source, **kwargs)
        target = lm.tokenizer(prompt)["input_ids"]

        def hook(module, args, kwargs):
            if any(row[: len(target)] == target for row in kwargs["input_ids"].tolist()):
                raise ValueError("sabotaged")

        lm.model.register_forward_pre_hook(hook, with_kwargs=True)
        return lm

    monkeypatch.setattr(headlab.loading, "load", load)


@pytest.mark.parametrize("case", CAPTURE_CASES, ids=lambda c: c.id)
def test_capture_corpus(case: Case, model_dirs, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    data = _write_data(case, folder)
    extra = case.prepare(tmp_path) if case.prepare else ()
    if case.sabotage:
        _sabotage(monkeypatch, case.sabotage)
    out = tmp_path / "store"
    args = ["capture", "--model", model_dirs[case.model], "--data", str(data), "--out", str(out)]
    args += ["--attention", "none", *case.args, *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == case.exit, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for phrase in case.says:
        assert phrase in result.output, f"{phrase!r} not in:\n{result.output}"
    if case.stored is not None:
        opened = Store.open(out) if (out / "manifest.json").is_file() else None
        stored = opened.committed(case.condition) if opened else set()
        assert stored == case.stored
        assert all(type(a) is type(b) for a in stored for b in case.stored if a == b)


@dataclass(frozen=True, kw_only=True)
class FileCase:
    """A benchmark file read by `read_records`: its bytes and the objects or the error it must give."""

    id: str
    content: bytes
    n_items: int = 0
    problems: tuple[str, ...] = ()
    raises: str | None = None


POPE = [{"question_id": i, "image": f"{i}.jpg", "text": "Is there a cat?", "label": "yes"} for i in range(3)]

FILE_CASES = [
    FileCase(id="bom-json-array", content=codecs.BOM_UTF8 + json.dumps(POPE, indent=1).encode(), n_items=3),
    FileCase(
        id="bom-json-lines",
        content=codecs.BOM_UTF8 + b"\n".join(json.dumps(q).encode() for q in POPE),
        n_items=3,
    ),
    FileCase(
        id="invalid-utf8-in-json-lines",
        content=json.dumps(POPE[0]).encode() + b'\n{"text": "\xff"}\n' + json.dumps(POPE[1]).encode(),
        n_items=2,
        problems=(":2: not valid UTF-8 (byte 0xff",),
    ),
    FileCase(
        id="invalid-utf8-in-json-array",
        content=b'[\n{"a": 1},\n{"text": "\xff"}\n]',
        raises=r":3: not valid UTF-8 \(byte 0xff",
    ),
    FileCase(id="nested-json-array", content=b"[" * 100_000, raises="nested too deeply"),
    FileCase(
        id="line-separator-inside-a-string",  # U+2028 is not a line end in JSON Lines
        content=json.dumps({"text": "a\u2028b"}, ensure_ascii=False).encode() + b"\r\n" + b'{"x": 1}\r\n',
        n_items=2,
    ),
    FileCase(id="array-of-non-objects", content=b'[{"a": 1}, 2, null]', n_items=1, problems=("[1]:", "[2]:")),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=lambda c: c.id)
def test_records_corpus(case: FileCase, tmp_path):
    path = tmp_path / "questions.json"
    path.write_bytes(case.content)
    if case.raises:
        with pytest.raises(InputError, match=case.raises):
            read_records(path)
        return
    records = read_records(path)
    assert len(records.items) == case.n_items, records.problems
    assert len(records.problems) == len(case.problems), records.problems
    for phrase, problem in zip(case.problems, records.problems, strict=True):
        assert phrase in problem


STATS_OUT_CASES = [  # (id, --out under tmp_path, phrase); the model does not exist: checked before loading
    ("out-is-a-folder", "table.csv/", "is a folder"),
    ("out-not-a-table", "t.json", "must end in .csv or .parquet"),
    ("out-under-a-file", "afile/t.csv", "is a file, not a folder"),
]


@pytest.mark.parametrize(
    ("out", "phrase"), [c[1:] for c in STATS_OUT_CASES], ids=[c[0] for c in STATS_OUT_CASES]
)
def test_stats_out_corpus(out: str, phrase: str, tmp_path):
    (tmp_path / "table.csv").mkdir()
    (tmp_path / "afile").write_text("x")
    args = ["stats", str(tmp_path / "no-model"), "--prompt", "x", "--out", str(tmp_path / out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and phrase in result.output, result.output
