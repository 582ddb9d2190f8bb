"""A prompt file for batch capture: JSON Lines, one example per line.

Each line is an object with a prompt under "prompt" (or "text", or "question"), optionally an "id" (or
"question_id"; default: the line number, 0-based among the non-empty lines) and an "image" path (relative to
`images_dir`, or to the file's own directory). Every other field is kept as the example's meta.

Bad lines never stop a run: each one is reported as "file:line: what is wrong" and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from headlab.errors import InputError

_PROMPT_KEYS = ("prompt", "text", "question")
_ID_KEYS = ("id", "question_id")


@dataclass(frozen=True)
class PromptItem:
    id: int
    prompt: str
    image: Path | None
    meta: dict
    line: int


@dataclass
class PromptFile:
    items: list[PromptItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_prompts(
    path: str | Path, *, images_dir: str | Path | None = None, need_images: bool = False
) -> PromptFile:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    base = Path(images_dir) if images_dir is not None else path.parent
    out = PromptFile()
    seen: set[int] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        index = -1
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            index += 1
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                out.problems.append(f"{where}: not valid JSON ({err.msg})")
                continue
            if not isinstance(obj, dict):
                out.problems.append(f"{where}: expected a JSON object")
                continue
            prompt = next((obj[k] for k in _PROMPT_KEYS if isinstance(obj.get(k), str)), None)
            if prompt is None:
                out.problems.append(f"{where}: no prompt (one of {', '.join(_PROMPT_KEYS)})")
                continue
            raw_id = next((obj[k] for k in _ID_KEYS if k in obj), index)
            try:
                example_id = int(raw_id)
            except (TypeError, ValueError):
                out.problems.append(f"{where}: id {raw_id!r} is not an integer")
                continue
            if example_id in seen:
                out.problems.append(f"{where}: duplicate id {example_id}")
                continue
            image = None
            if obj.get("image"):
                image = base / str(obj["image"])
                if not image.is_file():
                    out.problems.append(f"{where}: image {image} does not exist")
                    continue
            elif need_images:
                out.problems.append(f"{where}: no image, and this model needs one")
                continue
            seen.add(example_id)
            meta = {k: v for k, v in obj.items() if k not in (*_PROMPT_KEYS, *_ID_KEYS)}
            out.items.append(PromptItem(example_id, prompt, image, {"prompt": prompt, **meta}, number))
    return out
