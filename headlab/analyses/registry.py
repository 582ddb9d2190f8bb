"""The analyses `headlab analyze NAME STORE` can run: their declared options, and how a result reaches the store.

Contract:
- Each analysis declares every option once, as an `Option`: its type (int, float, bool or str), default,
  help and allowed values (a numeric range, a list of choices, a value present in the store, or none).
- `Analysis.parse` is the one place where options are read: from command-line text or Python values, it
  checks the type, that numbers are finite and in range, that choices are known and that a value naming a
  store's tower, condition or result exists in the store, and fills in the defaults. A bad option raises
  `SelectionError` naming the analysis, the option, the value given and what the option takes. The
  adapter (`Analysis.run`) then receives typed values and casts nothing.
- `run_analysis` parses the options and checks that the store's results folder is writable before any
  work (a `StoreError` if not, so a computed result is never lost), then computes the frame and saves it as
  the store's result `name` with the typed options as its parameters.
"""

from __future__ import annotations

import enum
import importlib
import math
import numbers
import pkgutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from headlab.errors import SelectionError, StoreError
from headlab.loading import LoadedModel, load
from headlab.runs import distributed
from headlab.store import Store
from headlab.store.store import RESULTS

_NONE_TEXT = ("", "none", "null")  # how the command line says None to an optional option
_TRUE_TEXT = ("true", "yes", "on", "1")
_FALSE_TEXT = ("false", "no", "off", "0")


class StoreValues(enum.Enum):
    """What a store holds that an option may have to name (read cheaply from its examples index)."""

    TOWERS = "tower"
    CONDITIONS = "condition"
    RESULTS = "result"

    def read(self, store: Store) -> list[str]:
        if self is StoreValues.TOWERS:
            examples = store.examples()
            return sorted(examples.tower.unique()) if len(examples) else []
        if self is StoreValues.CONDITIONS:
            return store.conditions()
        return store.results()


@dataclass(frozen=True, kw_only=True)
class Option:
    """One option of an analysis. `type` is what the adapter receives (a tuple of str when `many`).

    Numbers may be bounded by `ge` / `gt` (lower, inclusive / exclusive) and `le` / `lt` (upper); text may
    be limited to `choices` (with `many`: a comma-separated subset) or to what the store holds (`among`);
    `optional` admits None, written "none" or left empty on the command line.

    Accepted: an int is integer text or a Python integer (not a bool, not 2.0); a float is number text or a
    Python real, finite (no nan, no inf); a bool is true/false, yes/no, on/off, 1/0 or a Python bool.
    """

    type: type
    default: object
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    many: bool = False
    optional: bool = False
    among: StoreValues | None = None

    def __post_init__(self) -> None:
        bounded = any(b is not None for b in (self.ge, self.gt, self.le, self.lt))
        if self.type not in (int, float, bool, str):
            raise TypeError(f"an Option's type is int, float, bool or str, not {self.type!r}")
        if bounded and self.type not in (int, float):
            raise TypeError("only int and float options take bounds")
        if (self.choices or self.among or self.many) and self.type is not str:
            raise TypeError("only str options take choices, among or many")
        if self.many and not self.choices:
            raise TypeError("a many option lists its choices")
        self.parse(self.default)  # a declaration whose default breaks its own rule fails at import

    def parse(self, value: object) -> object:
        """`value` (command-line text or a Python value) as this option's type; ValueError saying why not."""
        if value is None or (
            self.optional and isinstance(value, str) and value.strip().lower() in _NONE_TEXT
        ):
            if self.optional:
                return None
            raise ValueError("is required (it cannot be none)")
        if self.type is str:
            return self._text(value)
        if self.type is bool:
            return self._flag(value)
        return self._number(value)

    def _number(self, value: object) -> int | float:
        noun = "an integer" if self.type is int else "a number"
        if isinstance(value, str):
            try:
                number = self.type(value.strip())
            except ValueError:
                raise ValueError(f"is not {noun}") from None
        elif isinstance(value, bool) or not isinstance(
            value, numbers.Integral if self.type is int else numbers.Real
        ):
            raise ValueError(f"is not {noun}")
        else:
            number = self.type(value)
        if not math.isfinite(number):
            raise ValueError("is not a finite number")
        if not self._in_range(number):
            raise ValueError("is out of range")
        return number

    def _in_range(self, x: float) -> bool:
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    def _flag(self, value: object) -> bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else None
        if text in _TRUE_TEXT or text in _FALSE_TEXT:
            return text in _TRUE_TEXT
        raise ValueError("is not true or false")

    def _text(self, value: object) -> str | tuple[str, ...]:
        if self.many:
            parts = value.split(",") if isinstance(value, str) else value
            if not isinstance(parts, list | tuple) or not all(isinstance(p, str) for p in parts):
                raise ValueError("is not a comma-separated list")
            chosen = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))  # in order, once each
            if not chosen or any(p not in self.choices for p in chosen):
                raise ValueError("is not a list of the choices")
            return chosen
        if not isinstance(value, str):
            raise ValueError("is not text")
        if self.choices and value not in self.choices:
            raise ValueError("is not one of the choices")
        return value

    def describe(self) -> str:
        """What the option takes, e.g. "a number in (0, 1]", "one of zero, mean" (+ " or none")."""
        if self.type is bool:
            text = "true or false"
        elif self.type is str:
            listed = ", ".join(self.choices)
            text = (
                (f"a comma-separated list of {listed}" if self.many else f"one of {listed}")
                if self.choices
                else f"a {self.among.value} in the store"
                if self.among
                else "text"
            )
        else:
            text = ("an integer" if self.type is int else "a number") + self._range()
        return text + (" or none" if self.optional else "")

    def _range(self) -> str:
        low = (f"[{self.ge:g}", f">= {self.ge:g}") if self.ge is not None else None
        low = (f"({self.gt:g}", f"> {self.gt:g}") if self.gt is not None else low
        high = (f"{self.le:g}]", f"<= {self.le:g}") if self.le is not None else None
        high = (f"{self.lt:g})", f"< {self.lt:g}") if self.lt is not None else high
        if low and high:
            return f" in {low[0]}, {high[0]}"
        return f" {(low or high)[1]}" if low or high else ""


def as_text(value: object) -> str:
    """A value as the command line writes it: none, true/false, a,b; '' for empty text."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value) if value != "" else "''"


def tower_option(help: str, default: str | None = None) -> Option:
    """The `tower` option: one of the towers the store holds (None, the default, when every tower is meant)."""
    return Option(type=str, default=default, optional=default is None, among=StoreValues.TOWERS, help=help)


@dataclass(frozen=True, kw_only=True)
class Analysis:
    name: str
    description: str
    run: Callable[[Store, dict], pd.DataFrame]  # (store, typed options) -> tidy frame keyed by layer and head
    options: Mapping[str, Option]

    def parse(self, given: Mapping[str, object], store: Store | None = None) -> dict:
        """Every option, typed: the `given` ones parsed and checked (against `store` where an option names
        what the store holds), the rest at their defaults. Raises SelectionError on a bad option."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise SelectionError(
                f"analysis {self.name!r} has no option {', '.join(unknown)}; it takes "
                f"{', '.join(self.options) or 'none'} (`headlab analyze list`)"
            )
        typed = {}
        for key, option in self.options.items():
            typed[key] = self._value(key, option, given[key], store) if key in given else option.default
        return typed

    def _value(self, key: str, option: Option, value: object, store: Store | None) -> object:
        try:
            typed = option.parse(value)
        except ValueError as why:
            raise SelectionError(
                f"analysis {self.name!r}: option {key}={as_text(value)} {why}; {key} takes {option.describe()} "
                f"(default {as_text(option.default)})"
            ) from None
        if option.among is not None and typed is not None and store is not None:
            present = option.among.read(store)
            if typed not in present:
                raise SelectionError(
                    f"analysis {self.name!r}: option {key}={as_text(value)} is not a {option.among.value} in "
                    f"{store.root}; it holds {', '.join(present) or 'none'}"
                )
        return typed


ANALYSES: dict[str, Analysis] = {}


def registered() -> dict[str, Analysis]:
    """Every analysis by name, in name order: the `ANALYSES` of each module of this package that declares them (imported on
    first use; a name declared twice, or under another name, is an error). Adding an analysis is adding such a
    module (and its tests)."""
    if not ANALYSES:
        found: dict[str, Analysis] = {}
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            declared = getattr(importlib.import_module(f"{__package__}.{module.name}"), "ANALYSES", None)
            if declared is None or module.name == "registry":
                continue
            for name, entry in declared.items():
                if name in found or name != entry.name:
                    raise RuntimeError(f"analysis {name!r} is declared twice or under another name")
                found[name] = entry
        ANALYSES.update(sorted(found.items()))
    return ANALYSES


def analysis(name: str) -> Analysis:
    analyses = registered()
    if name not in analyses:
        raise SelectionError(
            f"no analysis named {name!r}; choose one of {', '.join(sorted(analyses))} (`headlab analyze list`)"
        )
    return analyses[name]


def store_model(store: Store) -> LoadedModel:
    """The model a store was captured from (its manifest's source), loaded and checked against it."""
    lm = load(store.manifest["fingerprint"]["source"])
    store.check_model(lm)
    return lm


def check_results_writable(store: Store) -> None:
    """Raise StoreError unless a result can be saved in `store` (checked before computing one)."""
    folder = store.root / RESULTS
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder} is a file, not the store's results folder; move it away and rerun")
    try:
        folder.mkdir(exist_ok=True)
        probe_write(folder)
    except OSError as err:
        raise StoreError(
            f"cannot save results in {folder} ({err.strerror or err}); nothing was computed: make the store "
            f"writable (chmod -R u+w {store.root}) or copy it somewhere writable and rerun there"
        ) from None


def probe_write(folder: Path) -> None:
    """Create and remove a file in `folder` (OSError if it cannot be written). The tests replace it to
    simulate a read-only folder where they run as root, whom chmod does not stop."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def run_analysis(name: str, store: Store, **options) -> pd.DataFrame:
    """Run analysis `name` on `store` with `options` (command-line text or Python values; the entry's
    defaults for the rest), save the frame as the store's result `name`, and return it. Options and the
    store's writability are checked before any work (SelectionError, StoreError)."""
    entry = analysis(name)
    typed = entry.parse(options, store)
    check_results_writable(store)
    frame = entry.run(store, typed)
    if distributed.current().main:  # under torchrun every process has the whole result; rank 0 saves it
        store.save_result(name, frame, typed)
    return frame
