"""Example ids as the store keeps them: integers or strings, as given, one kind per store.

The rule for one id is `headlab.ids.example_id` (a Python int within int64, or a non-empty str
kept verbatim: "000000001" stays a string and never equals 1). Through the Python API a numpy integer (as
read back from a store's tables) counts as an int. A store holds ids of one kind, fixed by its first
committed shard (`Store.id_kind`: "int", "str", or None while it is empty); ids of the other kind are a
`StoreError` naming the kind the store holds. Nothing here ever calls `int()` on a string id.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from headlab.errors import InputError, StoreError
from headlab.ids import example_id

KIND_WORDS = {"int": "integer", "str": "string"}


def kind_of(ident: int | str) -> str:
    """The kind ("int" or "str") of a checked id."""
    return "str" if isinstance(ident, str) else "int"


def checked_id(value: object) -> int | str:
    """`value` as an example id, or a StoreError saying what an id may be."""
    if isinstance(value, np.integer):
        value = int(value)
    elif isinstance(value, np.str_):
        value = str(value)
    try:
        return example_id(value)
    except InputError as err:
        raise StoreError(f"example {value!r}: {err}") from None


def checked_ids(values: Iterable[object], store_kind: str | None) -> list[int | str]:
    """Ids given to one store call: each valid, all of one kind, and of the store's kind when it has one."""
    ids = [checked_id(v) for v in values]
    kinds = {kind_of(i) for i in ids}
    if len(kinds) > 1:
        raise StoreError(
            f"example ids {describe_ids(ids)} mix integers and strings; one store holds one kind"
        )
    if kinds and store_kind is not None and kinds != {store_kind}:
        (kind,) = kinds
        a = "a string" if kind == "str" else "an integer"
        raise StoreError(
            f"{examples_are(ids)} {a if len(ids) == 1 else KIND_WORDS[kind] + 's'} but this store holds "
            f"{KIND_WORDS[store_kind]} ids; use {KIND_WORDS[store_kind]} ids here, or another store for these"
        )
    return ids


def describe_ids(ids: Iterable[int | str], n: int = 10) -> str:
    """A short sorted listing of ids for messages: "3, 4, 'x' (and 12 more)"."""
    ordered = sorted(ids, key=lambda i: (kind_of(i), i))
    shown = ", ".join(repr(i) for i in ordered[:n])
    return f"{shown} (and {len(ordered) - n} more)" if len(ordered) > n else shown


def examples_are(ids: Iterable[int | str]) -> str:
    """ "example 12 is" or "examples 10, 11 are", for messages."""
    ids = list(ids)
    return f"example {ids[0]!r} is" if len(ids) == 1 else f"examples {describe_ids(ids)} are"


def typed_id(text: str, store_kind: str | None) -> int | str:
    """An id typed on a command line, as the store keeps it: digits ("42", "-3") are an integer in a store of
    integer ids, and any text is kept verbatim in a store of string ids ("000042" stays "000042")."""
    if store_kind == "int":
        stripped = text.strip()
        digits = stripped[1:] if stripped.startswith("-") else stripped
        if not digits.isdigit():
            raise StoreError(f"example ids of this store are integers; {text!r} is not one")
        return checked_id(int(stripped))
    return checked_id(text)
