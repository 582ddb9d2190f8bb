"""A prompt file for batch capture: JSON Lines (or one JSON array), one example per record.

Each record is an object with a prompt under "prompt" (or "text", or "question": the first of these keys
present is the prompt and must be a string), optionally an "id" (or "question_id"; default: the record's
0-based position among the file's non-blank records) and an "image" path. A record for a vision model
(`need_prompt=False`) may hold only an image: its prompt, if any, is kept as meta. A record without an image
is refused only when the model needs one (`need_images`: vision models); an LVLM's is captured text-only.
Every other field (a "label", an "answer", ...) is kept as the example's meta; "label" and "answer" are also
what the store shows as the example's label and answer.

- The file is read by `records.iter_records` (UTF-8, a leading byte-order mark ignored, bad lines listed).
- Ids follow `headlab.ids.example_id`: integers within int64 or non-empty strings, kept as given; a repeated id
  is a problem on the later line.
- Image paths are relative to `images_dir` (default: the file's own folder) and must stay inside it
  (`inputs.image_path`); the file must exist there.

Bad records never stop a run: each one is reported as "file:line: what is wrong" and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from headlab.datasets.records import Entry, iter_records
from headlab.errors import InputError
from headlab.ids import example_id, json_kind
from headlab.inputs import image_path

_PROMPT_KEYS = ("prompt", "text", "question")
_ID_KEYS = ("id", "question_id")


@dataclass(frozen=True)
class PromptItem:
    id: int | str
    prompt: str | None  # None: a vision model's image-only record
    image: Path | None  # the image file, resolved inside the image folder
    meta: dict
    line: int
    where: str = ""  # "file:line", the prefix of every message about this item
    image_name: str | None = None  # the image path as the record gives it (relative to the image folder)

    def describe(self) -> str:
        """Where the item comes from and its id, for messages: "file:line: id 42"."""
        return f"{self.where or f'line {self.line}'}: id {self.id!r}"


@dataclass
class PromptFile:
    items: list[PromptItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_prompts(
    path: str | Path,
    *,
    images_dir: str | Path | None = None,
    need_images: bool = False,
    need_prompt: bool = True,
) -> PromptFile:
    """The usable prompts of `path` and the problems of the others (module docstring: the rules).

    need_images: a record without an image is a problem (vision models). need_prompt: a record without a
    prompt is a problem (every model but a vision model, whose records may hold only an image)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    base = Path(images_dir) if images_dir is not None else path.parent
    if not base.is_dir():
        raise InputError(f"image folder {base} does not exist (or is not a folder); check --images")
    out = PromptFile()
    first: dict[int | str, str] = {}
    for index, entry in enumerate(iter_records(path)):
        if entry.obj is None:
            out.problems.append(entry.problem)
            continue
        try:
            item = _item(entry, index, base, need_images, need_prompt)
        except InputError as err:
            out.problems.append(f"{entry.where}: {err}")
            continue
        if item.id in first:
            out.problems.append(f"{entry.where}: duplicate id {item.id!r} (first at {first[item.id]})")
            continue
        first[item.id] = entry.where
        out.items.append(item)
    return out


def _item(entry: Entry, index: int, base: Path, need_images: bool, need_prompt: bool) -> PromptItem:
    """One record as a PromptItem, or an InputError saying what is wrong with it."""
    obj = entry.obj
    key = next((k for k in _PROMPT_KEYS if k in obj), None)
    prompt = None
    if key is not None and need_prompt:
        prompt = obj[key]
        if not isinstance(prompt, str):
            raise InputError(f"the prompt {key!r} is {json_kind(prompt)}, not a string")
    elif need_prompt:
        raise InputError(f"no prompt (one of {', '.join(_PROMPT_KEYS)})")
    id_key = next((k for k in _ID_KEYS if k in obj), None)
    ident = example_id(obj[id_key]) if id_key is not None else index
    image, name = None, None
    if obj.get("image") is not None and obj.get("image") != "":
        name = obj["image"]
        image = image_path(name, base)
        if not image.is_file():
            raise InputError(f"image {image} does not exist; pass --images with the folder that holds it")
    elif need_images:
        raise InputError("no image, and this model needs one")
    dropped = (*_PROMPT_KEYS, *_ID_KEYS) if need_prompt else _ID_KEYS
    meta = {k: v for k, v in obj.items() if k not in dropped}
    if prompt is not None:
        meta = {"prompt": prompt, **meta}
    return PromptItem(ident, prompt, image, meta, entry.position, entry.where, name)
