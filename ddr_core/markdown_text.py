"""Untrusted text inside Markdown: shown as the text it is, never rendered as markup.

Prompts, concept labels, file names, failure messages and other strings that come from data end up in
Markdown: Dagster renders ``MetadataValue.md`` in the asset page, and Streamlit renders Markdown in
``st.markdown``, ``st.caption``, ``st.title`` / ``header`` / ``subheader``, ``st.info`` / ``warning`` /
``error``, widget labels and ``help=``. A prompt such as ``![x](http://attacker.example/t.png)`` would
make every viewer's browser fetch that URL (and a link, HTML tag or autolink would be one click away).

:func:`escape_markdown` is the one helper that makes such a string inert; every Markdown builder of the
project (``ddr_assets.lineage.table_preview``, ``ddr_core.feature_concepts.markdown_table``, the image
previews, the inspector) passes data-derived text through it. Where no Markdown styling is wanted, show
the text with a plain-text element instead (``st.text``, ``st.code``, ``st.dataframe``,
``MetadataValue.text`` / ``json``). The static HTML export escapes with :func:`html.escape` instead
(:mod:`ddr_core.html_export`).
"""

from __future__ import annotations

import re
import string
from typing import Any

_ASCII_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
WORD_JOINER = "\u2060"  # invisible, no line break: splits what GFM's literal autolinks look for
# In the escaped text: the ``:`` of ``scheme://``, the ``.`` of ``www.`` and every ``@`` (e-mail).
_AUTOLINK_TRIGGER = re.compile(r"\\:(?=\\/)|(?i:(?<=www)\\\.)|\\@")


def escape_markdown(text: Any) -> str:
    """``str(text)`` as literal Markdown text on one line (a table cell, a caption, part of a sentence).

    Every ASCII punctuation character is backslash-escaped: CommonMark (and GFM, Dagster's and
    Streamlit's renderers with it) shows ``\\x`` as ``x`` for each of them, so the rendered text is
    exactly the input while nothing in it can be markup: images and links (``![``, ``[``, ``](``),
    autolinks (``<http://...>``), raw HTML tags, comments and entities (``<``, ``>``, ``&``), code
    spans (a backtick), emphasis (``*``, ``_``, ``~``), headings (``#``), lists (``-``, ``+``, ``1.``),
    quotes (``>``), table cell separators (``|``), Streamlit's ``:red[...]`` directives (``[``) and
    ``$`` math (Streamlit still turns a ``:smile:`` shortcode into its emoji, a text-level transform). Line breaks become spaces, so the text cannot start a new block (a
    heading, list, table row or code block) or end the table row it sits in.

    GFM's literal autolinks (a bare ``http://...``, ``www.`` or e-mail address becomes a link) are made
    by remark-gfm (Streamlit's renderer; react-markdown renderers such as Dagster's UI use it too) in
    the text AFTER escapes are resolved, so
    escaping cannot stop them: an invisible :data:`WORD_JOINER` (U+2060) goes before the ``:`` of
    ``scheme://``, the ``.`` of ``www.`` and every ``@``; the text reads the same and is not a link.
    """
    one_line = _LINE_BREAK.sub(" ", str(text))
    escaped = _ASCII_PUNCTUATION.sub(r"\\\1", one_line)
    return _AUTOLINK_TRIGGER.sub(lambda match: WORD_JOINER + match.group(0), escaped)


def markdown_code_block(text: str, language: str = "") -> str:
    """``text`` as a fenced Markdown code block that nothing in it can close.

    The fence is one backtick longer than the longest run of backticks in ``text`` (at least three), so
    a run of backticks inside the text stays code; ``language`` must be a plain word (``json``).
    """
    if not re.fullmatch(r"[A-Za-z0-9_+-]*", language):
        raise ValueError(f"markdown_code_block: language must be a plain word, got {language!r}.")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"
