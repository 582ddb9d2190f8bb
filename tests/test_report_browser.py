"""Dataset text carrying a script must not run in the HTML report: checked in a real headless Chromium."""

from __future__ import annotations

import json

from conftest import chromium_driver

from headlab.datasets import scenes
from headlab.reports.pope import pope_report

PAYLOAD = '<script>window.__headlab_pwned = 1</script><img src=x onerror="window.__headlab_pwned = 2">'


def test_script_in_dataset_text_does_not_run_in_the_report(tmp_path):
    driver = chromium_driver()
    data = scenes.write_pope_benchmark(tmp_path / "data", n_images=2)
    rows = [json.loads(line) for line in (data / "pope_random.json").read_text().splitlines()[:2]]
    rows[0]["text"] = f"{PAYLOAD} Is there a car in the image?"
    rows[1]["image"] = f"{PAYLOAD}.png"  # a missing image: its name is listed in the report's problems
    (tmp_path / "evil.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = pope_report(
        tmp_path / "out",
        data=[tmp_path / "evil.json"],
        images=data / "images",
        conditions=["none"],
        vhd_images=0,
    )
    try:
        driver.get(result.html.resolve().as_uri())
        assert driver.execute_script("return window.__headlab_pwned === undefined")
        assert "window.__headlab_pwned = 1" in driver.find_element("tag name", "body").text  # shown as text
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()


def test_report_page_draws_categorical_axes_and_pages_tables(tmp_path):
    """In Chromium: plotly.js loads from the folder's plotly.min.js (no network), the layer / head heat map
    ticks read L0, L1 / H0..H3 only, and a long table shows 50 rows, then the next 50 with their thumbnails."""
    import pandas as pd

    from headlab.reports.document import Document, Thumbnail
    from headlab.reports.figures import layer_head_heatmap
    from headlab.reports.output import write_report_files
    from headlab.reports.thumbnails import Thumbnails

    image = tmp_path / "scene.png"
    scenes.render(scenes.make_scenes(1)[0]).save(image)
    thumb = Thumbnails().get(image)
    grid = pd.DataFrame([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], index=[0, 1], columns=[0, 1, 2, 3])
    doc = Document("browser")
    doc.figure(layer_head_heatmap(grid, title="per head"))
    doc.table(["i", "image"], [[i, Thumbnail("scene.png", thumb)] for i in range(120)])
    page = write_report_files(tmp_path / "out", {}, doc)
    driver = chromium_driver()
    try:
        driver.get(page.resolve().as_uri())
        assert driver.execute_script("return typeof window.Plotly === 'object'")
        ticks = driver.execute_script(
            "return ['xtick', 'ytick'].map(c => [...document.querySelectorAll('.' + c + ' text')]"
            ".map(t => t.textContent))"
        )
        assert [sorted(t) for t in ticks] == [["H0", "H1", "H2", "H3"], ["L0", "L1"]]  # one tick each
        visible = "return [...document.querySelectorAll('tbody tr')].filter(r => !r.hidden).map(r => +r.cells[0].textContent)"
        assert driver.execute_script(visible) == list(range(50))
        driver.find_element("css selector", '.pager button[data-step="1"]').click()
        assert driver.execute_script(visible) == list(range(50, 100))
        loaded = "return [...document.querySelectorAll('tbody tr:not([hidden]) img')].every(i => i.complete && i.naturalWidth > 0)"
        assert driver.execute_script(loaded)
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
