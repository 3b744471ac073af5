"""The heatmaps in a real browser (Debian's Chromium): the inspector's "Where it fires" tab and the HTML export's
section load their images (the animation's frames included); screenshots in test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser_support import (
    NEEDS_CHROMIUM,
    headless_chromium,
    loaded_and_visible,
    loaded_widths,
    open_export_page,
    open_tab,
    screenshot,
    settled,
    skip_without_viewer_modules,
    wait_for_text,
)

pytestmark = NEEDS_CHROMIUM
skip_without_viewer_modules()
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    from tests.heatmap_data import write_heatmaps
    from tests.representation_data import VARIANT, make_indexed_toy

    toy = make_indexed_toy(tmp_path_factory.mktemp("heat-browser") / "data")
    write_heatmaps(toy.layout, VARIANT, 0)
    return toy


@pytest.fixture(scope="module")
def driver():
    with headless_chromium() as browser:
        yield browser


def test_the_inspector_tab_shows_the_heatmaps(driver, toy, tmp_path: Path) -> None:
    from tests.test_browser import _serve_inspector

    with _serve_inspector(toy.data_root, tmp_path) as url:
        driver.get(url)
        wait = WebDriverWait(driver, 90, poll_frequency=0.5)
        open_tab(driver, wait, "Where it fires")
        wait_for_text(wait, "heat on the shape", "Toy world (1 channels")
        # the tab's heatmaps loaded and drawn (the Visualisation tab's images stay loaded but hidden: not counted)
        images = settled(wait, lambda d: loaded_and_visible(d, '[data-testid="stImage"] img'),
                         lambda found: len(found) >= 4, "four heatmaps loaded and drawn")
        assert len(images) >= 4, images
        panel = driver.find_element(By.XPATH, "//*[contains(text(), 'Toy world (1 channels')]")
        driver.execute_script("arguments[0].scrollIntoView();", panel)
        assert screenshot(driver, "inspector_heatmaps.png").stat().st_size > 10_000


def test_the_html_export_section_loads_its_images(driver, toy, tmp_path: Path) -> None:
    from tests.representation_data import VARIANT

    open_export_page(driver, toy.layout, VARIANT, tmp_path / "report")
    widths = settled(WebDriverWait(driver, 60), lambda d: loaded_widths(d, "img[src*='heatmaps/']"),
                     lambda w: len(w) == 4, "the section's 4 images loaded")
    assert widths == [32] * 4, widths
    heading = driver.find_element(By.XPATH, "//h2[text()='Where it fires']")
    driver.execute_script("arguments[0].scrollIntoView();", heading)
    assert screenshot(driver, "export_heatmaps.png").stat().st_size > 5_000
