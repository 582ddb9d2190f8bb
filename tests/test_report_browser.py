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
