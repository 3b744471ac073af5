"""The automatic labels in the viewers: the inspector's "Label" tab (AppTest) and the HTML export's "Label" section.
Labels are untrusted text (a CLIP vocabulary from a config): shown as text, never as Markdown or HTML."""

from __future__ import annotations

import pytest

from tests.label_data import HTML_LABEL, LABEL, write_labels
from tests.markdown_check import live_markup


@pytest.fixture()
def toy_labels(tmp_path, monkeypatch):
    from tests.representation_data import make_indexed_toy

    return make_indexed_toy(tmp_path / "data", monkeypatch)


def test_the_inspector_shows_the_label_and_its_score_as_text(toy_labels):
    pytest.importorskip("streamlit")
    from tests.representation_data import VARIANT
    from tests.test_inspector import _app, _markdown_sources, _run, _texts

    at = _app()
    tab = at.tabs[6]
    assert tab.label == "Label"  # after the last tab that was there before
    assert any("No automatic labels for this variant" in t for t in _texts(tab.info))

    write_labels(toy_labels.layout, VARIANT)
    at = _app()
    texts = _texts(at.tabs[6].text)
    assert f"label: {LABEL}" in texts  # the untrusted label as plain text
    assert any(t.startswith("detection score (balanced accuracy on held-out prompts): 0.90, chance 0.50, "
                            "95% interval [0.80, 1.00]") and "(significant)" in t for t in texts), texts
    assert any("colour=red; the label is not one of them" in t for t in texts)
    live = [m for _, source in _markdown_sources(at) for m in live_markup(source) if "attacker" in m]
    assert not live, live
    at = _run(at.selectbox(key="channel").select(1))
    texts = _texts(at.tabs[6].text)
    assert f"label: {HTML_LABEL}" in texts and any("(not significant)" in t for t in texts)


def test_the_html_export_shows_the_label_escaped(toy_labels, tmp_path):
    from ddr_core.html_export import export_html
    from tests.representation_data import VARIANT

    write_labels(toy_labels.layout, VARIANT)
    out = export_html(toy_labels.layout, VARIANT, tmp_path / "report").parent
    page = (out / "channels" / "channel_00000.html").read_text()
    assert '<section id="label"><h2>Label</h2>' in page and 'href="#label"' in page
    assert "label: a cat [click](http://attacker.example/phish) on a sofa" in page
    assert "0.90, chance 0.50, 95% interval [0.80, 1.00]" in page
    second = (out / "channels" / "channel_00001.html").read_text()
    assert "&lt;a href=&quot;http://attacker.example/html&quot;&gt;x&lt;/a&gt;" in second
    assert '<a href="http://attacker.example' not in second
    assert page.index('<section id="label">') < page.index('<section id="examples">')  # examples stay last


def test_the_demo_prints_one_summary_line_per_labelled_variant(toy_labels):
    from ddr_core.labels_view import feature_label_lines
    from tests.representation_data import VARIANT

    assert feature_label_lines(toy_labels.layout, [VARIANT]) == []
    write_labels(toy_labels.layout, VARIANT)
    lines = feature_label_lines(toy_labels.layout, [VARIANT, "other"])
    assert lines[0].startswith("Automatic labels (feature_labels") and len(lines) == 2
    assert "mean detection score 0.68 [0.45, 0.90] vs chance 0.50; 1 significant (BH)" in lines[1]
