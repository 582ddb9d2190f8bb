"""The example notebook runs top to bottom (nbclient, the venv's own kernel) and its objects render: tables,
and plotly figures (a pattern on token axes, layer x head maps, a with - without image comparison)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "examples" / "quickstart.ipynb"
PLOTLY = "application/vnd.plotly.v1+json"


@pytest.mark.slow
def test_example_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("headlab Store" in h for h in html)  # the store's _repr_html_
    assert any("<table" in h for h in html)  # records and result frames as tables
    figures = [o["data"][PLOTLY] for o in outputs if PLOTLY in o.get("data", {})]
    layouts = [f["layout"] for f in figures]
    assert any(
        "w3" in layout.get("xaxis", {}).get("ticktext", []) for layout in layouts
    )  # tokens on the axes
    assert any(f["data"][0].get("x") == ["H0", "H1", "H2", "H3"] for f in figures)  # a layer x head map
    titles = [layout.get("title", {}).get("text", "") for layout in layouts]
    assert any("with_image − no_image" in t for t in titles)  # a store-level comparison
