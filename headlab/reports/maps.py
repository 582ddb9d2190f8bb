"""The POPE report's pictures of where an LVLM looks, on a few images: per-head VHD (vision-aware head
divergence, from a store), attention mass on the image tokens, and VAR's visual-sink scores.

Contract: `image_maps` picks the first distinct images of a split that open (`runs.image_maps.pick_images`),
captures the VHD conditions of each pick not yet in `OUT/vhd_store` (`runs.image_maps.vhd_store`: resumed,
or rebuilt with a note) and computes the attention maps. A pick that fails anywhere is listed in the notes
and left out; it never stops the others or the report. `maps_section` adds the three heat maps to a report
document.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from headlab.conditions import WITH_IMAGE
from headlab.errors import HeadlabError
from headlab.reports.document import Document
from headlab.runs.answering import Split
from headlab.runs.outcome import reason


def image_maps(
    lm, split: Split, out: Path, n_images: int, tau: float, answers: Mapping | None = None
) -> tuple[object, dict, list[str]]:
    """(VHD per head or None, attention maps, notes) on the first `n_images` distinct images of `split`
    that open (module docstring). `answers`: question id -> the plain model's answer, stored with each
    pick's label in the VHD store (for the browser)."""
    from headlab.runs.image_maps import attention_maps, pick_images

    picks, notes = pick_images(lm, split, n_images)
    if not picks:
        return None, {}, notes
    vhd, vhd_notes = vhd_heatmap_data(lm, picks, out, answers or {})
    maps, map_notes = attention_maps(lm, picks, tau=tau)
    return vhd, maps, notes + vhd_notes + map_notes


def vhd_heatmap_data(lm, picks, out: Path, answers: Mapping):
    """Per-head VHD (layer, head, vhd, ...) over the picks, captured into `out/vhd_store` (module docstring),
    and notes on what was rebuilt or left out. Each pick captured now is annotated under `with_image` with
    its question's label and the plain model's answer (`answers`, question id -> text) when known."""
    from headlab.analyses.vhd import capture_vhd_conditions, vhd_per_head
    from headlab.runs.image_maps import NO_IMAGE, WITH_IMAGE, vhd_store

    notes: list[str] = []
    store = vhd_store(lm, out, picks, notes)
    have = store.committed(WITH_IMAGE)
    for i, pick in enumerate(picks):
        if i in have:
            continue
        try:
            capture_vhd_conditions(
                lm,
                store,
                [pick.prompt],
                [pick.image],
                examples=[i],
                with_condition=WITH_IMAGE,
                without_condition=NO_IMAGE,
            )
        except Exception as err:  # one image's failure is listed, never stops the report
            notes.append(f"VHD: image {pick.key['image']} left out ({reason(err)})")
    _annotate(store, picks, set(have), answers, notes)
    try:
        return vhd_per_head(store, with_condition=WITH_IMAGE, without_condition=NO_IMAGE), notes
    except HeadlabError as err:  # nothing under both conditions (every pick failed)
        notes.append(f"VHD heat map left out: {err}")
        return None, notes


def _annotate(store, picks, had: set, answers: Mapping, notes: list[str]) -> None:
    """Store the label and the plain model's answer of each pick captured in this run (module docstring)."""
    captured = store.committed(WITH_IMAGE) - had
    values = {}
    for i in sorted(captured):
        q = picks[i].question
        if q is not None:
            answer = answers.get(q.question_id)
            values[i] = {"label": q.label} | ({"answer": answer} if answer is not None else {})
    if values:
        try:
            store.annotate(values, condition=WITH_IMAGE)
        except HeadlabError as err:  # the labels are for the browser; the report does not need them
            notes.append(f"VHD store: labels and answers not stored ({err})")


def maps_section(doc: Document, maps: Mapping, vhd) -> None:
    """The maps (from `runs.image_maps.attention_maps`) and the VHD heat map as sections of `doc`, layers and
    heads on categorical axes (`reports.figures`)."""
    import pandas as pd
    import plotly.graph_objects as go

    from headlab.reports.figures import categorical_axes, layer_head_heatmap, layer_labels

    if maps.get("image_mass"):
        frame = pd.DataFrame(maps["image_mass"]).pivot(index="layer", columns="head", values="mass")
        title = f"attention mass on the image tokens at the last query (mean over {maps['images']} images)"
        doc.heading("Image attention")
        doc.figure(layer_head_heatmap(frame, title=title))
    if maps.get("visual_sinks"):
        sinks = maps["visual_sinks"]
        tokens = [str(i) for i in range(len(sinks["phi"][0]) if sinks["phi"] else 0)]
        fig = go.Figure(
            go.Heatmap(z=sinks["phi"], x=tokens, y=layer_labels(range(len(sinks["phi"]))), colorscale="Magma")
        )
        fig.update_layout(
            title=f"visual-sink score phi per layer and image token (sink dims {sinks['dims']}; "
            f"phi > {sinks['tau']:g} = visual sink)"
        )
        categorical_axes(fig, x="image token (row-major over the patch grid)", y="layer input")
        doc.heading("Visual sinks")
        doc.paragraph(f"visual sinks per layer: {sinks['sinks_per_layer']}")
        doc.figure(fig)
    if vhd is not None and len(vhd):
        grid = vhd.pivot(index="layer", columns="head", values="vhd")
        doc.heading("Vision-aware head divergence")
        doc.figure(layer_head_heatmap(grid, title="VHD per head (mean over images)", colorscale="Viridis"))
