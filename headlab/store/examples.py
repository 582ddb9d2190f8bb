"""What went into the model for each stored example, kept beside its activations so that a browser needs
nothing else: the prompt, the token ids and their text, the image (path and thumbnail), label and answer.

Two per-shard Parquet tables, listed in shard.json and verified like every table (catalog.py):
- `inputs.parquet`, written by `Store.append(..., info=[ExampleInfo, ...])`, one row per example of the
  shard: example, condition, prompt (the text the model was given: under `no_image` the text-only prompt),
  token_ids (list<int64>: the language model's input ids of the example, padding dropped, an LVLM's image
  tokens as its processor expanded them; null for a vision model, whose tokens are its CLS prefix and patch
  grid), tokens (list<string>: each id decoded alone), image (the image path as the prompt file gives it,
  relative to the image folder of that capture), thumbnail (PNG bytes, longest side
  `headlab.inputs.THUMBNAIL_PX`), label and answer (JSON text). Every column but example and condition may
  be null. The schema is fixed (`inputs_schema`), so shards whose columns are all null read together with
  the others.
- `annotations.parquet`, written by `Store.annotate` in a shard of its own that commits no example (so it
  never competes for "first commit wins"): example, condition, field ("answer" or "label"), value (JSON
  text). For each (example, condition, field) the latest annotation wins, over the inputs table's value.

Reading (`Store.example_info`): what a store does not hold reads as None, never an error. A store written
before these tables has no token ids, tokens, image path or thumbnail; its prompt, label and answer come
from the examples table's meta (the "prompt", "label" and "answer" fields a capture put there).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from headlab.errors import StoreError

INPUTS = "inputs"
ANNOTATIONS = "annotations"
ANNOTATION_FIELDS = ("answer", "label")
INPUTS_COLUMNS = (
    "example",
    "condition",
    "prompt",
    "token_ids",
    "tokens",
    "image",
    "thumbnail",
    "label",
    "answer",
)
ANNOTATIONS_COLUMNS = ("example", "condition", "field", "value")


@dataclass(frozen=True, kw_only=True)
class ExampleInfo:
    """What went into the model for one example under one condition (module docstring: the fields)."""

    prompt: str | None = None
    token_ids: tuple[int, ...] | None = None
    tokens: tuple[str, ...] | None = None
    image: str | None = None  # the image path as the prompt file gives it
    thumbnail: bytes | None = field(default=None, repr=False)  # PNG
    label: object = None  # any JSON value
    answer: object = None  # any JSON value

    def __post_init__(self) -> None:
        if self.tokens is not None and self.token_ids is not None and len(self.tokens) != len(self.token_ids):
            raise StoreError(
                f"{len(self.tokens)} tokens for {len(self.token_ids)} token ids; give one per id"
            )
        if self.image is not None and not isinstance(self.image, str):
            raise StoreError(f"the image path must be a string, got {type(self.image).__name__}")
        if self.thumbnail is not None and not isinstance(self.thumbnail, bytes):
            raise StoreError(f"the thumbnail must be PNG bytes, got {type(self.thumbnail).__name__}")
        for name in ANNOTATION_FIELDS:
            json_text(getattr(self, name), name)


def json_text(value: object, what: str) -> str | None:
    """`value` as JSON text (None stays None); a StoreError when it is not a finite JSON value."""
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"the {what} {value!r} is not a JSON value ({err})") from None


def inputs_schema(id_kind: str) -> pa.Schema:
    """The fixed schema of inputs.parquet for a store of integer ("int") or string ("str") ids."""
    return pa.schema(
        [
            ("example", pa.int64() if id_kind == "int" else pa.large_string()),
            ("condition", pa.large_string()),
            ("prompt", pa.large_string()),
            ("token_ids", pa.list_(pa.int64())),
            ("tokens", pa.list_(pa.large_string())),
            ("image", pa.large_string()),
            ("thumbnail", pa.binary()),
            ("label", pa.large_string()),
            ("answer", pa.large_string()),
        ]
    )


def inputs_frame(ids: Sequence[int | str], condition: str, infos: Sequence[ExampleInfo]) -> pd.DataFrame:
    """The inputs table of one shard: a row per (store id, its ExampleInfo)."""
    rows = [
        {
            "example": e,
            "condition": condition,
            "prompt": i.prompt,
            "token_ids": None if i.token_ids is None else list(i.token_ids),
            "tokens": None if i.tokens is None else list(i.tokens),
            "image": i.image,
            "thumbnail": i.thumbnail,
            "label": json_text(i.label, "label"),
            "answer": json_text(i.answer, "answer"),
        }
        for e, i in zip(ids, infos, strict=True)
    ]
    return pd.DataFrame(rows, columns=list(INPUTS_COLUMNS))


def annotations_schema(id_kind: str) -> pa.Schema:
    example = pa.int64() if id_kind == "int" else pa.large_string()
    return pa.schema([("example", example), *((c, pa.large_string()) for c in ANNOTATIONS_COLUMNS[1:])])


def annotations_frame(values: Mapping, condition: str) -> pd.DataFrame:
    """The annotations table of `values` ({example: {"answer": ..., "label": ...}}), fields checked."""
    rows = []
    for example, fields in values.items():
        if not isinstance(fields, Mapping) or not fields:
            raise StoreError(
                f"example {example!r}: give its annotations as a non-empty mapping, e.g. "
                "{'answer': 'yes', 'label': 'no'}"
            )
        for name, value in fields.items():
            if name not in ANNOTATION_FIELDS:
                raise StoreError(
                    f"example {example!r}: unknown annotation {name!r}; the store keeps "
                    f"{', '.join(ANNOTATION_FIELDS)}"
                )
            rows.append((example, condition, name, json_text(value, name)))
    return pd.DataFrame(rows, columns=list(ANNOTATIONS_COLUMNS))


def latest_annotations(frame: pd.DataFrame) -> dict[tuple, dict[str, object]]:
    """(example, condition) -> {field: value} from the annotations rows in commit order (the last wins)."""
    out: dict[tuple, dict[str, object]] = {}
    if not len(frame):
        return out
    for row in frame.itertuples(index=False):
        value = None if _missing(row.value) else json.loads(row.value)
        out.setdefault((row.example, row.condition), {})[row.field] = value
    return out


def info_from_row(row: Mapping | None, meta: Mapping, notes: Mapping) -> ExampleInfo:
    """An ExampleInfo from an inputs row, the example's meta and its latest annotations (they win). Without
    an inputs row (a store written before the table) the prompt, label and answer come from the meta."""
    if row is None:
        prompt = meta.get("prompt")
        return ExampleInfo(
            prompt=prompt if isinstance(prompt, str) else None,
            label=notes.get("label", _json_value(meta.get("label"))),
            answer=notes.get("answer", _json_value(meta.get("answer"))),
        )

    def text(name: str) -> str | None:
        value = row.get(name)
        return None if _missing(value) else str(value)

    def listed(name: str, kind) -> tuple | None:
        value = row.get(name)
        return None if _missing(value) else tuple(kind(v) for v in value)

    def annotated(name: str) -> object:
        value = row.get(name)
        return notes[name] if name in notes else (None if _missing(value) else json.loads(value))

    thumbnail = row.get("thumbnail")
    return ExampleInfo(
        prompt=text("prompt"),
        token_ids=listed("token_ids", int),
        tokens=listed("tokens", str),
        image=text("image"),
        thumbnail=None if _missing(thumbnail) else bytes(thumbnail),
        label=annotated("label"),
        answer=annotated("answer"),
    )


def held_columns() -> dict:
    """The projection of inputs.parquet that `held_counts` reads: which fields each row holds."""
    return {
        "example": pads.field("example"),
        "condition": pads.field("condition"),
        "tokens": pads.field("token_ids").is_valid(),
        "images": pads.field("image").is_valid() | pads.field("thumbnail").is_valid(),
        "labels": pads.field("label").is_valid(),
        "answers": pads.field("answer").is_valid(),
    }


def held_counts(inputs: pd.DataFrame, annotations: pd.DataFrame) -> dict[str, dict[str, int]]:
    """condition -> {"tokens" / "images" / "labels" / "answers": how many examples hold it}, from the
    `held_columns` projection of the inputs rows and the annotations rows (the latest value counts)."""
    held: dict[str, set] = {"tokens": set(), "images": set(), "labels": set(), "answers": set()}
    for row in inputs.itertuples(index=False) if len(inputs) else ():
        for what in held:
            if getattr(row, what):
                held[what].add((row.example, row.condition))
    for key, fields in latest_annotations(annotations).items():
        for name, value in fields.items():
            (held[f"{name}s"].add if value is not None else held[f"{name}s"].discard)(key)
    out: dict[str, dict[str, int]] = {}
    for what, keys in held.items():
        for _, condition in keys:
            counts = out.setdefault(condition, {})
            counts[what] = counts.get(what, 0) + 1
    return out


def meta_of(examples: pd.DataFrame, example: int | str, condition: str) -> dict:
    """The meta dict a capture stored with the example (its rows of the examples table); {} if none."""
    hit = (
        examples[(examples.example == example) & (examples.condition == condition)]
        if len(examples)
        else examples
    )
    if not len(hit) or not isinstance(hit.meta.iloc[0], str):
        return {}
    try:
        meta = json.loads(hit.meta.iloc[0])
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def decode_thumbnail(png: bytes, example: int | str):
    """A stored thumbnail as an RGB PIL image; a StoreError if its (verified) bytes do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as img:
            return img.convert("RGB")
    except Exception as err:  # bytes that pass the checksum but do not decode were written so
        raise StoreError(f"the stored thumbnail of example {example!r} does not decode ({err})") from None


def _json_value(value: object) -> object:
    """`value` if it is a finite JSON value, else None (an old store's meta may hold NaN)."""
    try:
        json_text(value, "value")
    except StoreError:
        return None
    return value


def _missing(value: object) -> bool:
    """Whether a cell read back from Parquet holds nothing (None, or NaN where pandas filled a gap)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
