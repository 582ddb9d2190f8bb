"""Capture conditions: the names under which a store keeps the same examples side by side.

This module is the one place that spells the condition names headlab's own captures, analyses and reports
share: `WITH_IMAGE` ("with_image") and `NO_IMAGE` ("no_image") are what `headlab capture --condition`
records, what `headlab analyze vhd` compares by default and what the POPE report's VHD store holds.

A condition name is `BASE` or `BASE+INTERVENTION`:
- BASE `no_image`: an LVLM example without its image: the image placeholder is removed from the prompt and
  no pixels are given (`headlab.inputs.text_only_prompt`, the rule VHD is defined with). A vision model has
  no text, so it has no `no_image` condition.
- any other BASE (`with_image`, `default`, a name of your own): the example as its line gives it, with its
  image when the line has one (an LVLM line without an image is captured text-only under every condition).
- `+vhr`, `+var`, `+paint`: the capture runs inside `intervene(lm, VHR())` / `intervene(lm, VAR(...))` /
  `intervene(lm, PAINT())`, the interventions of the POPE report's conditions of the same names
  (`runs.answering.condition_interventions` builds them). All act on the image, so they need an LVLM and a
  BASE other than `no_image`.
Names are made of letters, digits and `_ - .`, with at most one `+`; a name within a typo of `with_image` or
`no_image` (e.g. `with-image`) is refused rather than read as a name of your own; `parse_conditions` reads a command
line's repeated or comma-separated values and refuses a repeated name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from headlab.errors import InputError

WITH_IMAGE = "with_image"
NO_IMAGE = "no_image"
DEFAULT = "default"  # what `headlab capture` records without --condition: each line as given
INTERVENTIONS = ("vhr", "var", "paint")  # the suffixes after "+"; "none" (the plain model) has none
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True, kw_only=True)
class Condition:
    """One parsed condition name (module docstring): `image` False means text-only (`no_image`)."""

    name: str
    image: bool
    intervention: str | None  # one of INTERVENTIONS, or None for the plain model

    @property
    def base(self) -> str:
        return self.name.split("+", 1)[0]


def parse_condition(name: str) -> Condition:
    """The condition `name` stands for, or an InputError saying what a condition name may be."""
    base, plus, intervention = name.partition("+")
    if not _NAME.fullmatch(base) or (plus and not _NAME.fullmatch(intervention)):
        raise InputError(
            f"condition {name!r} is not a condition name: use letters, digits and _ - . with at most one "
            f"'+' before an intervention (e.g. {WITH_IMAGE}, {NO_IMAGE}, {WITH_IMAGE}+vhr)"
        )
    if plus and intervention not in INTERVENTIONS:
        hint = "leave out '+none' (the plain model has no suffix)" if intervention == "none" else ""
        raise InputError(
            f"condition {name!r}: unknown intervention {intervention!r}; choose from "
            f"{', '.join(INTERVENTIONS)}{'; ' + hint if hint else ''}"
        )
    near = difflib.get_close_matches(base, (WITH_IMAGE, NO_IMAGE), n=1, cutoff=0.8)
    if near and near[0] != base:  # "with-image", "no_images": a typo would silently mean "lines as given"
        raise InputError(
            f"condition {name!r} looks like {near[0]!r} but is not it; write {near[0]!r} (or a name that is not "
            "so close to it, for a condition of your own)"
        )
    if plus and base == NO_IMAGE:
        raise InputError(
            f"condition {name!r}: {intervention.upper()} acts on the image tokens, and {NO_IMAGE} has none; "
            f"use {WITH_IMAGE}+{intervention}"
        )
    return Condition(name=name, image=base != NO_IMAGE, intervention=intervention or None)


def parse_conditions(values: Iterable[str]) -> tuple[Condition, ...]:
    """Conditions from repeated and/or comma-separated values ("with_image,no_image"), in order; a name
    given twice is an InputError, and so is an empty list."""
    names = [part.strip() for value in values for part in value.split(",")]
    if not names or any(not n for n in names):
        raise InputError(f"--condition takes names separated by commas, e.g. {WITH_IMAGE},{NO_IMAGE}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"condition {twice[0]!r} is given twice; give each condition once")
    return tuple(parse_condition(n) for n in names)
