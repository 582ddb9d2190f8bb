"""The model runs behind the POPE report's pictures of where an LVLM looks, on a few images: the images picked,
the attention mass on the image tokens, VAR's visual-sink scores, and the store the VHD capture resumes.

Contract:
- `pick_images` opens the first distinct images of a split (`inputs.open_image`); one that does not open is
  listed in the returned notes and left out. A `Pick` is an opened image with its prompt and the key that
  identifies it across runs (image path and prompt).
- `attention_maps`: a pick that fails is listed in the notes and left out; it never stops the others.
- `vhd_store(lm, out, picks, notes)`: the store `OUT/vhd_store` a VHD capture of the picks resumes (example id
  = the pick's index; conditions "with_image" and "no_image"). It is rebuilt, with a note saying why, when it
  cannot be resumed: it is unreadable or of another model, the picks changed (`OUT/vhd_picks.json` lists
  them), a capture stopped between its two conditions, or it holds examples that are not picks. No state of
  the folder blocks a rerun.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from headlab.conditions import NO_IMAGE, WITH_IMAGE  # the names `headlab capture` and `analyze vhd` use
from headlab.datasets.pope import PopeQuestion
from headlab.errors import InputError, StoreError
from headlab.runs.answering import Split, prompt_for
from headlab.runs.atomic import write_text_atomic
from headlab.runs.outcome import reason

VHD_STORE = "vhd_store"
VHD_PICKS = "vhd_picks.json"


@dataclass(frozen=True, kw_only=True)
class Pick:
    key: dict  # {"image": path, "prompt": text}: what identifies the pick across runs
    prompt: str
    image: object  # an opened RGB PIL image
    question: PopeQuestion | None = None  # the question the prompt is (its label; its answers in the log)


def pick_images(lm, split: Split, n_images: int) -> tuple[list[Pick], list[str]]:
    """The first `n_images` distinct images of `split` that open, as picks, and notes on those left out."""
    from headlab.inputs import open_image

    picks, seen, notes = [], set(), []
    for q in split.questions:
        if len(picks) >= n_images:
            break
        if q.image in seen:
            continue
        seen.add(q.image)
        try:
            path = split.image_file(q)
            image = open_image(path)
        except InputError as err:
            notes.append(f"image maps: question {q.question_id!r} left out: {err}")
            continue
        picks.append(
            Pick(
                key={"image": str(path), "prompt": prompt_for(lm, q)},
                prompt=prompt_for(lm, q),
                image=image,
                question=q,
            )
        )
    return picks, notes


def vhd_store(lm, out: Path, picks: list[Pick], notes: list[str]):
    """The VHD store of `out` for these picks: resumed, or rebuilt with a note (module docstring)."""
    from headlab.store import Store

    root, keys = out / VHD_STORE, [p.key for p in picks]
    if root.exists():
        why = _unresumable(lm, root, out / VHD_PICKS, keys)
        if why is None:
            return Store.open(root, lm)
        shutil.rmtree(root)
        notes.append(f"{root} was rebuilt: {why}")
    write_text_atomic(out / VHD_PICKS, json.dumps(keys, indent=1))
    return Store.create(root, lm)


def _unresumable(lm, root: Path, listing: Path, keys: list[dict]) -> str | None:
    """Why the VHD store at `root` cannot be resumed for these picks, or None when it can."""
    from headlab.store import Store

    try:
        recorded = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{listing.name} (the images it was made from) is missing or unreadable"
    if recorded != keys:
        return "other images were picked"
    try:
        store = Store.open(root, lm)
        with_image, no_image = store.committed(WITH_IMAGE), store.committed(NO_IMAGE)
    except StoreError as err:
        return str(err)
    if with_image != no_image:
        return "a capture stopped between its two conditions"
    if not with_image <= set(range(len(keys))):
        return "it holds examples that are not among the picks"
    return None


def attention_maps(lm, picks: list[Pick], *, tau: float = 20.0) -> tuple[dict, list[str]]:
    """Over the picks: each language-model head's attention mass on the image tokens at the last query (mean
    over images), and VAR's visual-sink score phi = max over the sink dimensions |x_d| / RMS(x) of every image
    token entering each layer (mean over images; sink dimensions found on the BOS token). Tokens with
    phi > tau are visual sinks. Returns the maps ({} when no pick went through) and notes."""
    import pandas as pd
    import torch

    masses, phis, notes = [], [], []
    dims = None
    for pick in picks:
        try:
            with torch.no_grad():
                mass, phi, dims = _one_map(lm, pick, dims)
        except Exception as err:  # one image's failure is listed, never stops the report
            notes.append(f"image attention: image {pick.key['image']} left out ({reason(err)})")
            continue
        masses.append(mass)
        phis.append(phi)
    if not masses:
        return {}, notes
    mass = pd.concat(masses).groupby(["layer", "head"]).value.mean().reset_index()
    phi = torch.stack(phis).mean(0)
    grid = list(lm.tower("vision").grid) if "vision" in {t.name for t in lm.towers} else None
    return {
        "images": len(masses),
        "image_mass": mass.rename(columns={"value": "mass"}).to_dict(orient="records"),
        "visual_sinks": {
            "dims": list(dims),
            "tau": tau,
            "phi": phi.tolist(),
            "sinks_per_layer": (phi > tau).sum(-1).tolist(),
            "grid": grid,
        },
    }, notes


def _one_map(lm, pick: Pick, dims):
    import torch

    from headlab.inputs import prepare
    from headlab.interventions.var import sink_dims_from_states, sink_scores
    from headlab.probe import Stats, capture

    inputs = prepare(lm, [pick.prompt], [pick.image])
    with capture(lm, stats=Stats(which=("mass",), towers=("lm",))) as rec:
        out = lm.model(**inputs, output_hidden_states=True)
    frame = rec.head_stats
    mass = frame[(frame.stat == "mass_last") & (frame.role == "image")]
    states = out.hidden_states[:-1]  # the input of each language-model layer
    dims = dims or sink_dims_from_states(states, 0)
    image = inputs["input_ids"][0] == lm.image_token_id
    phi = torch.stack([sink_scores(h[0, image], dims) for h in states])  # [layer, image token]
    return mass, phi, dims
