"""The automatic labels (:mod:`ddr_core.labels`) in the inspector ("Label" tab) and the HTML export: text as text.

Both read ``outputs/<experiment>/feature_labels/<variant>/``. A label is untrusted text (a CLIP vocabulary entry
from a config, a classifier value): shown with ``st.text`` in Streamlit and escaped in HTML, never as Markdown.
"""

from __future__ import annotations

from typing import Any

from ddr_core.markdown_text import escape_markdown
from ddr_core.paths import DataLayout
from ddr_core.view_text import escape_html as _e
from ddr_core.view_text import number, show_problem_or_nothing, unreadable

STAGE = "feature_labels"


def channel_label(layout: DataLayout, variant: str, channel: int) -> tuple[dict[str, Any] | None, dict[str, Any],
                                                                          str | None]:
    """``(row of the channel, variant summary, problem)``: no row and no problem when there are no labels; a table
    that cannot be read is a problem (its reason), never an error."""
    import polars as pl

    from ddr_core.labels import read_feature_labels

    try:
        found = read_feature_labels(layout.stage_dir(STAGE, variant))
        if found is None:
            return None, {}, None
        table, summary = found
        rows = table.filter(pl.col("channel") == int(channel)).to_dicts()
    except Exception as error:  # noqa: BLE001 - an unreadable table is shown as a problem
        return None, {}, unreadable("labels", variant, error)
    return (rows[0] if rows else None), summary, None


def _number(value: Any, digits: int = 2) -> str:
    return number(value, digits)


def label_lines(row: dict[str, Any] | None, summary: dict[str, Any]) -> list[str]:
    """The channel's label and its detection score as lines of plain text (the label quoted as data)."""
    if row is None or row.get("label") is None:
        return ["No label for this feature (fewer than 4 prompts with images among its top examples that activate "
                "it above its negatives' level)."]
    verdict = {True: "significant", False: "not significant", None: "not tested"}[row.get("significant")]
    lines = [f"label: {row['label']}",
             f"detection score (balanced accuracy on held-out prompts): {_number(row.get('score'))}, chance "
             f"{_number(row.get('chance'))}, 95% interval [{_number(row.get('score_low'))}, "
             f"{_number(row.get('score_high'))}]; q {_number(row.get('q_value'), 4)} ({verdict})",
             f"held out: {row.get('n_positive')} top prompts found {_number(row.get('tpr'))}; {row.get('n_negative')} "
             f"negatives rejected {_number(row.get('tnr'))} (hard {_number(row.get('tnr_hard'))}, easy "
             f"{_number(row.get('tnr_easy'))}); labelled from {row.get('n_labelling')} other top prompts",
             f"labeller: {summary.get('labeller')} ({summary.get('labeller_kind')})"]
    if row.get("concept") is not None:
        truth = row["concept"] or "none (not selective)"
        matches = {True: "the label is one of them", False: "the label is not one of them", None: "nothing to check"}
        lines.append(f"significant concepts (feature_concepts, the truth): {truth}; {matches[row.get('label_matches')]}")
    return lines


def summary_line(summary: dict[str, Any]) -> str | None:
    """The variant's figures as plain text (``None`` without a summary)."""
    if not summary:
        return None
    low, high = (summary.get("score_interval") or [None, None])[:2]
    line = (f"{summary.get('scored')} of {summary.get('channels')} features labelled; mean detection score "
            f"{_number(summary.get('score_mean'))} [{_number(low)}, {_number(high)}] vs chance "
            f"{_number(summary.get('chance'))}; {summary.get('significant')} significant (BH)")
    match = (summary.get("truth") or {}).get("match") or {}
    if match.get("n"):
        line += (f"; label = significant concept for {_number(match.get('rate'))} of {match['n']} selective features "
                 f"(chance {_number(match.get('chance'))})")
    return line


def render_inspector(layout: DataLayout, variant: str, channel: int) -> None:
    """The inspector's "Label" tab."""
    import streamlit as st

    row, summary, problem = channel_label(layout, variant, channel)
    if show_problem_or_nothing(problem, not summary, "No automatic labels for this variant (materialize "
                                                     "feature_labels; its model needs a `labeller`)."):
        return
    for line in label_lines(row, summary):
        st.text(line)
    line = summary_line(summary)
    if line:
        st.caption(escape_markdown(f"Variant: {line}"))


def labels_html(layout: DataLayout, variant: str, channel: int) -> str:
    """The HTML export's "Label" section of a channel page (the page gives it its heading)."""
    row, summary, problem = channel_label(layout, variant, channel)
    if problem is not None:
        return f'<p class="failed">{_e(problem)}</p>'
    if not summary:
        return "<p>No automatic labels.</p>"
    parts = [f"<p>{_e(line)}</p>" for line in label_lines(row, summary)]
    line = summary_line(summary)
    if line:
        parts.append(f"<p><small>Variant: {_e(line)}</small></p>")
    return "".join(parts)


def feature_label_lines(layout: DataLayout, variants: list[str]) -> list[str]:
    """The demo's closing lines: per labelled variant its :func:`summary_line` (nothing when none was labelled)."""
    from ddr_core.labels import read_feature_labels

    lines = []
    for variant in variants:
        try:
            found = read_feature_labels(layout.stage_dir(STAGE, variant))
        except Exception:  # noqa: BLE001 - a summary line is not worth failing the demo's report for
            found = None
        line = summary_line(found[1]) if found else None
        if line:
            lines.append(f"  {variant}: {line}")
    if lines:
        lines.insert(0, "Automatic labels (feature_labels; docs/LABELS.md; [95% bootstrap intervals over features]):")
    return lines
