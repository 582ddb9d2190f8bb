"""The reports `headlab report NAME` runs: one declaration per report, from which its command is generated.

Contract:
- A report is one module of this package holding `REPORT = Report(...)`: its name (the command), its help,
  its options (`ReportOption`: type, help, range; the default is the pipeline's own keyword default unless
  declared), its pipeline `run` (the Python API, e.g. `pope_report(out, **options) -> ReportResult`) and
  `summary` (the console lines after a run). `registered()` finds every module that declares one, in name
  order (the order `headlab report --help` lists them); a name declared twice is an error. Adding a report is
  adding such a module (and its tests).
- `Report.check(**values)` is the one place the options' rules are checked, by the pipeline before any work
  (so the command line and Python callers get the same errors): a report folder that is a file
  (`output.check_out`), an input folder that is not one (`output.check_folder`), a number out of its range
  or not finite. Each is an `InputError` naming the option, its rule and the value given.
- `Report.parameters()`: the command's typer parameters, in declaration order; `Report.call(values)` turns
  the command-line values into the pipeline's keywords (`ReportOption.convert`, `dest`; a repeatable option
  given no value is an empty tuple).
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from headlab.errors import InputError
from headlab.reports.output import check_folder, check_out

EXIT_CODES = (
    "Exit code: 0 complete, 1 partial (a report was written; what is missing is listed in it), "
    "2 nothing answered or an error, 130 interrupted."
)
_FROM_RUN = object()  # a default read from the pipeline's signature


@dataclass(frozen=True, kw_only=True)
class ReportOption:
    """One option of a report: `--name` on the command line (underscores as dashes), `dest` (default: `name`)
        in the pipeline. `type` is int, float, str or Path; `many` makes it repeatable. Numbers may be bounded by
        `ge` / `gt`; `rule` says the range in words for errors (default "at least GE" / "a positive number") and
        `label` names the option there (default the flag). `folder` is "out" for the report folder and "in" for
        an input folder that must exist. `aliases`: more flags for it (`--n` is also `--first`, which torchrun's
    own parser does not take for an ambiguous abbreviation of its options)."""

    name: str
    type: type
    help: str
    default: object = _FROM_RUN
    many: bool = False
    ge: float | None = None
    gt: float | None = None
    rule: str = ""
    label: str = ""
    folder: str = ""
    dest: str = ""
    convert: Callable[[object], object] | None = None
    aliases: tuple[str, ...] = ()  # more spellings of the flag

    def __post_init__(self) -> None:
        if self.type not in (int, float, str, Path):
            raise TypeError(f"a ReportOption's type is int, float, str or Path, not {self.type!r}")
        if (self.ge is not None or self.gt is not None) and self.type not in (int, float):
            raise TypeError("only int and float options take bounds")
        if self.folder not in ("", "out", "in") or (self.folder and self.type is not Path):
            raise TypeError("folder is 'out' or 'in', on a Path option")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def keyword(self) -> str:
        return self.dest or self.name

    def check(self, value: object) -> None:
        """InputError when `value` breaks this option's rule (module docstring); None passes."""
        if value is None:
            return
        if self.folder == "out":
            check_out(value, self.flag)
        elif self.folder == "in":
            check_folder(value, self.flag)
        elif not self._in_range(value):
            raise InputError(f"{self.label or self.flag} must be {self._rule()}, got {value}")

    def _in_range(self, value) -> bool:
        if self.ge is None and self.gt is None:
            return True
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
        )

    def _rule(self) -> str:
        if self.rule:
            return self.rule
        if self.ge is not None:
            return f"at least {self.ge:g}"
        return "a positive number" if self.gt == 0 else f"more than {self.gt:g}"


MODEL = ReportOption(name="model", type=str, help="local model directory, hub id or zoo:NAME")


def out_option(holds: str) -> ReportOption:
    """The report folder option, `--out`, saying what the folder holds."""
    return ReportOption(name="out", type=Path, folder="out", help=f"report folder ({holds})")


@dataclass
class ReportResult:
    """What a report's pipeline returns: the HTML path, every number, and the run that made them."""

    html: Path
    report: dict
    run: object

    @property
    def outcome(self) -> dict:
        return self.report["outcome"]


@dataclass(frozen=True, kw_only=True)
class Report:
    name: str
    help: str
    options: tuple[ReportOption, ...]
    run: Callable[..., ReportResult]  # the pipeline: run(**keywords, progress=...) -> ReportResult
    summary: Callable[[ReportResult, Path], list[str]]  # console lines after a run (`out` as given)
    unit: str = "question"  # what the progress bars count
    epilog: str | None = EXIT_CODES

    def check(self, **values: object) -> None:
        """Each given option's rule, in declaration order (module docstring)."""
        for option in self.options:
            if option.name in values:
                option.check(values[option.name])

    def parameters(self) -> list[inspect.Parameter]:
        """The command's keyword parameters: each option annotated for typer, with its default."""
        import typer

        defaults = inspect.signature(self.run).parameters
        params = []
        for option in self.options:
            default = option.default
            if option.many:
                default = None
            elif default is _FROM_RUN:
                default = defaults[option.keyword].default
            kind = list[option.type] if option.many else option.type
            flags = (option.flag, *option.aliases) if option.aliases else ()
            annotation = Annotated[
                kind | None if default is None else kind, typer.Option(*flags, help=option.help)
            ]
            params.append(
                inspect.Parameter(
                    option.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
                )
            )
        return params

    def call(self, values: dict) -> dict:
        """The command-line `values` as the pipeline's keywords (module docstring)."""
        keywords = {}
        for option in self.options:
            value = values[option.name]
            if option.many:
                value = tuple(value or ())
            keywords[option.keyword] = option.convert(value) if option.convert else value
        return keywords


REPORTS: dict[str, Report] = {}


def registered() -> dict[str, Report]:
    """Every report by name, in name order: the `REPORT` of each module of this package (imported on first
    use)."""
    if not REPORTS:
        found: dict[str, Report] = {}
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            report = getattr(importlib.import_module(f"{__package__}.{module.name}"), "REPORT", None)
            if report is None:
                continue
            if report.name in found:
                raise RuntimeError(f"report {report.name!r} is declared twice")
            found[report.name] = report
        REPORTS.update(sorted(found.items()))
    return REPORTS
