"""The bad-input corpus of the benchmark reports (`headlab report pope|mme|amber|chair|sinks|position-bias`).

One parametrised test over `CASES`: each case builds a bad input (an image, an answer log, a model folder, an
option, a failing disk) under its own tmp folder, runs the command, and says what must happen: the exit code
(0 complete, 1 partial, 2 nothing usable or a headlab error, 130 interrupted), a text the output must hold,
never a traceback, and checks on what was written. `rerun` runs the same command again afterwards (with the
test's monkeypatches undone) and says what that second run must give: no bad item ever blocks a rerun.
Runs on the zoo LLaVA / LM, with a few questions and the "none" condition, so the whole corpus takes seconds.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from headlab.cli import app
from headlab.datasets import scenes

runner = CliRunner()
SPLIT = "q"  # the split name of the POPE files written here


# ------------------------------------------------------------------------------------------ building


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """Synthetic POPE questions and images, made once and copied by each case."""
    return scenes.write_pope_benchmark(tmp_path_factory.mktemp("bench"), n_images=4)


@dataclass
class Ctx:
    """A case's folder and helpers: `pope` writes a question file, `run` invokes the CLI."""

    tmp: Path
    bench: Path
    monkeypatch: pytest.MonkeyPatch
    saved: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def images(self) -> Path:
        if not (self.tmp / "images").is_dir():
            shutil.copytree(self.bench / "images", self.tmp / "images")
        return self.tmp / "images"

    def questions(self, k: int = 3) -> list[dict]:
        """The first question of each of the first `k` images (so one bad image costs one question)."""
        rows, seen = [], set()
        for line in (self.bench / "pope_random.json").read_text().splitlines():
            row = json.loads(line)
            if row["image"] not in seen and len(rows) < k:
                seen.add(row["image"])
                rows.append(row)
        return rows

    def pope(self, rows: list[dict] | None = None, *extra: str) -> list[str]:
        """Write `rows` (default: 3 questions) as the POPE file; the CLI arguments of a report on it."""
        data = self.tmp / f"{SPLIT}.json"
        data.write_text("\n".join(json.dumps(r) for r in rows or self.questions()) + "\n")
        args = ["report", "pope", "--out", str(self.out), "--data", str(data), "--images", str(self.images)]
        return [*args, "--interventions", "none", "--vhd-images", "0", *extra]

    def image_of(self, row: dict) -> Path:
        return self.images / row["image"]

    def run(self, args: list[str], code: int = 0) -> str:
        result = runner.invoke(app, args)
        assert result.exit_code == code, result.output
        return result.output

    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text())

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "answers.jsonl").read_text().splitlines()]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


BOMB = (  # a PNG header claiming 100000 x 100000 pixels (no pixel data: opening it must cost nothing)
    b"\x89PNG\r\n\x1a\n"
    + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    + _png_chunk(b"IEND", b"")
)


def _break_image(how: str) -> Callable[[Ctx], list[str]]:
    """One of the three questions gets an unusable image."""

    def build(ctx: Ctx) -> list[str]:
        args = ctx.pope()
        path = ctx.image_of(ctx.questions()[1])
        if how == "text":
            path.write_text("not an image\n")
        elif how == "truncated":
            path.write_bytes(path.read_bytes()[:60])
        else:
            path.write_bytes(BOMB)
        return args

    return build


def _one_failed(reason: str) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, output: str) -> None:
        entry = ctx.report()["splits"][SPLIT]
        assert entry["metrics"]["none"]["n"] == 2  # its neighbours are answered
        (failed,) = entry["failed"]["none"]
        assert reason in failed and ctx.questions()[1]["image"] in failed
        assert ctx.report()["outcome"]["status"] == "partial"

    return check


# ------------------------------------------------------------------------------- images and answers


def _all_bad(ctx: Ctx) -> list[str]:
    args = ctx.pope()
    for row in ctx.questions():
        ctx.image_of(row).write_text("not an image")
    return args


def _check_all_bad(ctx: Ctx, output: str) -> None:
    metrics = ctx.report()["splits"][SPLIT]["metrics"]["none"]
    assert metrics["n"] == 0 and all(metrics[k] is None for k in ("accuracy", "precision", "f1", "yes_ratio"))
    assert "| n/a |" in (ctx.out / "report.md").read_text()
    assert "<td>n/a</td>" in (ctx.out / "report.html").read_text()


def _ids(ctx: Ctx) -> list[str]:
    rows = ctx.questions(4)
    rows[0]["question_id"], rows[1]["question_id"] = "000000001", 1  # two questions, never one
    rows[2]["question_id"], rows[3]["question_id"] = True, 1.0  # refused, each on its own line
    return ctx.pope(rows)


def _check_ids(ctx: Ctx, output: str) -> None:
    entry = ctx.report()["splits"][SPLIT]
    assert entry["n_questions"] == 2 and entry["metrics"]["none"]["n"] == 2
    assert len(entry["malformed_lines"]) == 2 and "boolean true" in entry["malformed_lines"][0]
    assert "1.0" in entry["malformed_lines"][1]
    assert sorted(map(repr, (r["question_id"] for r in ctx.log_lines()[1:]))) == ["'000000001'", "1"]


# --------------------------------------------------------------------------------------- answer log


def _answered_once(ctx: Ctx) -> list[str]:
    args = ctx.pope()
    ctx.run(args)
    return args


def _torn_tail(ctx: Ctx) -> list[str]:
    args = _answered_once(ctx)
    log = ctx.out / "answers.jsonl"
    data = log.read_bytes()
    log.write_bytes(data[: len(data) - 20])  # a run killed while writing its last answer
    return args


def _no_final_newline(ctx: Ctx) -> list[str]:
    args = _answered_once(ctx)
    log = ctx.out / "answers.jsonl"
    log.write_bytes(log.read_bytes()[:-1])  # a whole last record, only its newline missing
    return args


def _check_completed(ctx: Ctx, output: str) -> None:
    assert (ctx.out / "answers.jsonl").read_text().endswith("}\n")
    assert any("lacked its newline" in n for n in ctx.report()["notes"])


def _check_torn(ctx: Ctx, output: str) -> None:
    assert "1 answered, 2 already" in output
    text = (ctx.out / "answers.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 4  # header + 3 whole answers
    assert any("cut short" in n for n in ctx.report()["notes"])


def _log_line(ctx: Ctx, raw: bytes, drop_answer_of: int | None = 0) -> list[str]:
    """After a complete run: drop one answer line and append `raw` in its place."""
    args = _answered_once(ctx)
    log = ctx.out / "answers.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    if drop_answer_of is not None:
        del lines[1 + drop_answer_of]
    log.write_bytes(b"".join(lines) + raw + b"\n")
    return args


def _bad_line(raw: Callable[[Ctx], bytes]) -> Callable[[Ctx], list[str]]:
    return lambda ctx: _log_line(ctx, raw(ctx))


def _answer_line(ctx: Ctx, qid) -> bytes:
    rec = {"condition": "none", "split": SPLIT, "question_id": qid, "answer": "Yes", "parsed": "yes"}
    return json.dumps(rec).encode()


def _check_asked_again(what: str) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, output: str) -> None:
        assert "1 answered, 2 already" in output  # the dropped answer is asked again, never taken from it
        problems = ctx.report()["problems"]["answers_file"]
        assert len(problems) == 1 and what in problems[0]
        assert ctx.report()["splits"][SPLIT]["metrics"]["none"]["n"] == 3

    return check


def _disk_full_on_append(ctx: Ctx) -> list[str]:
    import headlab.runs.answers as answers

    real, calls = answers.os.write, []

    def half(fd, data):
        if Path(f"/proc/self/fd/{fd}").resolve().name != "answers.jsonl":
            return real(fd, data)
        calls.append(1)
        if len(calls) < 3:  # the header and the first answer go through
            return real(fd, data)
        return real(fd, data[: len(data) // 2])  # then the disk is full mid-line

    ctx.monkeypatch.setattr(answers.os, "write", half)
    return ctx.pope()


def _check_disk_full(ctx: Ctx, output: str) -> None:
    text = (ctx.out / "answers.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2  # cut back to whole lines: header + 1 answer


def _legacy_log(model: str) -> Callable[[Ctx], list[str]]:
    """A log written before fingerprints: the --model text on every line, no header."""

    def build(ctx: Ctx) -> list[str]:
        args = ctx.pope(None, "--model", "zoo:llava")
        ctx.out.mkdir()
        lines = [
            {"model": model, "condition": "none", "split": SPLIT, "question_id": r["question_id"]}
            | {"answer": "Yes", "parsed": "yes"}
            for r in ctx.questions()[:2]
        ]
        (ctx.out / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return args

    return build


def _check_legacy(ctx: Ctx, output: str) -> None:
    assert "1 answered, 2 already" in output
    lines = ctx.log_lines()
    assert lines[0]["headlab_answers"] == 2 and "weights_hash" in lines[0]["fingerprint"]
    assert len(lines) == 4 and any("before model fingerprints" in n for n in ctx.report()["notes"])


# ------------------------------------------------------------------------------------------- models


def _model_copy(ctx: Ctx, name: str = "llava") -> Path:
    from headlab.zoo.registry import zoo_path

    return Path(shutil.copytree(zoo_path("llava"), ctx.tmp / name))


def _perturb(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _swapped_model(ctx: Ctx) -> list[str]:
    folder = _model_copy(ctx)
    args = ctx.pope(None, "--model", str(folder))
    ctx.run(args)
    _perturb(folder)  # other weights at the same path
    return args


def _moved_model(ctx: Ctx) -> list[str]:
    folder = _model_copy(ctx)
    ctx.run(ctx.pope(None, "--model", str(folder)))
    moved = folder.rename(ctx.tmp / "elsewhere")
    return ctx.pope(None, "--model", str(moved))


def _relative_model(ctx: Ctx) -> list[str]:
    _model_copy(ctx)
    ctx.monkeypatch.chdir(ctx.tmp)
    ctx.run(ctx.pope(None, "--model", "llava"))  # recorded as an absolute path
    (ctx.tmp / "elsewhere").mkdir()
    ctx.monkeypatch.chdir(ctx.tmp / "elsewhere")
    return ctx.pope()  # no --model: the log's model


def _gone_model(ctx: Ctx) -> list[str]:
    args = _relative_model(ctx)
    shutil.rmtree(ctx.tmp / "llava")
    return args


# ------------------------------------------------------------------------------------------- VHD step


def _vhd_args(ctx: Ctx) -> list[str]:
    return [*ctx.pope(), "--vhd-images", "2"]  # the later --vhd-images wins


def _interrupt_on_call(ctx: Ctx, owner, name: str, call: int) -> None:
    real, calls = getattr(owner, name), []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    ctx.monkeypatch.setattr(owner, name, flaky)


def _vhd_interrupted_between_images(ctx: Ctx) -> list[str]:
    import headlab.analyses.vhd as vhd

    _interrupt_on_call(ctx, vhd, "capture_vhd_conditions", 2)
    return _vhd_args(ctx)


def _vhd_interrupted_between_conditions(ctx: Ctx) -> list[str]:
    from headlab.store import Store

    _interrupt_on_call(ctx, Store, "append", 2)  # image 0 stored with its image, not yet without
    return _vhd_args(ctx)


def _vhd_store_left_empty(ctx: Ctx) -> list[str]:
    import headlab as hl
    from headlab.store import Store

    ctx.out.mkdir()
    Store.create(ctx.out / "vhd_store", hl.load("zoo:llava"))  # what a Ctrl-C right after creating it left
    return _vhd_args(ctx)


def _vhd_first_image_bad(ctx: Ctx) -> list[str]:
    args = _vhd_args(ctx)
    ctx.image_of(ctx.questions()[0]).write_bytes(BOMB)
    return args


def _check_vhd_without_first(ctx: Ctx, output: str) -> None:
    _check_vhd(ctx, output)  # the maps use the two images that open
    assert any("image maps" in n and "too large" in n for n in ctx.report()["notes"])


def _check_vhd(ctx: Ctx, output: str) -> None:
    report = ctx.report()
    assert len(report["vhd_per_head"]) == 2 * 4 and report["attention_maps"]["images"] == 2


def _check_vhd_rebuilt(why: str) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, output: str) -> None:
        _check_vhd(ctx, output)
        assert any("rebuilt" in n and why in n for n in ctx.report()["notes"])

    return check


# ------------------------------------------------------------------------------------- report files


def _failing_report_write(ctx: Ctx) -> list[str]:
    import headlab.reports.output as output

    args = _answered_once(ctx)
    ctx.saved = {name: (ctx.out / name).read_bytes() for name in output.REPORT_FILES}

    def full(fd):
        raise OSError(28, "No space left on device")

    ctx.monkeypatch.setattr(output.os, "fsync", full)  # the log is complete: only the report is written
    return args


def _check_report_intact(ctx: Ctx, output: str) -> None:
    for name, before in ctx.saved.items():
        assert (ctx.out / name).read_bytes() == before
    assert not [p for p in ctx.out.iterdir() if p.name.endswith(".tmp")]


def _stale_plotly_write_fails(ctx: Ctx) -> list[str]:
    """The folder's plotly.min.js is of another plotly version, and the write that would replace it fails."""
    from headlab.reports.html import PLOTLY_JS

    args = _failing_report_write(ctx)  # answered once, then every fsync fails
    (ctx.out / PLOTLY_JS).write_text("/* plotly.js v0.0.1 */")
    ctx.saved[PLOTLY_JS] = (ctx.out / PLOTLY_JS).read_bytes()
    return args


def _check_plotly_fresh(ctx: Ctx, output: str) -> None:
    from plotly.offline import get_plotlyjs

    assert (ctx.out / "plotly.min.js").read_text() == get_plotlyjs()


# ---------------------------------------------------------------------------------------- VAR's counts


def _var_counts_corrupt(ctx: Ctx) -> list[str]:
    """Answered under var once; then var_sinks.json is not JSON: the report is written all the same."""
    args = ctx.pope(None, "--interventions", "none,var")
    ctx.run(args)
    assert ctx.report()["var"]["observed"] == 3
    (ctx.out / "var_sinks.json").write_text("{not json")
    return args


def _check_var_counts_lost(ctx: Ctx, output: str) -> None:
    report = ctx.report()
    assert any("var_sinks.json could not be read" in n for n in report["notes"])
    assert report["var"]["observed"] == 0 and report["var"]["answers"] == 3
    assert report["var"]["statement"].startswith("VAR's effect was not observed")


# ------------------------------------------------------------------------------- other benchmarks


def _other(kind: str) -> Callable[[Ctx], list[str]]:
    """MME / CHAIR / AMBER on 2 synthetic images, the second one broken."""

    def build(ctx: Ctx) -> list[str]:
        from headlab.reports.amber import write_amber_benchmark
        from headlab.reports.chair import write_chair_benchmark
        from headlab.reports.mme import write_mme_benchmark

        writer, folder = {
            "mme": (write_mme_benchmark, "images"),
            "chair": (write_chair_benchmark, "images"),
            "amber": (write_amber_benchmark, "image"),
        }[kind]
        data = writer(ctx.tmp / "data", n_images=2)
        sorted((data / folder).iterdir())[1].write_bytes(BOMB)
        where = str(data / "existence.txt") if kind == "mme" else str(data)
        args = ["report", kind, "--out", str(ctx.out), "--data", where, "--interventions", "none"]
        return args + ([] if kind == "mme" else ["--gen-tokens", "3"])

    return build


def _check_other(ctx: Ctx, output: str) -> None:
    report = ctx.report()
    assert report["outcome"]["failed"] >= 1 and report["outcome"]["answered"] >= 1
    assert "pixels" in json.dumps(report["problems"]) + json.dumps(report.get("subtasks", {}))


def _mme_not_utf8(ctx: Ctx) -> list[str]:
    from headlab.reports.mme import write_mme_benchmark

    data = write_mme_benchmark(ctx.tmp / "data", n_images=2)
    with open(data / "existence.txt", "ab") as f:
        f.write(b"scene_99.png\tIs there a caf\xe9?\tYes\n")
    return [
        "report",
        "mme",
        "--out",
        str(ctx.out),
        "--data",
        str(data / "existence.txt"),
        "--interventions",
        "none",
    ]


def _check_mme_not_utf8(ctx: Ctx, output: str) -> None:
    sub = ctx.report()["subtasks"]["existence"]
    assert sub["n_questions"] == 4 and "not valid UTF-8" in sub["malformed_lines"][0]


def _chair_truth_keys(ctx: Ctx) -> list[str]:
    from headlab.reports.chair import write_chair_benchmark

    data = write_chair_benchmark(ctx.tmp / "data", n_images=2)
    truth = json.loads((data / "truth.json").read_text())
    first = next(iter(truth))
    truth[f"000{first}"] = truth.pop(first)  # a string id: never the integer one
    truth["9"] = ["unicorn"]  # outside the vocabulary: listed, not fatal
    (data / "truth.json").write_text(json.dumps(truth))
    return ["report", "chair", "--out", str(ctx.out), "--data", str(data), "--interventions", "none"]


def _check_chair_truth(ctx: Ctx, output: str) -> None:
    report = ctx.report()
    problems = report["problems"]["images"]
    assert report["images"] == 1 and len(problems) == 2
    assert any("unicorn" in p for p in problems) and any("no ground truth" in p for p in problems)


# ------------------------------------------------------------------------------------------ options


def _cli(*args: str, out: str = "out") -> Callable[[Ctx], list[str]]:
    """A report command with a bad option; `{tmp}` in an argument is the case's folder."""

    def build(ctx: Ctx) -> list[str]:
        (ctx.tmp / "a_file").write_text("x")
        return [a.replace("{tmp}", str(ctx.tmp)) for a in ("report", *args, "--out", f"{{tmp}}/{out}")]

    return build


def _nothing_written(ctx: Ctx, output: str) -> None:
    assert not ctx.out.exists()  # refused before any work


# --------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True, kw_only=True)
class Case:
    id: str
    build: Callable[[Ctx], list[str]]  # makes the bad input; returns the CLI arguments of the run
    code: int  # the exit code of that run
    says: str = ""  # a text its output holds
    check: Callable[[Ctx, str], None] | None = None  # more checks on what was written
    rerun: int | None = None  # the exit code of the same command run again (monkeypatches undone)
    rerun_says: str = ""
    rerun_check: Callable[[Ctx, str], None] | None = None


CASES = [
    # 3: an unusable image is one failed question; its neighbours are answered, and a rerun never stops there
    Case(id="pope-image-is-text", build=_break_image("text"), code=1, says="1 failed",
         check=_one_failed("cannot identify image file"), rerun=1, rerun_says="0 answered, 2 already"),
    Case(id="pope-image-truncated-png", build=_break_image("truncated"), code=1,
         check=_one_failed("could not read image"), rerun=1),
    Case(id="pope-image-bomb-header", build=_break_image("bomb"), code=1,
         check=_one_failed("too large"), rerun=1),
    Case(id="mme-bomb-image", build=_other("mme"), code=1, check=_check_other),
    Case(id="chair-bomb-image", build=_other("chair"), code=1, check=_check_other),
    Case(id="amber-bomb-image", build=_other("amber"), code=1, check=_check_other),
    # 3: an interrupted VHD step resumes (or is rebuilt), never blocks a rerun
    Case(id="vhd-interrupted-between-images", build=_vhd_interrupted_between_images, code=130,
         says="interrupted", rerun=0, rerun_check=_check_vhd),
    Case(id="vhd-interrupted-between-conditions", build=_vhd_interrupted_between_conditions, code=130,
         rerun=0, rerun_check=_check_vhd_rebuilt("between its two conditions")),
    Case(id="vhd-first-image-bad", build=_vhd_first_image_bad, code=1, check=_check_vhd_without_first),
    Case(id="vhd-store-left-empty", build=_vhd_store_left_empty, code=0, check=_check_vhd_rebuilt("missing")),
    # 7: nothing answered: n/a metrics and a non-zero exit
    Case(id="all-images-bad", build=_all_bad, code=2, says="nothing was answered", check=_check_all_bad),
    # ids as given, bad ids one problem each
    Case(id="ids-kept-as-given", build=_ids, code=1, check=_check_ids),
    # 9: the answer log
    Case(id="log-torn-tail", build=_torn_tail, code=0, check=_check_torn),
    Case(id="log-no-final-newline", build=_no_final_newline, code=0, says="0 answered, 3 already",
         check=_check_completed),
    Case(id="log-not-utf8", build=_bad_line(lambda ctx: b'{"answer": "caf\xe9"}'), code=0,
         check=_check_asked_again("not valid UTF-8")),
    Case(id="log-question-id-1.9", build=_bad_line(lambda ctx: _answer_line(ctx, ctx.questions()[0]["question_id"] + 0.9)),
         code=0, check=_check_asked_again("the number")),
    Case(id="log-question-id-true", build=_bad_line(lambda ctx: _answer_line(ctx, True)), code=0,
         check=_check_asked_again("boolean")),
    Case(id="log-disk-full-mid-line", build=_disk_full_on_append, code=2, says="could not append",
         check=_check_disk_full, rerun=0, rerun_says="2 answered, 1 already"),
    Case(id="log-from-before-fingerprints", build=_legacy_log("zoo:llava"), code=0, check=_check_legacy),
    Case(id="log-from-before-fingerprints-other-model", build=_legacy_log("zoo:other"), code=2,
         says="holds answers of model 'zoo:other'"),
    Case(id="report-write-fails", build=_failing_report_write, code=2, says="previous files are unchanged",
         check=_check_report_intact, rerun=0),
    Case(id="stale-plotly-js-write-fails", build=_stale_plotly_write_fails, code=2,
         says="previous files are unchanged", check=_check_report_intact, rerun=0, rerun_check=_check_plotly_fresh),
    Case(id="var-counts-file-corrupt", build=_var_counts_corrupt, code=0, says="0 answered, 6 already",
         check=_check_var_counts_lost),
    # 10: answers follow the model, not its path
    Case(id="model-swapped-at-same-path", build=_swapped_model, code=2, says="other weights"),
    Case(id="same-model-at-another-path", build=_moved_model, code=0, says="0 answered, 3 already"),
    Case(id="relative-model-path-from-elsewhere", build=_relative_model, code=0, says="0 answered, 3 already"),
    Case(id="recorded-model-gone", build=_gone_model, code=2, says="Pass --model with where that model is now"),
    # other inputs of the benchmarks
    Case(id="mme-line-not-utf8", build=_mme_not_utf8, code=1, check=_check_mme_not_utf8),
    Case(id="chair-truth-keys-and-bad-entry", build=_chair_truth_keys, code=1, check=_check_chair_truth),
    # 11: options refused before any work
    Case(id="out-is-a-file", build=_cli("pope", out="a_file"), code=2, says="is a file"),
    Case(id="out-inside-a-file", build=_cli("mme", out="a_file/r"), code=2, says="which is a file"),
    Case(id="n-zero", build=_cli("pope", "--n", "0"), code=2, says="at least 1", check=_nothing_written),
    Case(id="n-negative", build=_cli("chair", "--n", "-3"), code=2, says="at least 1", check=_nothing_written),
    Case(id="max-new-tokens-zero", build=_cli("mme", "--max-new-tokens", "0"), code=2, says="at least 1",
         check=_nothing_written),
    Case(id="gen-tokens-zero", build=_cli("amber", "--gen-tokens", "0"), code=2, says="at least 1",
         check=_nothing_written),
    Case(id="vhd-images-negative", build=_cli("pope", "--vhd-images", "-1"), code=2, says="0 (no image maps) or more",
         check=_nothing_written),
    Case(id="var-tau-nan", build=_cli("pope", "--var-tau", "nan"), code=2, says="positive number",
         check=_nothing_written),
    Case(id="images-is-a-file", build=_cli("pope", "--images", "{tmp}/a_file"), code=2, says="is not a folder",
         check=_nothing_written),
    Case(id="sinks-batch-size-zero", build=_cli("sinks", "--batch-size", "0"), code=2, says="at least 1",
         check=_nothing_written),
    Case(id="position-n-zero", build=_cli("position-bias", "--n", "0"), code=2, says="at least 1",
         check=_nothing_written),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = Ctx(tmp_path, bench, monkeypatch)
    args = case.build(ctx)
    output = ctx.run(args, case.code)
    assert "Traceback" not in output
    assert case.says in output.replace("\n", " ")
    if case.code == 2:  # a headlab error or "nothing answered": one line saying what is wrong
        assert output.count("headlab: ") == 1 and "\n" not in output.split("headlab: ")[1].rstrip("\n")
    if case.check:
        case.check(ctx, output)
    if case.rerun is not None:
        monkeypatch.undo()
        output = ctx.run(args, case.rerun)
        assert case.rerun_says in output.replace("\n", " ")
        if case.rerun_check:
            case.rerun_check(ctx, output)
