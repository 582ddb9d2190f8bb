"""The POPE report's pictures of where an LVLM looks, on a few images: per-head VHD (vision-aware head
divergence, from a store), attention mass on the image tokens, and VAR's visual-sink scores.

Contract:
- `image_maps` opens the first distinct images of a split (`inputs.open_image`; one that does not open is
  listed in the notes and left out) and hands them as `Pick`s (image + prompt) to `vhd_heatmap_data` and
  `attention_maps`. A pick that fails there is listed in the returned notes and left out; it never stops the
  others or the report.
- The VHD capture lives in `OUT/vhd_store` and resumes like any batch capture: a rerun captures only the
  picks not yet committed (under both conditions "with_image" and "no_image", example id = the pick's
  index). The store is rebuilt (and a note says why) when it cannot be resumed: it is unreadable or of
  another model, the picks changed (`OUT/vhd_picks.json` lists them: image path and prompt), or a capture
  stopped between its two conditions. No state of the folder blocks a rerun.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from headlab.errors import HeadlabError, InputError, StoreError
from headlab.reports.output import reason, write_text_atomic

VHD_STORE = "vhd_store"
VHD_PICKS = "vhd_picks.json"


@dataclass(frozen=True, kw_only=True)
class Pick:
    key: dict  # {"image": path, "prompt": text}: what identifies the pick across runs
    prompt: str
    image: object  # an opened RGB PIL image


def image_maps(lm, split, out: Path, n_images: int, tau: float) -> tuple[object, dict, list[str]]:
    """(VHD per head or None, attention maps, notes) on the first `n_images` distinct images of `split`
    that open (module docstring)."""
    from headlab.inputs import open_image
    from headlab.reports.pope import prompt_for

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
            Pick(key={"image": str(path), "prompt": prompt_for(q)}, prompt=prompt_for(q), image=image)
        )
    if not picks:
        return None, {}, notes
    vhd, vhd_notes = vhd_heatmap_data(lm, picks, out)
    maps, map_notes = attention_maps(lm, picks, tau=tau)
    return vhd, maps, notes + vhd_notes + map_notes


def vhd_heatmap_data(lm, picks: list[Pick], out: Path) -> tuple[pd.DataFrame | None, list[str]]:
    """Per-head VHD (layer, head, vhd, ...) over the picks, captured into `out/vhd_store` (module docstring),
    and notes on what was rebuilt or left out."""
    from headlab.analyses.vhd import capture_vhd_conditions, vhd_per_head

    notes: list[str] = []
    store = _vhd_store(lm, out, picks, notes)
    have = store.committed("with_image")
    for i, pick in enumerate(picks):
        if i in have:
            continue
        try:
            capture_vhd_conditions(lm, store, [pick.prompt], [pick.image], examples=[i])
        except Exception as err:  # one image's failure is listed, never stops the report
            notes.append(f"VHD: image {pick.key['image']} left out ({reason(err)})")
    try:
        return vhd_per_head(store), notes
    except HeadlabError as err:  # nothing under both conditions (every pick failed)
        notes.append(f"VHD heat map left out: {err}")
        return None, notes


def _vhd_store(lm, out: Path, picks: list[Pick], notes: list[str]):
    from headlab.store import Store

    root, keys = out / VHD_STORE, [p.key for p in picks]
    if root.exists():
        reason = _unresumable(lm, root, out / VHD_PICKS, keys)
        if reason is None:
            return Store.open(root, lm)
        shutil.rmtree(root)
        notes.append(f"{root} was rebuilt: {reason}")
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
        with_image, no_image = store.committed("with_image"), store.committed("no_image")
    except StoreError as err:
        return str(err)
    if with_image != no_image:
        return "a capture stopped between its two conditions"
    if not with_image <= set(range(len(keys))):
        return "it holds examples that are not among the picks"
    return None


@torch.no_grad()
def attention_maps(lm, picks: list[Pick], *, tau: float = 20.0) -> tuple[dict, list[str]]:
    """Over the picks: each language-model head's attention mass on the image tokens at the last query (mean
    over images), and VAR's visual-sink score phi = max over the sink dimensions |x_d| / RMS(x) of every image
    token entering each layer (mean over images; sink dimensions found on the BOS token). Tokens with
    phi > tau are visual sinks. Returns the maps ({} when no pick went through) and notes."""
    masses, phis, notes = [], [], []
    dims = None
    for pick in picks:
        try:
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
    import headlab as hl
    from headlab.inputs import prepare
    from headlab.interventions.var import sink_dims_from_states, sink_scores

    inputs = prepare(lm, [pick.prompt], [pick.image])
    with hl.capture(lm, stats=hl.Stats(which=("mass",), towers=("lm",))) as rec:
        out = lm.model(**inputs, output_hidden_states=True)
    frame = rec.head_stats
    mass = frame[(frame.stat == "mass_last") & (frame.role == "image")]
    states = out.hidden_states[:-1]  # the input of each language-model layer
    dims = dims or sink_dims_from_states(states, 0)
    image = inputs["input_ids"][0] == lm.image_token_id
    phi = torch.stack([sink_scores(h[0, image], dims) for h in states])  # [layer, image token]
    return mass, phi, dims


def render_maps(page, maps: Mapping, vhd) -> None:
    """The maps (from `attention_maps`) and the VHD heat map as sections of a `reports.html.Page`."""
    import plotly.graph_objects as go

    if maps.get("image_mass"):
        frame = pd.DataFrame(maps["image_mass"]).pivot(index="layer", columns="head", values="mass")
        fig = go.Figure(go.Heatmap(z=frame.values, x=list(frame.columns), y=list(frame.index)))
        fig.update_layout(
            title=f"attention mass on the image tokens at the last query (mean over {maps['images']} images)",
            xaxis_title="head",
            yaxis_title="layer",
        )
        page.heading("Image attention")
        page.figure(fig)
    if maps.get("visual_sinks"):
        sinks = maps["visual_sinks"]
        fig = go.Figure(go.Heatmap(z=sinks["phi"], colorscale="Magma"))
        fig.update_layout(
            title=f"visual-sink score phi per layer and image token (sink dims {sinks['dims']}; "
            f"phi > {sinks['tau']:g} = visual sink)",
            xaxis_title="image token (row-major over the patch grid)",
            yaxis_title="layer input",
        )
        page.heading("Visual sinks")
        page.paragraph(f"visual sinks per layer: {sinks['sinks_per_layer']}")
        page.figure(fig)
    if vhd is not None and len(vhd):
        grid = vhd.pivot(index="layer", columns="head", values="vhd")
        fig = go.Figure(
            go.Heatmap(z=grid.values, x=list(grid.columns), y=list(grid.index), colorscale="Viridis")
        )
        fig.update_layout(title="VHD per head (mean over images)", xaxis_title="head", yaxis_title="layer")
        page.heading("Vision-aware head divergence")
        page.figure(fig)
