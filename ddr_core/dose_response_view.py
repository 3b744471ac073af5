"""The dose-response grid (:mod:`ddr_core.dose_response`) in the inspector and the static HTML report.

Per channel: the grid's images of its first seed (rows: the unsteered cell and the windows ``inside`` /
``outside`` / ``all``; columns: strengths), each captioned with the classifier's probability of the channel's
concepts and the re-measured activation (relative to the channel's peak max activation), means over seeds in a
table. Per variant: the causal test's effects with their intervals and p-values. Every label is data: escaped
(HTML) or shown as plain text (Streamlit), never interpreted.
"""

from __future__ import annotations

import html
import math
from typing import Any

import polars as pl

from ddr_core.view_text import html_table

STAGE = "dose_response"
WINDOWS = ("none", "inside", "outside", "all")  # ddr_core.dose_response.WINDOWS (not imported: it loads torch)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def channel_grid(layout: Any, variant: str, channel: int) -> pl.DataFrame:
    """The finished grid of ``channel`` (empty when it has none)."""
    from ddr_core.dose_response import read_grid

    return read_grid(layout.stage_dir(STAGE, variant), [channel])


def grid_rows(grid: pl.DataFrame) -> list[dict[str, Any]]:
    """Means over seeds per cell: window, strength, steered steps, re-measured activation, concept probability."""
    if grid.height == 0:
        return []
    means = (grid.group_by("window", "multiple")
             .agg(pl.col("steered_steps").first(), pl.col("activation_rel").mean(), pl.col("concept_prob").mean(),
                  pl.len().alias("seeds")))
    order = {w: i for i, w in enumerate(WINDOWS)}
    rows = sorted(means.iter_rows(named=True), key=lambda r: (order.get(r["window"], 99), r["multiple"]))
    return [{"window": r["window"], "strength": f"x{r['multiple']:g}" if r["multiple"] else "-",
             "steered steps": r["steered_steps"], "activation / peak max": _fmt(r["activation_rel"]),
             "concept probability": _fmt(r["concept_prob"]), "seeds": r["seeds"]} for r in rows]


def image_cells(grid: pl.DataFrame) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(window, [cell of each strength])]`` of the first seed, rows in :data:`WINDOWS` order."""
    if grid.height == 0:
        return []
    first = grid.filter(pl.col("seed") == grid["seed"].min())
    return [(window, first.filter(pl.col("window") == window).sort("multiple").to_dicts())
            for window in WINDOWS if first.filter(pl.col("window") == window).height]


def caption(cell: dict[str, Any]) -> str:
    strength = f"x{cell['multiple']:g}" if cell["multiple"] else "unsteered"
    prob = f", p(concept) {_fmt(cell['concept_prob'])}" if cell.get("concept_prob") is not None else ""
    return f"{strength}: act {_fmt(cell['activation_rel'])}{prob}"


def window_text(grid: pl.DataFrame) -> str:
    inside = grid.filter(pl.col("window") == "inside")
    outside = grid.filter(pl.col("window") == "outside")
    if inside.height == 0:
        return ""
    concepts = grid["concepts"][0] or "no significant concept"
    return (f"peak t={grid['peak'][0]}; inside window t={inside['window_low'][0]}..{inside['window_high'][0]}, "
            f"outside window t={outside['window_low'][0]}..{outside['window_high'][0]}; concepts: {concepts}")


# --- Streamlit ---------------------------------------------------------------------------------------


def render_dose_response(layout: Any, variant: str, channel: int, show_image: Any) -> None:
    """The inspector's tab: the channel's grid, then the variant's effects. ``show_image(layout, relative,
    caption=..., what=...)`` is the inspector's image helper."""
    import streamlit as st

    from ddr_core.dose_response import effect_lines, read_dose_response

    grid = channel_grid(layout, variant, channel)
    if grid.height == 0:
        st.info("No dose-response grid for this channel (materialize dose_response for its block).")
    else:
        st.text(window_text(grid))  # concept labels are data: plain text
        st.dataframe(grid_rows(grid), hide_index=True)
        for window, cells in image_cells(grid):
            st.text(f"{window} (seed {cells[0]['seed']})")
            columns = st.columns(max(len(cells), 1))
            for column, cell in zip(columns, cells, strict=False):
                with column:
                    show_image(layout, cell["image"], caption=caption(cell), what="dose-response image")
    found = read_dose_response(layout.stage_dir(STAGE, variant))
    if found is not None and found[0].height:
        st.text(f"Causal test over the variant's {len(found[2]['channels'])} channel(s) "
                "(difference of means, 95% bootstrap over channels, one-sided sign-flip p):")
        st.dataframe(effect_lines(found[0]), hide_index=True)


# --- HTML -------------------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    return html_table(rows, "dose")


def dose_response_html(layout: Any, variant: str, channel: int, files: Any) -> str:
    """The channel page's section (``files``: the export's image copier, ``files.img(relative, depth, what)``)."""
    grid = channel_grid(layout, variant, channel)
    parts: list[str] = []  # the page gives the section its heading (html_export: id "dose")
    if grid.height == 0:
        return "<p>No dose-response grid for this channel.</p>"
    parts.append(f"<p>{html.escape(window_text(grid))}</p>{_table(grid_rows(grid))}")
    for window, cells in image_cells(grid):
        cards = "".join(f'<div class="card">{files.img(c["image"], 1, "dose-response image")}'
                        f"<div>{html.escape(caption(c))}</div></div>" for c in cells)
        parts.append(f'<h3>{html.escape(window)} (seed {cells[0]["seed"]})</h3><div class="grid">{cards}</div>')
    return "".join(parts)


def dose_effects_html(layout: Any, variant: str) -> str:
    """The index page's section: the variant's causal-test effects, or ``""`` without a summarised grid."""
    from ddr_core.dose_response import effect_lines, read_dose_response

    found = read_dose_response(layout.stage_dir(STAGE, variant))
    if found is None or found[0].height == 0:
        return ""
    return (f"<h2>Steering dose-response: the causal test ({len(found[2]['channels'])} channel(s))</h2>"
            "<p>Difference of means (95% bootstrap over channels, one-sided sign-flip p over channel means).</p>"
            + _table(effect_lines(found[0])))


# --- the demo's last lines ---------------------------------------------------------------------------------


def dose_response_lines(layout: Any, variants: list[str]) -> list[str]:
    """Per variant with a summarised grid: the causal test's contrasts of the concept probability (and of the
    re-measured activation where no channel has a concept), each strength with its interval and p-value."""
    from ddr_core.dose_response import read_dose_response

    lines: list[str] = []
    for variant in variants:
        found = read_dose_response(layout.stage_dir(STAGE, variant))
        if found is None or found[0].height == 0:
            continue
        effects, _, summary = found
        if not lines:
            lines.append("Steering dose-response (dose_response; difference of means [95% bootstrap over channels], "
                         "one-sided sign-flip p, uncorrected):")
        metric = "concept_prob" if summary.get("channels_with_concept") else "activation_rel"
        what = "concept probability" if metric == "concept_prob" else "activation / peak max"
        n = len(summary.get("channels_with_concept") or summary["channels"])
        lines.append(f"  dose-response {variant}: {what}, {n} channel(s)")
        for contrast in ("inside-outside", "inside-none", "outside-none", "all-none"):
            rows = effects.filter((pl.col("metric") == metric) & (pl.col("contrast") == contrast)).sort("multiple")
            parts = [f"x{r['multiple']:g} {r['value']:+.3f} [{_fmt(r['low'], 3)}, {_fmt(r['high'], 3)}] "
                     f"p {_fmt(r['p_value'], 4)}" for r in rows.iter_rows(named=True)]
            if parts:
                lines.append(f"    {contrast}: " + "; ".join(parts))
    return lines
