"""The heatmaps (:mod:`ddr_core.heatmaps`) in the inspector and the HTML export: images as images, text as text.

Both read ``outputs/<experiment>/heatmaps/<variant>/heatmaps.parquet`` and its ``summary.json``; the image paths
in the table go through the viewers' own path checks (``resolve_file``: inside the data root, decodable), and the
prompts and numbers are shown as plain text (escaped in HTML, ``st.text`` in Streamlit), never as Markdown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ddr_core.heatmaps import STAGE, read_heatmaps
from ddr_core.paths import DataLayout
from ddr_core.view_text import escape_html as _e
from ddr_core.view_text import number, show_problem_or_nothing, unreadable


def channel_heatmaps(layout: DataLayout, variant: str, channel: int) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                                                str | None]:
    """``(rows of the channel, variant summary, problem)``: no rows and no problem when there are no heatmaps; a
    table that cannot be read is a problem (its reason), never an error."""
    import polars as pl

    try:
        found = read_heatmaps(layout.stage_dir(STAGE, variant))
    except Exception as error:  # noqa: BLE001 - an unreadable table is shown as a problem
        return [], {}, unreadable("heatmaps", variant, error)
    if found is None:
        return [], {}, None
    table, summary = found
    if "channel" not in table.columns:
        return [], summary, f"the heatmaps table of {variant} has no channel column: re-materialize heatmaps"
    rows = table.filter(pl.col("channel") == int(channel)).sort("rank").to_dicts()
    return rows, summary, None


def _number(value: Any, digits: int = 3) -> str:
    return number(value, digits)


def example_text(row: dict[str, Any]) -> str:
    """One example's facts as one line of plain text."""
    text = (f"#{int(row['rank']) + 1} generation {row['generation_id']} (seed {row['seed']}): peak at step "
            f"{row['peak_step']} (t={row['peak_timestep']}), mean activation {_number(row['peak_mean_activation'])}, "
            f"max over positions {_number(row['peak_max_position_activation'])}")
    if row.get("mask_source") == "fitted world scene":
        text += (f"; heat on the shape {_number(row['heat_on_shape'])} vs chance {_number(row['chance'])} "
                 f"(fitted {row.get('fitted_shape')}, fit RMSE {_number(row.get('fit_rmse'))})")
    elif row.get("mask_source") == "unrecognisable":
        text += f"; not scored: the image is not a recognisable world scene (fit RMSE {_number(row.get('fit_rmse'))})"
    return text


def summary_text(summary: dict[str, Any]) -> str | None:
    """The variant's toy-world score as plain text, or ``None`` when nothing was scored."""
    if not summary.get("scored_examples"):
        return None
    low, high = (summary.get("excess_interval") or [None, None])[:2]
    return (f"Toy world ({summary['scored_channels']} channels, {summary['scored_examples']} examples): "
            f"{_number(summary.get('heat_on_shape'))} of the heat on the shape vs chance {_number(summary.get('chance'))} "
            f"(an ideal shape detector at the layer's resolution: {_number(summary.get('ideal_detector'))}) "
            f"(excess {_number(summary.get('excess'))}, 95% interval [{_number(low)}, {_number(high)}]; p shape "
            f"{_number(summary.get('p_shape'), 4)}, p background {_number(summary.get('p_background'), 4)})")


def render_inspector(layout: DataLayout, variant: str, channel: int,
                     show_image: Callable[..., bool]) -> None:
    """The inspector's "Where it fires" tab (``show_image``: the inspector's checked image display)."""
    import streamlit as st

    rows, summary, problem = channel_heatmaps(layout, variant, channel)
    if show_problem_or_nothing(problem, not rows, "No heatmaps for this channel (materialize the heatmaps asset for "
                                                  "its block)."):
        return
    line = summary_text(summary)
    if line:
        st.text(line)
    for row in rows:
        st.text(example_text(row))
        st.text(f"prompt: {row['prompt']}")
        peak, steps = st.columns(2)
        with peak:
            show_image(layout, row["peak_image"], caption=f"peak step {row['peak_step']}", what="heatmap image")
        with steps:
            show_image(layout, row["steps_image"], caption=f"{row['steps']} steps (animated)",
                       what="heatmap animation")


def heatmaps_html(layout: DataLayout, variant: str, channel: int, img: Callable[..., str]) -> str:
    """The HTML export's "Where it fires" section of a channel page (``img(relative, depth, what, alt=...)``: the
    export's checked image copy)."""
    rows, summary, problem = channel_heatmaps(layout, variant, channel)
    parts: list[str] = []  # the page gives the section its heading (html_export: id "where")
    if problem is not None:
        return "".join(parts) + f'<p class="failed">{_e(problem)}</p>'
    if not rows:
        return "".join(parts) + "<p>No heatmaps.</p>"
    line = summary_text(summary)
    if line:
        parts.append(f"<p>{_e(line)}</p>")
    cards = []
    for row in rows:
        cards.append(f'<div class="card">{img(row["peak_image"], 1, "heatmap image", alt=str(row["prompt"]))}'
                     f'{img(row["steps_image"], 1, "heatmap animation", alt="heat per step")}'
                     f"<div>{_e(example_text(row))}</div><div>{_e(row['prompt'])}</div></div>")
    parts.append(f'<div class="grid">{"".join(cards)}</div>')
    return "".join(parts)
