"""Feature matching in the inspector's "Across models" tab (AppTest) and in the static HTML report, on hand-made
data whose concept labels are hostile Markdown / HTML (shown as text, never rendered)."""

from __future__ import annotations

import html
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="streamlit is not installed: pip install streamlit")
from streamlit import config as streamlit_config  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from ddr_core import representation as rep  # noqa: E402
from tests.markdown_check import HOSTILE, live_markup  # noqa: E402
from tests.matching_data import make_matched_toy  # noqa: E402
from tests.representation_data import VARIANT, make_toy_data_root  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "ddr_core" / "inspector_app.py")
streamlit_config.set_option("runner.magicEnabled", False)
COLOURS = HOSTILE[:4]  # one line each: a label may not hold a control character
ACROSS_TAB = 7  # after "Label"


@pytest.fixture()
def matched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The inspector's toy data root plus a finished feature_matches[toy-raw__toy-sae] (tests/matching_data.py)."""
    toy = make_matched_toy(tmp_path / "data", COLOURS)
    monkeypatch.setenv("DDR_DATA_ROOT", str(toy.data_root))
    monkeypatch.setenv("DDR_EXPERIMENT", "default")
    return toy


def _app(**params: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(params)
    at.run()
    for _ in range(3):  # CPython 3.11.7's intermittent blank run (tests/test_inspector.py::_settled)
        if at.title:
            break
        at.run()
    assert at.title and not at.exception, [e.value for e in at.exception]
    return at


def test_the_across_models_tab_shows_the_match_the_concepts_and_the_vanished_units(matched) -> None:
    at = _app(variant=VARIANT, channel="2")
    tab = at.tabs[ACROSS_TAB]
    texts = [str(t.value) for t in tab.text]
    assert texts[0].startswith("toy-raw (A, 6 units) vs toy-sae (B, 8 units) over 48 generations x 3 timesteps")
    assert "A: 5 matched, 1 vanished" in texts[0]
    assert texts[1].startswith("unit 2 of toy-raw: no match better than chance (vanished)")
    frames = [frame.value for frame in tab.dataframe]
    assert frames[0]["variant"].tolist() == ["toy-raw", "toy-sae"]  # the unit and its best match side by side
    concepts = frames[1]
    top = concepts.iloc[0]
    assert top["concept"] == f"colour={COLOURS[1]}" and top["vanished"] == 1  # the hostile label, as a cell's text
    assert frames[2]["unit"].tolist() == [2]
    # nothing of the labels reaches a Markdown renderer
    from tests.test_inspector import _markdown_sources

    assert [m for _, source in _markdown_sources(at) for m in live_markup(source) if "attacker" in m] == []
    other = _app(variant=VARIANT, channel="0").tabs[ACROSS_TAB]
    assert str(other.text[1].value).startswith("unit 0 of toy-raw: matched. Best match in toy-sae: unit 0 (r 1.000")


def test_without_a_comparison_the_tab_says_how_to_make_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toy = make_toy_data_root(tmp_path / "data")
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    monkeypatch.setenv("DDR_DATA_ROOT", str(toy.data_root))
    monkeypatch.setenv("DDR_EXPERIMENT", "default")
    tab = _app().tabs[ACROSS_TAB]
    assert [str(t.value) for t in tab.text] == [
        "No feature matching involves toy-raw (materialize feature_matches for a comparison naming it; "
        "docs/MATCHING.md)."]


def test_the_html_report_has_the_across_models_sections_escaped(matched, tmp_path: Path) -> None:
    from ddr_core.html_export import export_html

    index = export_html(matched.layout, VARIANT, tmp_path / "report")
    text = index.read_text(encoding="utf-8")
    assert '<section id="across"><h2>Across models (feature matching)</h2><h3>toy-raw__toy-sae</h3>' in text
    assert "A: 5 matched, 1 vanished" in text
    assert html.escape(f"colour={COLOURS[1]}") in text
    assert not any(colour in text for colour in COLOURS if "<" in colour)  # escaped, never markup
    assert "<img src=http://attacker" not in text and '<a href="http://attacker' not in text
    page = (index.parent / "channels" / "channel_00002.html").read_text(encoding="utf-8")
    assert '<section id="across"><h2>Across models</h2>' in page
    assert "unit 2 of toy-raw: no match better than chance (vanished)" in page
    assert page.index('<section id="across">') < page.index('<section id="examples">')
