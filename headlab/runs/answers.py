"""The answer log of the LVLM report runs, `answers.jsonl`: every raw answer, appended as it comes, crash-safe, and
tied to one model by its fingerprint (not by the text of --model).

Format (version 2, JSON Lines, UTF-8):
- line 1, the header: {"headlab_answers": 2, "model": M, "model_path": P, "fingerprint": F}. M is the --model
  text of the run that started the log, P where that model was (a local path made absolute; zoo:NAME and hub
  ids as given), F = `headlab.store.fingerprint.fingerprint` without its source: architecture, model type,
  config hash, weights hash.
- every other line is one answer: {"condition", "split", "question_id", "answer", "parsed"}.

Rules:
- Matching: answers are reused only by a model whose fingerprint equals F, wherever it lies (the same weights
  under another path reuse them). Another model (also: other weights at the same path) is refused with a
  `StoreError` naming what differs and what to do.
- `load_report_model`: a run without --model loads the model the log names (P), so a log started with a
  relative path still finds its model from any folder; when P cannot be loaded any more, `ModelLoadError`
  says so and to pass --model with where the model is now.
- Writing: each answer is one whole line, written with one `os.write` on an O_APPEND descriptor, then fsynced.
  If the write fails (full disk), the file is cut back to where it was and `StoreError` says what to do.
- Repair on open: a last line without its newline (a run killed mid-write) is cut if it is not a complete
  record (its question is asked again), or completed with its newline if it is; a note says which.
- Reading goes through `datasets.records.iter_records`. A line that is not UTF-8, not JSON or not an object,
  whose question_id breaks the id rule (`headlab.ids.example_id`: 1.9, true, null are refused, never rounded),
  or without string condition, split and answer, is one listed problem, and its question is asked again. A
  repeated (condition, split, question_id): the first line wins, the later one is listed.
- Version 1 logs (no header, the --model text on every line, headlab before fingerprints) are read when
  every line's model text equals this run's --model, as headlab did then, and rewritten as version 2 with
  this model's fingerprint (atomically, keeping every good answer); a note says so. A version 1 log of
  another model text is refused. A log from a newer headlab is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from headlab.datasets.pope import parse_answer
from headlab.datasets.records import Entry, iter_records
from headlab.errors import InputError, ModelLoadError, StoreError
from headlab.ids import example_id
from headlab.runs.atomic import write_text_atomic

ANSWERS = "answers.jsonl"
HEADER_KEY = "headlab_answers"
VERSION = 2
FINGERPRINT_KEYS = ("architecture", "model_type", "config_hash", "weights_hash")
_WHAT_DIFFERS = {
    "architecture": "another architecture",
    "model_type": "another model type",
    "config_hash": "another config",
    "weights_hash": "other weights",
}


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """Which model answered: as given, where it was (absolute), and its fingerprint."""

    given: str
    path: str
    fingerprint: dict[str, str]

    @classmethod
    def of(cls, lm, given: str) -> ModelIdentity:
        from headlab.store.fingerprint import fingerprint

        full = fingerprint(lm)
        return cls(
            given=given, path=model_location(given), fingerprint={k: full[k] for k in FINGERPRINT_KEYS}
        )

    def refuse_other(self, recorded: Mapping, where: Path, what: str = "answers") -> None:
        """StoreError when `recorded` (a fingerprint) is not this model's."""
        if not isinstance(recorded, Mapping):
            raise StoreError(f"{where} records no model fingerprint; move it away to start over")
        differs = [k for k in FINGERPRINT_KEYS if recorded.get(k) != self.fingerprint[k]]
        if differs:
            raise StoreError(
                f"{where} holds {what} of another model than {self.given} ({_WHAT_DIFFERS[differs[0]]}), so "
                "none of them is reused: use another --out folder for this model, or move the file away to "
                "start over"
            )


def model_location(given: str) -> str:
    """A local model path made absolute (so a rerun from another folder finds it); other ids as given."""
    path = Path(given).expanduser()
    if given.startswith("zoo:") or not path.exists():
        return given
    return str(path.resolve())


def recorded_model(path: Path) -> str | None:
    """The model a log names: its header's path, or a version 1 log's --model text; None without a log."""
    for entry in iter_records(path) if path.is_file() else ():
        if entry.obj is None:
            continue
        if HEADER_KEY in entry.obj:
            return entry.obj.get("model_path") if isinstance(entry.obj.get("model_path"), str) else None
        return entry.obj.get("model") if isinstance(entry.obj.get("model"), str) else None
    return None


def load_report_model(out: Path, model: str | None, default: str):
    """(lm, identity): --model, else the model of `out`'s answer log, else `default` (module docstring)."""
    from headlab.loading import load

    recorded = recorded_model(out / ANSWERS) if model is None else None
    given = model or recorded or default
    try:
        lm = load(given)
    except ModelLoadError as err:
        if recorded is None:
            raise
        raise ModelLoadError(
            f"{out / ANSWERS} was written with the model {recorded}, which cannot be loaded now ({err}). Pass "
            "--model with where that model is now: answers are matched on the model's config and weights, "
            "not its path"
        ) from None
    return lm, ModelIdentity.of(lm, given)


class AnswerLog:
    """`answers.jsonl` of one model (module docstring): `get` the answers, `append` new ones."""

    def __init__(self, path: Path, model: ModelIdentity) -> None:
        self.path, self.model = Path(path), model
        self.answers: dict[tuple[str, str], dict[int | str, str]] = {}
        self.problems: list[str] = []  # bad lines: counted and listed, their questions asked again
        self.notes: list[str] = []  # repairs and upgrades done on open
        if self.path.is_file() and self._repair_tail():
            self._read()
        else:
            self._write_line(self._header())

    def get(self, condition: str, split: str) -> dict[int | str, str]:
        return self.answers.get((condition, split), {})

    def append(self, condition: str, split: str, question_id: int | str, text: str) -> None:
        rec = {"condition": condition, "split": split, "question_id": question_id}
        self._write_line(rec | {"answer": text, "parsed": parse_answer(text)})
        self.answers.setdefault((condition, split), {})[question_id] = text

    # ----- writing ------------------------------------------------------------------------------------
    def _header(self) -> dict:
        return {HEADER_KEY: VERSION, "model": self.model.given, "model_path": self.model.path} | {
            "fingerprint": self.model.fingerprint
        }

    def _write_line(self, rec: dict) -> None:
        """Append one whole line (one write, fsynced); on failure cut the file back and raise StoreError."""
        data, fd, start = (json.dumps(rec) + "\n").encode(), None, None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            start = os.fstat(fd).st_size
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "the line was written only in part")
            os.fsync(fd)
        except OSError as err:
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            raise StoreError(
                f"could not append to {self.path} ({err.strerror or err}); free space (or fix the "
                "permissions) and rerun the same command: every answer before this one is kept"
            ) from None
        finally:
            if fd is not None:
                os.close(fd)

    # ----- reading ------------------------------------------------------------------------------------
    def _repair_tail(self) -> bool:
        """Cut or complete an unterminated last line (module docstring); False when the file is empty."""
        data = self.path.read_bytes()
        if not data.endswith(b"\n") and data:
            cut = data.rfind(b"\n") + 1
            if _is_object(data[cut:]):
                with open(self.path, "ab") as f:
                    f.write(b"\n")
                    os.fsync(f.fileno())
                self.notes.append(f"{self.path}: the last line lacked its newline (a run stopped); completed")
            else:
                os.truncate(self.path, cut)
                self.notes.append(
                    f"{self.path}: the last line was cut short ({len(data) - cut} bytes, a run stopped while "
                    "writing it); removed, its question is asked again"
                )
                data = data[:cut]
        return bool(data.strip())

    def _read(self) -> None:
        entries = list(iter_records(self.path))
        head = entries[0].obj if entries and entries[0].obj is not None else {}
        if HEADER_KEY in head:
            self._check_header(head)
            for entry in entries[1:]:
                self._take(entry)
            return
        if not any(isinstance(e.obj, dict) and isinstance(e.obj.get("model"), str) for e in entries):
            raise StoreError(
                f"{self.path} is not a headlab answer log (no header line, no model on any line); move it "
                "away to start over"
            )
        for entry in entries:
            self._take(entry, legacy=True)
        self._upgrade(len(entries))

    def _check_header(self, head: dict) -> None:
        version = head[HEADER_KEY]
        if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
            raise StoreError(
                f"{self.path} is an answer log of version {version!r}, newer than this headlab reads "
                f"({VERSION}); upgrade headlab or use another --out folder"
            )
        self.model.refuse_other(head.get("fingerprint"), self.path)

    def _take(self, entry: Entry, *, legacy: bool = False) -> None:
        if entry.obj is None:
            self.problems.append(f"{entry.problem}; its question is asked again")
            return
        obj = entry.obj
        if legacy and obj.get("model") != self.model.given:
            if isinstance(obj.get("model"), str):
                raise StoreError(
                    f"{self.path} holds answers of model {obj['model']!r}, not {self.model.given!r} (a log from "
                    "before headlab recorded model fingerprints); use another --out folder for another model"
                )
            self.problems.append(f"{entry.where}: no model on this line; its question is asked again")
            return
        try:
            qid = example_id(obj.get("question_id"))
        except InputError as err:
            self.problems.append(f"{entry.where}: question_id: {err}; its question is asked again")
            return
        fields = (obj.get("condition"), obj.get("split"), obj.get("answer"))
        if not all(isinstance(v, str) for v in fields):
            self.problems.append(
                f"{entry.where}: needs string condition, split and answer; its question is asked again"
            )
            return
        got = self.answers.setdefault(fields[:2], {})
        if qid in got:
            self.problems.append(f"{entry.where}: a second answer to question {qid!r}; the first is kept")
            return
        got[qid] = fields[2]

    def _upgrade(self, n_lines: int) -> None:
        """Rewrite a version 1 log as version 2 (header + every good answer), atomically."""
        lines = [json.dumps(self._header())]
        for (condition, split), answers in self.answers.items():
            for qid, text in answers.items():
                rec = {"condition": condition, "split": split, "question_id": qid}
                lines.append(json.dumps(rec | {"answer": text, "parsed": parse_answer(text)}))
        write_text_atomic(self.path, "\n".join(lines) + "\n")
        kept = len(lines) - 1
        self.notes.append(
            f"{self.path}: a log from before model fingerprints ({n_lines} lines, model {self.model.given!r}); "
            f"its {kept} good answers are now recorded under this model's fingerprint"
        )


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
