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
