"""Example ids: the one rule every reader and writer of examples follows (data files, stores, answer logs).

An id is a Python `int` within int64 or a non-empty `str`, kept as given ("000000001" stays a string and
never equals 1; "COCO_val2014_000000000042" and uuids are fine). Booleans, floats (1.7 and also 1.0), null,
NaN/Infinity, arrays, objects and integers outside int64 raise `InputError` saying what to write instead.
"""

from __future__ import annotations

import json

from headlab.errors import InputError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def json_kind(value: object) -> str:
    """A JSON value's kind in JSON's words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"the number {json.dumps(value)}"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def example_id(value: object) -> int | str:
    """`value` as an example id (module docstring: the rule), or an InputError saying what is wrong."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InputError(
                f"id {value} is outside the 64-bit integer range; quote it to keep it as a string id"
            )
        return value
    if isinstance(value, str):
        if not value:
            raise InputError("id is an empty string; give every example a non-empty id")
        return value
    raise InputError(
        f"id is {json_kind(value)}; an id is an integer (without a decimal point) or a string, kept as "
        'given: write it as 42 or "42"'
    )
