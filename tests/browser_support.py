"""Shared by the real-browser tests: Debian's Chromium under Selenium, screenshots, free loopback ports."""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="BROWSER TESTS SKIPPED: chromium / chromedriver not installed "
           "(apt-get install -y chromium chromium-driver, or `make browser-deps` as root)",
)
"""``pytestmark`` of a real-browser test module (with :func:`skip_without_viewer_modules` before its Selenium
imports)."""


def skip_without_viewer_modules() -> None:
    """Skip the calling test module (at import) unless Selenium and Streamlit are installed."""
    pytest.importorskip("selenium.webdriver", reason="BROWSER TESTS SKIPPED: pip install selenium")
    pytest.importorskip("streamlit", reason="BROWSER TESTS SKIPPED: pip install streamlit")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def headless_chromium() -> Iterator[object]:
    """A headless Chromium WebDriver (quit on exit)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1500,1100"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


def screenshot(browser, name: str) -> Path:
    """Save a screenshot of ``browser`` to ``test-artifacts/<name>``."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    browser.save_screenshot(str(path))
    return path


def open_tab(driver, wait, name: str) -> None:
    """Click the inspector tab whose label holds ``name`` and wait until it is selected."""
    from selenium.webdriver.common.by import By

    tab = wait.until(lambda d: d.find_elements(By.XPATH, f"//*[@role='tab'][contains(., '{name}')]"))[0]
    driver.execute_script("window.scrollTo(0, 0); arguments[0].scrollIntoView({block: 'center'});"
                          "arguments[0].click();", tab)  # the header may sit over a tab scrolled to the top
    wait.until(lambda d: tab.get_attribute("aria-selected") == "true")


def open_export_page(driver, layout, variant: str, out: Path, channel: int = 0) -> Path:
    """Export ``variant``'s HTML report to ``out`` and open ``channel``'s page from disk: its path."""
    from ddr_core.html_export import export_html

    index = export_html(layout, variant, out)
    page = index.parent / "channels" / f"channel_{channel:05d}.html"
    driver.get(page.as_uri())
    return page


@contextlib.contextmanager
def guarded_inspector(command: list[str], workdir: Path, token: str, env: dict[str, str]) -> Iterator[tuple[str, object]]:
    """The guarded inspector on a toy data root, started by ``command`` (``ddr inspect`` or the launcher; this
    adds ``--data-root`` and ``--port``) with the access token ``token``: ``(url, process)``, stopped on exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.representation_data import make_indexed_toy

    toy = make_indexed_toy(workdir / "data")
    port = free_port()
    log = workdir / "inspector.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, *command, "--data-root", str(toy.data_root), "--port", str(port)],
                                   cwd=Path(__file__).resolve().parents[1], stdout=sink, stderr=subprocess.STDOUT,
                                   env={**env, "DDR_ACCESS_TOKEN": token}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while f"open {url}/?token={token}" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the inspector did not start: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


LIVE_FETCHES = ("return Array.from(document.querySelectorAll('img[src], a[href], iframe[src], source[src]'))"
                ".filter(e => (e.src || e.href).includes(arguments[0]))"
                ".map(e => (e.closest('[data-testid]') || e).outerHTML);")
"""Browser script: the live elements (images, links, frames) of the page that point at ``arguments[0]`` (a URL)."""


@contextlib.contextmanager
def loopback_attacker() -> Iterator[object]:
    """A loopback HTTP server standing in for an attacker's host (``.url``, ``.requests``), shut down after."""
    from tests.test_browser import _Attacker

    server = _Attacker()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


# ---- waits that check exactly what the test then asserts ----------------------------------------------------
# A real page settles piece by piece (Streamlit streams its elements; images decode after they are counted; other
# tabs keep their images loaded but hidden). A wait on one condition followed by an assertion on a stricter one is
# a race that a busy machine loses: every wait below returns the very value it accepted, and the test asserts on it.

LOADED_AND_VISIBLE = ("return Array.from(document.querySelectorAll(arguments[0]))"
                      ".filter(i => i.complete && i.naturalWidth > 0).map(e => e.getBoundingClientRect())"
                      ".filter(r => r.width > 0 && r.height > 0).map(r => [Math.round(r.width), Math.round(r.height)]);")
"""Browser script: [width, height] of each image matching ``arguments[0]`` that has loaded and is drawn."""

VISIBLE = ("return Array.from(document.querySelectorAll(arguments[0])).map(e => e.getBoundingClientRect())"
           ".filter(r => r.width > 0 && r.height > 0).map(r => [Math.round(r.width), Math.round(r.height)]);")
"""Browser script: [width, height] of each element matching ``arguments[0]`` that is drawn (hidden tabs' are not)."""

LOADED_WIDTHS = ("return Array.from(document.querySelectorAll(arguments[0]))"
                 ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.naturalWidth);")
"""Browser script: naturalWidth of each image matching ``arguments[0]`` that has loaded (a broken image is
``complete`` too, with naturalWidth 0: it is not counted)."""


def loaded_and_visible(driver, selector: str) -> list[list[int]]:
    """[width, height] of each image matching ``selector`` that has loaded (naturalWidth > 0) and is drawn."""
    return driver.execute_script(LOADED_AND_VISIBLE, selector)


def visible(driver, selector: str) -> list[list[int]]:
    """[width, height] of each element matching ``selector`` that is drawn."""
    return driver.execute_script(VISIBLE, selector)


def loaded_widths(driver, selector: str) -> list[int]:
    """naturalWidth of each image matching ``selector`` that has loaded (not a broken one)."""
    return driver.execute_script(LOADED_WIDTHS, selector)


def body_text(driver) -> str:
    """The page's drawn text (hidden tabs' text is not in it)."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def settled(wait, probe, accept, what: str):
    """Wait (``wait``: a WebDriverWait) until ``accept(probe(driver))`` holds; return that accepted value.

    Assert on the returned value, never on a fresh read: the page may change between two reads (a timeout's
    message names ``what`` and the last value seen)."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException

    seen: dict[str, object] = {}

    def check(driver) -> bool:
        try:
            seen["value"] = probe(driver)
        except StaleElementReferenceException:  # Streamlit replaced the element between find and read
            return False
        return bool(accept(seen["value"]))

    try:
        wait.until(check)
    except TimeoutException as error:
        raise AssertionError(f"timed out waiting for {what}; last seen: {seen.get('value')!r}") from error
    return seen["value"]


def wait_for_text(wait, *texts: str) -> str:
    """Wait until the page's drawn text holds every one of ``texts`` (Streamlit draws a tab's elements one by
    one, so each text the test asserts is waited for); return that text."""
    return settled(wait, body_text, lambda body: all(text in body for text in texts), f"the text {texts!r}")


def fetches_reached(driver, attacker, timeout: float = 60.0) -> list[str]:
    """The requests the loopback ``attacker`` got from the page open in ``driver`` (none expected), read once the
    browser has demonstrably flushed what it asked for: the page fetches a fresh canary image from the attacker
    and this waits until the canary arrives (what a fixed sleep guessed at, and lost on a busy machine)."""
    import time
    import uuid

    canary = f"/canary-{uuid.uuid4().hex}.png"
    driver.execute_script("new Image().src = arguments[0];", attacker.url + canary)
    deadline = time.monotonic() + timeout
    while canary not in attacker.requests:
        if time.monotonic() > deadline:
            raise AssertionError(f"the canary {canary} never reached the loopback attacker in {timeout:.0f} s: "
                                 "the browser could not reach it, so a missing request proves nothing")
        time.sleep(0.05)
    return [request for request in attacker.requests if not request.startswith("/canary-")]
