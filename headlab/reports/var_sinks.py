"""What VAR did in an LVLM report's run, and what the report says about it.

Contract:
- `OUT/var_sinks.json` (`VAR_SINKS`) keeps what VAR saw and did for each answer given under "var"
  (`runs.answering.VarSeen`: sink tokens and the largest sink score phi per layer, attention rows
  redistributed). It is a `runs.cache.PartsCache` tied to the model's fingerprint, one entry per (tau,
  split) holding one record per question; the first record of a question wins. `update(out, identity, tau,
  seen)` adds a run's records and returns every record of this tau, so a rerun that reuses the answers
  reuses their counts. The file never blocks a report: when it cannot be read or written, a note says so
  and the counts it held are missing (the summary then counts those answers as not observed).
- `var_summary(records, answered, tau)` sums the records of the answers the report holds under "var"
  (`answered`: {split: question ids}) into report.json's "var" entry, with `statement`: the sentence the
  document shows, computed from the counts, never assumed:
  * no attention row redistributed and no visual sink: "VAR found no visual sink tokens above tau=T in any
    layer on this model: the condition equals `none`", with the largest phi per layer, and, when tau is at
    least sqrt(hidden size) (the bound on phi), that no token can pass it;
  * visual sinks but no row redistributed: that no row passed VAR's image-centric test, so the condition
    equals `none` too;
  * rows redistributed: how many, in how many answers.
  Answers without a record (given before headlab counted them, or under another tau) are "not observed",
  and the statement says how many of the answers it covers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from headlab.errors import StoreError

VAR_SINKS = "var_sinks.json"


def _key(tau: float, split: str) -> str:
    return f"tau={tau!r}/{split}"


def update(out: Path, identity, tau: float, seen: Sequence) -> tuple[list[dict], list[str]]:
    """Add `seen` (VarSeen records of this run) to `out/var_sinks.json`; (every record of `tau`, notes)."""
    from headlab.runs.cache import PartsCache

    path, notes = Path(out) / VAR_SINKS, []
    try:
        cache = PartsCache(path, identity)
    except StoreError as err:
        notes.append(f"{VAR_SINKS} could not be read ({err}); VAR's counts of earlier answers are missing")
        path.unlink(missing_ok=True)
        cache = PartsCache(path, identity)
    by_split: dict[str, list[dict]] = {}
    for record in seen:
        by_split.setdefault(record.split, []).append(asdict(record))
    try:
        for split, records in by_split.items():
            have = cache.get(_key(tau, split)) or []
            known = {r["question_id"] for r in have}
            cache.put(_key(tau, split), have + [r for r in records if r["question_id"] not in known])
    except StoreError as err:
        notes.append(f"{VAR_SINKS} could not be written ({err}); VAR's counts of this run are not kept")
    prefix = _key(tau, "")
    records = [r for key, rs in cache.entries.items() if key.startswith(prefix) for r in rs]
    return records, notes


def var_summary(records: Sequence[Mapping], answered: Mapping[str, set], tau: float) -> dict:
    """report.json's "var" entry over the answers in `answered` (module docstring)."""
    kept = [r for r in records if r["question_id"] in answered.get(r["split"], ())]
    layers = list(kept[0]["layers"]) if kept else []
    width = max((r["width"] for r in kept), default=0)
    summary = {
        "tau": tau,
        "answers": sum(len(ids) for ids in answered.values()),
        "observed": len(kept),
        "layers": layers,
        "prefills": sum(r["prefills"] for r in kept),
        "answers_with_sinks": sum(any(r["sinks"]) for r in kept),
        "answers_edited": sum(r["rows"] > 0 for r in kept),
        "rows_redistributed": sum(r["rows"] for r in kept),
        "sink_tokens": [sum(r["sinks"][i] for r in kept) for i in range(len(layers))],
        "visual_sink_tokens": [sum(r["visual_sinks"][i] for r in kept) for i in range(len(layers))],
        "max_phi": [max(r["max_phi"][i] for r in kept) for i in range(len(layers))],
        "hidden_size": width,
        "phi_bound": math.sqrt(width) if width else None,
    }
    summary["statement"] = statement(summary)
    return summary


def statement(s: Mapping) -> str | None:
    """The sentence on what VAR did (module docstring); None when nothing was answered under "var"."""
    tau = f"{s['tau']:g}"
    if not s["answers"]:
        return None
    if not s["observed"]:
        return (
            f"VAR's effect was not observed: its {s['answers']} answers were given by an earlier run that did "
            f"not count its sink tokens at tau={tau}; answer again into a new --out folder to count them."
        )
    coverage = f"{s['observed']} answers given under var" + (
        f" of {s['answers']} (the others were not observed)" if s["observed"] < s["answers"] else ""
    )
    if s["rows_redistributed"]:
        return (
            f"VAR redistributed {s['rows_redistributed']} attention rows (head x query) in "
            f"{s['answers_edited']} of the {coverage}; sink tokens above tau={tau}: "
            f"{sum(s['visual_sink_tokens'])} visual, {sum(s['sink_tokens']) - sum(s['visual_sink_tokens'])} "
            "text, over all layers and answers."
        )
    phi = ", ".join(f"L{layer} {v:.2f}" for layer, v in zip(s["layers"], s["max_phi"], strict=True))
    detail = f"counted over the {coverage}; the largest sink score phi per layer: {phi}"
    if s["phi_bound"] is not None and s["tau"] >= s["phi_bound"]:
        detail += (
            f"; phi cannot exceed sqrt(hidden size {s['hidden_size']}) = {s['phi_bound']:.2f} on this model, "
            f"so no token can pass tau={tau}"
        )
    if not sum(s["visual_sink_tokens"]):
        text = sum(s["sink_tokens"])
        also = f" ({text} text sink tokens, but no attention row was redistributed)" if text else ""
        return (
            f"VAR found no visual sink tokens above tau={tau} in any layer on this model{also}: "
            f"the condition equals `none` ({detail})."
        )
    return (
        f"VAR found {sum(s['visual_sink_tokens'])} visual sink tokens above tau={tau}, but no attention row "
        f"passed its image-centric test: nothing was redistributed, the condition equals `none` ({detail})."
    )
