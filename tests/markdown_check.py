"""What a Markdown renderer would make live in a text: the test side of ``ddr_core.markdown_text``.

:func:`live_markup` parses with markdown-it-py (CommonMark + GFM tables and strikethrough, raw HTML on,
like Dagster's and Streamlit's renderers) and lists every image, link and raw HTML it finds, plus the
bare ``http://`` / ``www.`` / e-mail autolinks that GFM would add (CommonMark leaves them as text:
looked for in the raw source of each inline run, as micromark does, and in its text with the escapes
resolved, as remark-gfm does in Streamlit and react-markdown). :func:`rendered_text` is the text a reader sees.
"""

from __future__ import annotations

import html
import re

from markdown_it import MarkdownIt

_MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])
# GFM literal autolinks: found by micromark / cmark-gfm in the raw source and by remark-gfm (Streamlit,
# react-markdown) in the text after escapes are resolved, so both are searched.
_GFM_AUTOLINK = re.compile(r"(?i)(?:https?://|ftp://|www\.)\S*|[A-Za-z0-9._+-]+(?<!\\)@[A-Za-z0-9-]+\.[A-Za-z]")
_REMARK_AUTOLINK = re.compile(r"(?i)(?:https?://|www(?=\.))[-.\w]+\S*|[-.\w+]+@[-\w]+(?:\.[-\w]+)+")
WORD_JOINER = "\u2060"

# A hostile prompt for each kind of markup (the "attacker" host names the viewer's browser must not fetch).
HOSTILE = [
    "![x](http://attacker.example/pixel.png)",
    "a cat [click](http://attacker.example/phish) on a sofa",
    "<img src=http://attacker.example/tag.png>",
    '<a href="http://attacker.example/html">x</a>',
    "<http://attacker.example/auto>",
    "bare http://attacker.example/bare and www.attacker.example and me@attacker.example",
    "a | b\n| ![y](http://attacker.example/row.png) |",
    "[ref]\n\n[ref]: http://attacker.example/definition",
    "`code` **bold** _it_ ~~s~~ :red[r] $x$\n# heading\n- item\n> quote\n    indented",
    "&lt;img src=http://attacker.example/entity.png&gt; \\![z](http://attacker.example/escaped.png)",
]


def live_markup(markdown: str) -> list[str]:
    """Images, links, raw HTML and GFM autolinks that ``markdown`` would render (empty: text only)."""
    found: list[str] = []
    for token in _MD.parse(markdown):
        if token.type == "html_block":
            found.append(f"html {token.content}")
        if token.type == "inline":  # not in code blocks: GFM makes no autolinks there
            found += [f"autolink {match}" for match in _GFM_AUTOLINK.findall(token.content)]
            # the resolved text of each run between links/images/HTML (inline code is not linked either)
            runs = "".join(c.content if c.type == "text" else "\0" for c in token.children or [])
            found += [f"autolink (text) {match}" for match in _REMARK_AUTOLINK.findall(runs)]
        for child in token.children or []:
            if child.type == "image":
                found.append(f"image {child.attrGet('src')}")
            elif child.type == "link_open":
                found.append(f"link {child.attrGet('href')}")
            elif child.type == "html_inline":
                found.append(f"html {child.content}")
    return found


def rendered_text(markdown: str) -> str:
    """The text a reader sees (tags dropped, entities decoded, invisible word joiners dropped,
    whitespace collapsed)."""
    text = html.unescape(re.sub(r"<[^>]*>", " ", _MD.render(markdown))).replace(WORD_JOINER, "")
    return " ".join(text.split())
