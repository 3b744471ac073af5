"""What the viewers' per-tab modules share (``heatmap_view``, ``labels_view``: an inspector tab and an HTML export
section each, reading one stage's output): numbers as plain text, HTML escaping, the sentence for an output that
cannot be read, and the inspector's "problem or nothing to show" preamble. Text from the data stays text: escaped
in HTML, ``escape_markdown`` in Streamlit."""

from __future__ import annotations

import html
import math
from typing import Any

from ddr_core.markdown_text import escape_markdown


def number(value: Any, digits: int) -> str:
    """``value`` with ``digits`` decimals; ``n/a`` for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def escape_html(value: Any) -> str:
    """``str(value)`` escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def html_table(rows: list[dict[str, Any]], css_class: str) -> str:
    """``rows`` (same keys, in order) as an HTML table whose header and cells are escaped text; ``""`` for none."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f'<table class="{escape_html(css_class)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def unreadable(what: str, variant: str, error: BaseException) -> str:
    """The problem shown for a stage output that cannot be read (never an error in a viewer)."""
    return f"the {what} of {variant} cannot be read ({type(error).__name__}: {str(error)[:200]})"


def show_problem_or_nothing(problem: str | None, nothing: bool, message: str) -> bool:
    """The inspector tab's preamble: ``problem`` (data: escaped) as a warning, else ``message`` (what to materialize:
    the code's own Markdown, never data) as an info when there is ``nothing`` to show; ``True`` when one was shown
    (the tab shows nothing else)."""
    import streamlit as st

    if problem is not None:
        st.warning(escape_markdown(problem))
        return True
    if nothing:
        st.info(message)
        return True
    return False
