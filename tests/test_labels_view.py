"""The automatic labels in the viewers: the inspector's "Label" tab (AppTest) and the HTML export's "Label" section.
Labels are untrusted text (a CLIP vocabulary from a config): shown as text, never as Markdown or HTML."""

from __future__ import annotations

import polars as pl
import pytest

from ddr_core.labels import SCHEMA, write_feature_labels
from tests.markdown_check import HOSTILE, live_markup

LABEL = HOSTILE[1]  # "a cat [click](http://attacker.example/phish) on a sofa"
HTML_LABEL = HOSTILE[3]  # '<a href="http://attacker.example/html">x</a>'


def _write_labels(layout, variant: str) -> None:
    rows = [{name: None for name in SCHEMA} for _ in range(2)]
    rows[0].update({"channel": 0, "label": LABEL, "score": 0.9, "chance": 0.5, "p_value": 0.001, "q_value": 0.004,
                    "significant": True, "score_low": 0.8, "score_high": 1.0, "tpr": 0.8, "tnr": 1.0, "tnr_hard": 1.0,
                    "tnr_easy": 1.0, "n_labelling": 5, "n_positive": 5, "n_negative": 10, "n_hard": 5,
                    "concept": "colour=red", "label_matches": False})
    rows[1].update({"channel": 1, "label": HTML_LABEL, "score": 0.45, "chance": 0.5, "p_value": 0.7, "q_value": 0.7,
                    "significant": False, "score_low": 0.3, "score_high": 0.6, "n_positive": 5, "n_negative": 10})
    table = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    summary = {"labeller": "clip-test", "labeller_kind": "clip", "channels": 2, "scored": 2, "significant": 1,
               "chance": 0.5, "score_mean": 0.675, "score_interval": [0.45, 0.9]}
    write_feature_labels(layout.stage_dir("feature_labels", variant), table, summary)


@pytest.fixture()
def toy_labels(tmp_path, monkeypatch):
    from ddr_core import representation as rep
    from tests.representation_data import VARIANT, make_toy_data_root

    toy = make_toy_data_root(tmp_path / "data")
    rep.build_shards(toy.layout, VARIANT)
    rep.build_index(toy.layout, VARIANT)
    monkeypatch.setenv("DDR_DATA_ROOT", str(toy.data_root))
    monkeypatch.setenv("DDR_EXPERIMENT", "default")
    return toy


def test_the_inspector_shows_the_label_and_its_score_as_text(toy_labels):
    pytest.importorskip("streamlit")
    from tests.representation_data import VARIANT
    from tests.test_inspector import _app, _markdown_sources, _run, _texts

    at = _app()
    tab = at.tabs[6]
    assert tab.label == "Label"  # after the last tab that was there before
    assert any("No automatic labels for this variant" in t for t in _texts(tab.info))

    _write_labels(toy_labels.layout, VARIANT)
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

    _write_labels(toy_labels.layout, VARIANT)
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
    _write_labels(toy_labels.layout, VARIANT)
    lines = feature_label_lines(toy_labels.layout, [VARIANT, "other"])
    assert lines[0].startswith("Automatic labels (feature_labels") and len(lines) == 2
    assert "mean detection score 0.68 [0.45, 0.90] vs chance 0.50; 1 significant (BH)" in lines[1]
