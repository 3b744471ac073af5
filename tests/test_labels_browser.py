"""The automatic labels in a real browser (Debian's Chromium under Selenium): the inspector's "Label" tab and the
HTML export's "Label" section show the label and its detection score as text; a hostile label (tests/markdown_check.py
HOSTILE: a Markdown image and link, an HTML image and link, pointed at a loopback "attacker") is shown as text and
the browser fetches nothing from it. Screenshots in test-artifacts/."""

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

SCORE = "detection score (balanced accuracy on held-out prompts): 0.90, chance 0.50, 95% interval [0.80, 1.00]"


@pytest.fixture(scope="module")
def attacker():
    with loopback_attacker() as server:
        yield server


@pytest.fixture(scope="module")
def hostile(attacker) -> tuple[str, str]:
    """Channel 0's label (a Markdown image and link, an HTML image) and channel 1's (an HTML link), all pointing at
    the loopback attacker."""
    first = " ".join(HOSTILE[:3]).replace("http://attacker.example", attacker.url)
    return first, HOSTILE[3].replace("http://attacker.example", attacker.url)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory, hostile):
    from tests.label_data import write_labels
    from tests.representation_data import VARIANT, make_indexed_toy

    toy = make_indexed_toy(tmp_path_factory.mktemp("labels-browser") / "data")
    write_labels(toy.layout, VARIANT, hostile)
    return toy


@pytest.fixture(scope="module")
def driver():
    with headless_chromium() as browser:
        yield browser


def test_the_inspector_label_tab_shows_label_and_score_as_text(driver, toy, hostile, attacker, tmp_path: Path):
    from tests.test_browser import _serve_inspector

    with _serve_inspector(toy.data_root, tmp_path) as url:
        driver.get(url)
        wait = WebDriverWait(driver, 90, poll_frequency=0.5)
        open_tab(driver, wait, "Label")
        # every text asserted is waited for (Streamlit draws the tab's elements one by one)
        body = wait_for_text(wait, SCORE, f"label: {hostile[0]}", "(significant)",
                             "colour=red; the label is not one of them", "Variant: 2 of 2 features labelled")
        assert f"label: {hostile[0]}" in body  # the hostile label verbatim, as text
        assert "(significant)" in body and "colour=red; the label is not one of them" in body
        assert "Variant: 2 of 2 features labelled" in body
        line = settled(wait, lambda d: d.find_element(By.XPATH, "//*[contains(text(), 'detection score (balanced')]"),
                       lambda e: e.is_displayed() and e.size["width"] > 100, "the score line drawn")
        assert line.is_displayed() and line.size["width"] > 100  # drawn in the open tab, not hidden
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", line)
        live = driver.execute_script(LIVE_FETCHES, attacker.url)
        fetched = fetches_reached(driver, attacker)  # every request the page made has arrived
        assert screenshot(driver, "inspector_label.png").stat().st_size > 10_000
    assert live == []
    assert fetched == []


def test_the_html_export_label_section_shows_label_and_score_as_text(driver, toy, hostile, attacker, tmp_path: Path):
    from tests.representation_data import VARIANT

    score_1 = "detection score (balanced accuracy on held-out prompts): 0.45, chance 0.50, 95% interval [0.30, 0.60]"
    for channel, label, score, verdict in ((0, hostile[0], SCORE, "(significant)"),
                                           (1, hostile[1], score_1, "(not significant)")):
        open_export_page(driver, toy.layout, VARIANT, tmp_path / f"report{channel}", channel)
        section = driver.find_element(By.ID, "label")
        driver.execute_script("arguments[0].scrollIntoView();", section)
        assert section.is_displayed() and section.size["height"] > 50
        text = section.text
        assert text.startswith("Label") and f"label: {label}" in text and verdict in text
        assert score in text
        assert driver.execute_script(LIVE_FETCHES, attacker.url) == []
        assert fetches_reached(driver, attacker) == []  # every request the page made has arrived
        assert screenshot(driver, f"export_label_{channel}.png").stat().st_size > 5_000
