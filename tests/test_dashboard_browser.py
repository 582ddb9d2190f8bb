"""The head browser in a real headless Chromium (skipped without chromium / chromedriver), on a zoo:llava
store with images: a link with the state in its URL opens the side-by-side heat map, the scatter, the
chosen head's top examples and the example view with the image overlay; clicking an example in the table,
a top example and a scatter point each update the view and the URL, and reopening the URL restores it.
Screenshots of each view are saved in the test's tmp dir.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import quote, urlparse

import pytest
from conftest import chromium_driver
from test_dashboard import IMAGE_MASS, lvlm_store

from headlab.dashboards.app import make_app
from headlab.dashboards.state import decode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The browser over a zoo:llava store, served on a free port (no model: tokens come from the store)."""
    from werkzeug.serving import make_server

    store = lvlm_store(tmp_path_factory.mktemp("lvlm"))
    httpd = make_server("127.0.0.1", 0, make_app(store).server, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    thread.join(timeout=5)


def _status(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, "status").text


def _shot(browser, element_id: str, path) -> None:
    """A screenshot of one element (scrolled into view), checked to hold a drawn image."""
    from selenium.webdriver.common.by import By

    element = browser.find_element(By.ID, element_id)
    browser.execute_script("arguments[0].scrollIntoView()", element)
    time.sleep(0.4)  # let plotly finish drawing
    assert element.screenshot(str(path)) and path.stat().st_size > 5_000


def test_views_open_from_a_link_and_follow_clicks(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver()
    wait = WebDriverWait(browser, 20)
    link = (
        f"{server}?source={quote(IMAGE_MASS.encode())}&tower=lm&mode=side&a=with_image&b=no_image"
        "&example=q1&head=1,2"
    )
    try:
        start = time.perf_counter()
        browser.get(link)
        wait.until(lambda b: "layer 1 head 2, example q1 (with_image)" in _status(b))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#heatmap .heatmaplayer .hm")) == 3)
        loaded = time.perf_counter() - start
        assert loaded < 15, f"the linked view took {loaded:.1f} s"
        # the image part over the picture, the [query, key] map with token labels, the token heat
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#grid .imagelayer image"))
        ticks = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#pattern .xtick text")]
        assert any(":" in t for t in ticks)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#tokens span")) == 29
        assert "Is there a cup in the image?" in browser.find_element(By.ID, "example-header").text
        wait.until(lambda b: "L1H2: examples by mass [image]" in b.find_element(By.ID, "top-examples").text)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#scatter .point"))
        _shot(browser, "head-views", tmp_path / "heads.png")
        _shot(browser, "example-view", tmp_path / "example.png")

        # the example table: thumbnails, then a click opens q2 and writes it into the URL
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#example-table img.thumb")) == 3)
        _shot(browser, "example-list", tmp_path / "examples.png")
        button = browser.find_element(By.XPATH, "//div[@id='example-table']//button[text()='q2']")
        browser.execute_script("arguments[0].click()", button)
        wait.until(lambda b: "example q2 (with_image)" in _status(b))
        wait.until(lambda b: "example=q2" in b.current_url and "head=1%2C2" in b.current_url)

        # a top example opens its example view
        top = browser.find_element(By.CSS_SELECTOR, "#top-examples li button")
        chosen = top.text
        browser.execute_script("arguments[0].click()", top)
        wait.until(lambda b: f"example {chosen} (with_image)" in _status(b))

        # a scatter point chooses its head: the status and the URL follow
        point = browser.find_elements(By.CSS_SELECTOR, "#scatter .point")[0]
        browser.execute_script("arguments[0].scrollIntoView()", point)
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(browser).move_to_element(point).click().perform()

        wait.until(lambda b: "head=1%2C2" not in b.current_url)
        layer, head = decode(urlparse(browser.current_url).query).head
        want = f"layer {layer} head {head}, example {chosen} (with_image)"
        wait.until(lambda b: want in _status(b))
        assert f"L{layer}H{head}: examples by" in browser.find_element(By.ID, "top-examples").text

        # reopening the URL restores the same view
        browser.get(browser.current_url)
        wait.until(lambda b: want in _status(b))
        _shot(browser, "head-views", tmp_path / "heads-after.png")
    finally:
        browser.quit()


def test_vision_heads_show_their_attention(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver()
    wait = WebDriverWait(browser, 20)
    try:
        browser.get(f"{server}?tower=vision&a=with_image&b=with_image&example=q0&head=2,3&query=0")
        wait.until(lambda b: "vision layer 2 head 3, example q0 (with_image), query 0" in _status(b))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#grid .imagelayer image"))
        assert "no attention" not in _status(browser)
        _shot(browser, "example-view", tmp_path / "vision.png")
    finally:
        browser.quit()
