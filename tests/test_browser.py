"""Real headless Chromium (Selenium + Debian's chromium / chromium-driver) on the inspector and the export.

Screenshots go to ``test-artifacts/`` (git-ignored). Needs ``apt-get install chromium chromium-driver``
and ``pip install selenium streamlit``; skipped, with the reason, where they are missing.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ddr_core import cli
from ddr_core import representation as rep
from ddr_core.html_export import export_html
from tests.browser_support import (
    CHROMEDRIVER,
    CHROMIUM,
    fetches_reached,
    free_port,
    headless_chromium,
    loaded_and_visible,
    loaded_widths,
    open_tab,
    screenshot,
    settled,
    visible,
)
from tests.representation_data import VARIANT, make_toy_data_root

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="BROWSER TESTS SKIPPED: chromium / chromedriver not installed "
               "(apt-get install -y chromium chromium-driver)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="BROWSER TESTS SKIPPED: pip install selenium")
pytest.importorskip("streamlit", reason="BROWSER TESTS SKIPPED: pip install streamlit")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    toy = make_toy_data_root(tmp_path_factory.mktemp("browser") / "data")
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    return toy


@pytest.fixture(scope="module")
def driver():
    with headless_chromium() as browser:
        yield browser


@contextlib.contextmanager
def _serve_inspector(data_root: Path, log_dir: Path):
    """``ddr inspect`` on ``data_root`` (a Streamlit server on a free loopback port): its URL."""
    port = free_port()
    log = log_dir / "streamlit.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(cli.inspector_command(str(data_root), "default", port=port),
                                   stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # Streamlit starts slowly on a busy machine
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def inspector_url(toy, tmp_path_factory: pytest.TempPathFactory):
    with _serve_inspector(toy.data_root, tmp_path_factory.mktemp("streamlit")) as url:
        yield url


CHARTS = '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg.marks'
"""The drawn surface of each Vega-Lite chart (vega-embed renders to a canvas or an svg)."""


def test_inspector_renders_charts_and_images(driver, inspector_url) -> None:
    driver.get(inspector_url)
    wait = WebDriverWait(driver, 90, poll_frequency=0.5)
    # both Vega-Lite charts drawn at their size (a chart is counted once it is laid out, not when its node exists)
    charts = settled(wait, lambda d: visible(d, CHARTS),
                     lambda found: len(found) >= 2 and all(w > 100 and h > 100 for w, h in found), "two drawn charts")
    assert len(charts) >= 2 and all(w > 100 and h > 100 for w, h in charts), charts
    images = settled(wait, lambda d: loaded_and_visible(d, '[data-testid="stImage"] img, img[alt]'),
                     lambda found: len(found) >= 1, "an image loaded and drawn")
    assert len(images) >= 1, images
    page = settled(wait, lambda d: d.page_source, lambda source: "channel 00000" in source, "channel 00000")
    assert "channel 00000" in page
    shot = screenshot(driver, "inspector_channel0.png")
    assert shot.stat().st_size > 10_000

    # next channel via the sidebar button, then the dataset-examples tab
    driver.find_element(By.XPATH, "//button[.//p[contains(., 'Next')]]").click()
    wait.until(lambda d: "Peak #1: t=950" in d.page_source)
    open_tab(driver, wait, "Dataset examples")  # found again after the rerun (a node found before it goes stale)
    # the examples drawn in the open tab (the Visualisation tab's images stay loaded but hidden: not counted)
    examples = settled(wait, lambda d: loaded_and_visible(d, '[data-testid="stImage"] img'),
                       lambda found: len(found) >= 2, "two example images loaded and drawn")
    assert len(examples) >= 2, examples
    screenshot(driver, "inspector_channel1_examples.png")


def test_html_export_opens_from_disk(driver, toy, tmp_path: Path) -> None:
    index = export_html(toy.layout, VARIANT, tmp_path / "report")
    driver.get(index.as_uri())
    rows = driver.find_elements(By.CSS_SELECTOR, "#channels tbody tr")
    assert len(rows) == 4
    thumbs = settled(WebDriverWait(driver, 60), lambda d: loaded_widths(d, "img.thumb"), lambda w: len(w) == 4,
                     "the 4 thumbnails loaded")
    assert len(thumbs) == 4 and all(width > 0 for width in thumbs), thumbs
    first_column = lambda: [r.find_elements(By.TAG_NAME, "td")[1].text for r in  # noqa: E731
                            driver.find_elements(By.CSS_SELECTOR, "#channels tbody tr")]
    assert first_column() == ["0", "1", "2", "3"]
    header = driver.find_element(By.XPATH, "//th[text()='channel']")
    header.click()
    header.click()  # descending
    assert first_column() == ["3", "2", "1", "0"]
    screenshot(driver, "export_index.png")

    driver.find_element(By.LINK_TEXT, "0").click()
    WebDriverWait(driver, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "svg polyline.curve")) == 2)
    # loading="lazy": an image loads once it is near the view; make them eager (the page's lazy loading is not
    # what this checks) and wait until every one has loaded (not merely completed: a broken image completes too)
    driver.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });")
    widths = settled(WebDriverWait(driver, 60), lambda d: (loaded_widths(d, "img"),
                                                           len(d.find_elements(By.TAG_NAME, "img"))),
                     lambda found: len(found[0]) == found[1], "every image of the channel page loaded")[0]
    from urllib.parse import unquote, urlparse

    page = Path(unquote(urlparse(driver.current_url).path)).read_text(encoding="utf-8")
    # every image the page holds loads from disk (examples, priors, raised dreams: a dream that did not raise its
    # channel is listed as text, not shown)
    assert len(widths) == page.count("<img") >= 20 and all(w > 0 for w in widths)
    box = driver.execute_script("return document.querySelector('svg').getBoundingClientRect().width;")
    assert box > 300
    screenshot(driver, "export_channel0.png")


class _Attacker:
    """A loopback HTTP server standing in for an attacker's host: it records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        recorded = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server hook
                recorded.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def test_hostile_prompt_is_shown_as_text_and_nothing_is_fetched(driver, tmp_path: Path) -> None:
    """A prompt (and a failure message, a file name) with Markdown/HTML images and links to a loopback
    "attacker": the real Streamlit frontend in Chromium shows them as text and never requests them."""
    attacker = _Attacker()
    try:
        toy = make_toy_data_root(tmp_path / "data")
        rep.build_shards(toy.layout, VARIANT)
        rep.build_index(toy.layout, VARIANT)
        prompt = (f"![x]({attacker.url}/md-image.png) <img src=\"{attacker.url}/html-image.png\"> "
                  f"[click]({attacker.url}/link) <{attacker.url}/autolink>")
        path = rep.shard_path(toy.layout, VARIANT, 0)
        shard = json.loads(path.read_text())
        for example in shard["examples"]:
            if example["timestep"] == 501:
                example["prompt"] = prompt
        shard["dreams"]["noise"]["results"][0].update(failed=True, failure_reason=f"![f]({attacker.url}/failure.png)")
        shard["errors"] = [{"what": "image", "file": f"![e]({attacker.url}/file.png)", "problem": "missing"}]
        path.write_text(json.dumps(shard))
        with _serve_inspector(toy.data_root, tmp_path) as url:
            driver.get(url)
            wait = WebDriverWait(driver, 90, poll_frequency=0.5)
            wait.until(lambda d: "failure.png" in d.page_source)  # the Visualisation tab is drawn
            open_tab(driver, wait, "Dataset examples")
            examples = settled(wait, lambda d: loaded_and_visible(d, '[data-testid="stImage"] img'),
                               lambda found: len(found) >= 2, "two example images loaded and drawn")
            assert len(examples) >= 2, examples
            # the prompt drawn as text in the open tab (waited for: the tab draws its examples one by one)
            prompt_as_text = settled(wait, lambda d: d.execute_script(
                "return document.body.innerText.includes(arguments[0]);", prompt), bool, "the prompt as text")
            live = driver.execute_script(  # the Markdown containers holding a live image/link/frame
                "return Array.from(document.querySelectorAll('img[src], a[href], iframe[src]'))"
                ".filter(e => (e.src || e.href).includes(arguments[0]))"
                ".map(e => (e.closest('[data-testid]') || e).outerHTML);", attacker.url)
            fetched = fetches_reached(driver, attacker)  # every request the page made has arrived
            screenshot(driver, "inspector_hostile_prompt.png")
        assert fetched == []
        assert live == []
        assert prompt_as_text
    finally:
        attacker.server.shutdown()
        attacker.server.server_close()


def test_html_export_dose_response_section_opens_from_disk(driver, tmp_path: Path) -> None:
    """The channel page's steering grid and the index's causal-test table in a real browser (screenshot)."""
    from tests.dose_data import HOSTILE_CONCEPT, write_dose_grid

    toy = make_toy_data_root(tmp_path / "data")
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    write_dose_grid(toy.layout, VARIANT, 0)
    index = export_html(toy.layout, VARIANT, tmp_path / "report")
    driver.get(index.as_uri())
    table = driver.find_element(By.CSS_SELECTOR, "table.dose")
    assert "inside-outside" in table.text
    driver.get((index.parent / "channels" / "channel_00000.html").as_uri())
    section = "img[alt='dose-response image']"
    # the report's images load lazily (loading="lazy"): the section sits below the dreams and priors
    driver.execute_script("document.getElementById('dose').scrollIntoView();"
                          "document.querySelectorAll(arguments[0]).forEach(i => { i.loading = 'eager'; });", section)
    widths = settled(WebDriverWait(driver, 60), lambda d: loaded_widths(d, section), lambda w: len(w) == 7,
                     "the grid's 7 images loaded")
    assert len(widths) == 7 and all(width > 0 for width in widths), widths
    assert HOSTILE_CONCEPT in driver.find_element(By.TAG_NAME, "body").text  # shown as text
    driver.execute_script("document.querySelector('table.dose').scrollIntoView();")
    screenshot(driver, "export_dose_response.png")
