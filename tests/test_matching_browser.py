"""Feature matching in a real browser (Debian's Chromium under Selenium): the inspector's "Across models" tab and the
HTML export's "Across models" section show the comparison, the channel's match or its vanishing, and the concepts; the
prompts' hostile concept labels (tests/markdown_check.py HOSTILE, pointed at a loopback "attacker") are text and the
browser fetches nothing from them. Screenshots in test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser_support import (
    LIVE_FETCHES,
    NEEDS_CHROMIUM,
    fetches_reached,
    headless_chromium,
    loopback_attacker,
    open_export_page,
    open_tab,
    screenshot,
    settled,
    skip_without_viewer_modules,
    wait_for_text,
)
from tests.markdown_check import HOSTILE

pytestmark = NEEDS_CHROMIUM
skip_without_viewer_modules()
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HEADLINE = "toy-raw (A, 6 units) vs toy-sae (B, 8 units) over 48 generations x 3 timesteps"
VANISHED = "unit 2 of toy-raw: no match better than chance (vanished)"


@pytest.fixture(scope="module")
def attacker():
    with loopback_attacker() as server:
        yield server


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory, attacker):
    from tests.matching_data import make_matched_toy

    colours = [c.replace("http://attacker.example", attacker.url) for c in HOSTILE[:4]]
    return make_matched_toy(tmp_path_factory.mktemp("matching-browser") / "data", colours)


@pytest.fixture(scope="module")
def driver():
    with headless_chromium() as browser:
        yield browser


def test_the_inspector_across_models_tab_shows_the_match_as_text(driver, toy, attacker, tmp_path: Path):
    from tests.test_browser import _serve_inspector

    with _serve_inspector(toy.data_root, tmp_path) as url:
        driver.get(f"{url}/?variant=toy-raw&channel=2")
        wait = WebDriverWait(driver, 90, poll_frequency=0.5)
        open_tab(driver, wait, "Across models")
        # every text asserted is waited for (Streamlit draws the tab's elements one by one)
        body = wait_for_text(wait, VANISHED, HEADLINE, "A: 5 matched, 1 vanished")
        assert HEADLINE in body and "A: 5 matched, 1 vanished" in body
        line = settled(wait, lambda d: d.find_element(By.XPATH, f"//*[contains(text(), '{VANISHED}')]"),
                       lambda e: e.is_displayed() and e.size["width"] > 100, "the vanished line drawn")
        assert line.is_displayed() and line.size["width"] > 100  # drawn in the open tab, not hidden
        heights = settled(wait, lambda d: [t.size["height"] for t in d.find_elements(  # the pair, the concepts
            By.CSS_SELECTOR, "[data-testid='stDataFrame']") if t.is_displayed()],
            lambda found: len(found) >= 2 and all(h > 30 for h in found), "two tables drawn")
        assert len(heights) >= 2 and all(h > 30 for h in heights), heights
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", line)
        live = driver.execute_script(LIVE_FETCHES, attacker.url)
        fetched = fetches_reached(driver, attacker)  # every request the page made has arrived
        assert screenshot(driver, "inspector_across_models.png").stat().st_size > 10_000
    assert live == []
    assert fetched == []


def test_the_html_export_across_models_section_shows_the_match_as_text(driver, toy, attacker, tmp_path: Path):
    from tests.representation_data import VARIANT

    open_export_page(driver, toy.layout, VARIANT, tmp_path / "report", 2)
    section = driver.find_element(By.ID, "across")
    driver.execute_script("arguments[0].scrollIntoView();", section)
    assert section.is_displayed() and section.size["height"] > 30
    assert section.text.startswith("Across models") and VANISHED in section.text
    assert driver.execute_script(LIVE_FETCHES, attacker.url) == []
    assert fetches_reached(driver, attacker) == []  # every request the page made has arrived
    assert screenshot(driver, "export_across_models.png").stat().st_size > 5_000
