"""The heatmaps in a real browser (Debian's Chromium): the inspector's "Where it fires" tab and the HTML export's
section load their images (the animation's frames included); screenshots in test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser_support import (
    NEEDS_CHROMIUM,
    headless_chromium,
    open_export_page,
    screenshot,
    skip_without_viewer_modules,
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
    from tests.test_browser import _loaded_images, _serve_inspector

    with _serve_inspector(toy.data_root, tmp_path) as url:
        driver.get(url)
        wait = WebDriverWait(driver, 90, poll_frequency=0.5)
        tab = wait.until(lambda d: d.find_elements(By.XPATH, "//*[@role='tab'][contains(., 'Where it fires')]"))[0]
        tab.click()
        wait.until(lambda d: "heat on the shape" in d.page_source)
        wait.until(lambda d: len([w for w in _loaded_images(d, '[data-testid="stImage"] img') if w > 0]) >= 4)
        panel = driver.find_element(By.XPATH, "//*[contains(text(), 'Toy world (1 channels')]")
        driver.execute_script("arguments[0].scrollIntoView();", panel)
        assert screenshot(driver, "inspector_heatmaps.png").stat().st_size > 10_000


def test_the_html_export_section_loads_its_images(driver, toy, tmp_path: Path) -> None:
    from tests.representation_data import VARIANT
    from tests.test_browser import _loaded_images

    open_export_page(driver, toy.layout, VARIANT, tmp_path / "report")
    WebDriverWait(driver, 30).until(lambda d: len(_loaded_images(d, "img[src*='heatmaps/']")) == 4)
    assert all(width == 32 for width in _loaded_images(driver, "img[src*='heatmaps/']"))
    heading = driver.find_element(By.XPATH, "//h2[text()='Where it fires']")
    driver.execute_script("arguments[0].scrollIntoView();", heading)
    assert screenshot(driver, "export_heatmaps.png").stat().st_size > 5_000
