"""Feature matching (``feature_matches``, docs/MATCHING.md) in the inspector's "Across models" tab and the static
HTML report.

Per variant: the comparisons it takes part in (as A or B), each summarised in one sentence (counts of matched /
vanished / appeared features, the null); for the shown channel its best match on the other side (r, the null
threshold, p, q, verdict) with both features' statistics side by side; the concept diff (which concepts the
features without a match stand for, against chance) and the features without a match. Variant names, concept
labels and every other string are data: shown with ``st.text`` / ``st.dataframe`` (plain text) or escaped (HTML).
"""

from __future__ import annotations

import html
import math
from typing import Any

from ddr_core.view_text import html_table

STAGE = "feature_matches"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def finished_comparisons(layout: Any) -> list[str]:
    """Comparison names with a finished folder (``summary.json``) under this experiment, sorted; a folder whose
    name is not a comparison name is skipped."""
    from ddr_core.comparisons import parse_comparison_name
    from ddr_core.feature_matching_stage import SUMMARY_FILE

    root = layout.outputs_dir / STAGE
    if not root.is_dir():
        return []
    names = []
    for folder in sorted(root.iterdir()):
        try:
            parse_comparison_name(folder.name)
        except ValueError:
            continue
        if folder.is_dir() and not folder.is_symlink() and (folder / SUMMARY_FILE).is_file():
            names.append(folder.name)
    return names


def comparisons_of(layout: Any, variant: str) -> list[tuple[str, str]]:
    """``[(comparison, side)]`` of the finished comparisons ``variant`` is part of (side ``"a"`` or ``"b"``)."""
    from ddr_core.comparisons import parse_comparison_name

    found = []
    for name in finished_comparisons(layout):
        a, b = parse_comparison_name(name)
        if variant in (a, b):
            found.append((name, "a" if variant == a else "b"))
    return found


def summary_text(summary: dict[str, Any]) -> str:
    """One sentence: what was compared over what, the counts on both sides and the null."""
    counts_a, counts_b, config = summary["counts_a"], summary["counts_b"], summary["config"]
    text = (f"{summary['a']} (A, {summary['width_a']} units) vs {summary['b']} (B, {summary['width_b']} units) over "
            f"{summary['generations']} generations x {summary['timesteps']} timesteps of {summary['prompts']} prompts. "
            f"A: {counts_a['matched']} matched, {counts_a['vanished']} vanished (no match better than chance), "
            f"{counts_a['silent']} silent. B: {counts_b['matched']} matched, {counts_b['appeared']} appeared, "
            f"{counts_b['silent']} silent. Null: B's prompts shuffled {config['n_permutations']} times; a feature "
            f"is matched when its best {'|r|' if config['absolute'] else 'r'} beats its shuffled best at BH q < "
            f"{config['alpha']:g} (pooled {1 - config['alpha']:.0%} null threshold "
            f"{_fmt(summary['null_pooled_threshold'])}).")
    directions = summary.get("directions")
    if directions:
        text += (f" Directions (decoder rows / channel unit vectors): {directions['above_chance_a']} of A's features "
                 f"have a B direction closer than a random one's 95% ({_fmt(directions['null_threshold_a'])}); "
                 f"{directions['agree_with_activation']} best matches agree with the activation match.")
    return text


def channel_text(found: dict[str, Any], side: str, channel: int) -> str | None:
    """The sentence about feature ``channel`` of this side of a comparison (None when it has no row)."""
    summary = found["summary"]
    frame = found[side]
    rows = frame.filter(frame["feature"] == channel).to_dicts() if frame is not None else []
    if not rows:
        return None
    row = rows[0]
    this, other = (summary["a"], summary["b"]) if side == "a" else (summary["b"], summary["a"])
    if row["status"] == "silent":
        return f"unit {channel} of {this} has no variance in these captures (silent): it cannot be matched."
    verdict = {"matched": "matched", "vanished": "no match better than chance (vanished)",
               "appeared": "no match better than chance (appeared)"}.get(row["status"], row["status"])
    return (f"unit {channel} of {this}: {verdict}. Best match in {other}: unit {row['best']} (r {_fmt(row['r'])}; "
            f"its null's 95% {_fmt(row['null_threshold'])}; p {_fmt(row['p_value'], 4)}, q {_fmt(row['q_value'], 4)})"
            f"; second best {row['second_best']}; Hungarian partner {row['hungarian']} "
            f"(score {_fmt(row['hungarian_score'])}).")


def side_by_side(found: dict[str, Any], side: str, channel: int) -> list[dict[str, Any]]:
    """Both features' statistics: the unit and its best match (mean, std, peak timestep)."""
    frame = found[side]
    rows = frame.filter(frame["feature"] == channel).to_dicts() if frame is not None else []
    if not rows or rows[0]["best"] < 0:
        return []
    row, summary = rows[0], found["summary"]
    this, other = (summary["a"], summary["b"]) if side == "a" else (summary["b"], summary["a"])
    peak = row["best_peak_timestep"]
    return [
        {"variant": this, "unit": channel, "mean": _fmt(row["mean"]), "std": _fmt(row["std"]),
         "peak timestep": str(row["peak_timestep"])},
        {"variant": other, "unit": int(row["best"]), "mean": _fmt(row["best_mean"]), "std": _fmt(row["best_std"]),
         "peak timestep": "-" if peak is None or math.isnan(peak) else str(int(peak))},
    ]


def concept_rows(found: dict[str, Any]) -> list[dict[str, Any]]:
    """The concept diff as display rows (sorted by Fisher p)."""
    concepts = found.get("concepts")
    if concepts is None:
        return []
    rows = sorted(concepts.to_dicts(), key=lambda r: (math.isnan(r["fisher_p"]) if r["fisher_p"] is not None
                                                      else True, r["fisher_p"] or 0.0))
    return [{"concept": f"{r['family']}={r['value']}", "A features selective": r["n_selective"],
             "vanished": r["n_vanished"], "chance": _fmt(r["expected_vanished"], 2),
             "share vanished [95% Wilson]": f"{_fmt(r['share_vanished'], 2)} [{_fmt(r['share_low'], 2)}, "
                                            f"{_fmt(r['share_high'], 2)}]",
             "share among the others": _fmt(r["share_vanished_others"], 2),
             "Fisher p": _fmt(r["fisher_p"], 4), "BH q": _fmt(r["fisher_q"], 4),
             "median best r (selective / others)": f"{_fmt(r.get('median_score'), 2)} / "
                                                   f"{_fmt(r.get('median_score_others'), 2)}",
             "Mann-Whitney p": _fmt(r.get("mannwhitney_p"), 4)} for r in rows]


def unmatched_rows(found: dict[str, Any], side: str, limit: int = 50) -> list[dict[str, Any]]:
    """This side's features without a match better than chance (lowest best score first)."""
    frame = found[side]
    if frame is None:
        return []
    missing = frame.filter(frame["status"].is_in(["vanished", "appeared"])).sort("score").head(limit)
    return [{"unit": r["feature"], "best match": r["best"], "r": _fmt(r["r"]), "null 95%": _fmt(r["null_threshold"]),
             "p": _fmt(r["p_value"], 4)} for r in missing.to_dicts()]


def matching_lines(layout: Any, variants: list[str]) -> list[str]:
    """The demo's last lines: per finished comparison of two of ``variants``, its summary and the concepts whose
    features vanished more than chance."""
    from ddr_core.comparisons import parse_comparison_name

    lines: list[str] = []
    for name in finished_comparisons(layout):
        if not set(parse_comparison_name(name)) <= set(variants):
            continue
        try:
            found = _read(layout, name)
        except Exception:  # noqa: BLE001 - the inspector and the report name the problem
            continue
        lines.append(f"  {name}: {summary_text(found['summary'])}")
        rows = [row for row in concept_rows(found) if row["vanished"]]
        if found.get("concepts") is not None and not rows:
            lines.append("    no feature of A selective for a concept vanished")
        for row in rows[:3]:
            lines.append(f"    {row['concept']}: {row['vanished']} of {row['A features selective']} selective "
                         f"features vanished (chance {row['chance']}), share {row['share vanished [95% Wilson]']} "
                         f"vs {row['share among the others']} of the others, Fisher p {row['Fisher p']} "
                         f"(BH q {row['BH q']})")
    return ["Feature matching (feature_matches; docs/MATCHING.md):", *lines] if lines else []


def _read(layout: Any, name: str) -> dict[str, Any]:
    from ddr_core.feature_matching_stage import read_matches

    return read_matches(layout.stage_dir(STAGE, name))


# --- Streamlit ---------------------------------------------------------------------------------------


def render_across_models(layout: Any, variant: str, channel: int) -> None:
    """The inspector's "Across models" tab for the shown variant and channel."""
    import streamlit as st

    found_comparisons = comparisons_of(layout, variant)
    if not found_comparisons:
        st.text(f"No feature matching involves {variant} (materialize feature_matches for a comparison naming it; "
                "docs/MATCHING.md).")
        return
    names = [name for name, _ in found_comparisons]
    name = st.selectbox("Comparison", names, key="matching_comparison") if len(names) > 1 else names[0]
    side = dict(found_comparisons)[name]
    try:
        found = _read(layout, name)
    except Exception as error:  # an unreadable folder: say so, the rest of the page stays
        st.text(f"feature_matches[{name}] cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                "re-materialize it")
        return
    st.text(summary_text(found["summary"]))
    sentence = channel_text(found, side, channel)
    st.text(sentence or f"unit {channel} has no row in feature_matches[{name}].")
    pair = side_by_side(found, side, channel)
    if pair:
        st.dataframe(pair, hide_index=True)
    concepts = concept_rows(found)
    if concepts:
        st.text("Which concepts A's features without a match stand for (one-sided Fisher exact vs A's other "
                "features; chance = selective features x A's overall vanished share):")
        st.dataframe(concepts, hide_index=True)
    missing = unmatched_rows(found, side)
    st.text(f"{'Vanished' if side == 'a' else 'Appeared'} units of {variant} ({len(missing)} shown):")
    if missing:
        st.dataframe(missing, hide_index=True)


# --- HTML -------------------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    return html_table(rows, "matching")


def matching_html(layout: Any, variant: str) -> str:
    """The index page's "Across models" section (anchor ``across``), or ``""`` without a finished comparison."""
    parts = []
    for name, side in comparisons_of(layout, variant):
        try:
            found = _read(layout, name)
        except Exception as error:  # noqa: BLE001 - listed, the report goes on
            parts.append(f"<p>{html.escape(f'feature_matches[{name}] cannot be read ({type(error).__name__})')}</p>")
            continue
        parts.append(f"<h3>{html.escape(name)}</h3><p>{html.escape(summary_text(found['summary']))}</p>"
                     + _table(concept_rows(found))
                     + (f"<p>{html.escape('Vanished' if side == 'a' else 'Appeared')} units:</p>"
                        + _table(unmatched_rows(found, side)) if unmatched_rows(found, side) else ""))
    if not parts:
        return ""
    return '<section id="across"><h2>Across models (feature matching)</h2>' + "".join(parts) + "</section>"


def channel_matching_html(layout: Any, variant: str, channel: int) -> str:
    """The channel page's section: its match in each comparison (``""`` without one)."""
    parts = []
    for name, side in comparisons_of(layout, variant):
        try:
            found = _read(layout, name)
        except Exception:  # noqa: BLE001 - the index page lists it
            continue
        sentence = channel_text(found, side, channel)
        if sentence:
            parts.append(f"<p>{html.escape(name)}: {html.escape(sentence)}</p>" + _table(side_by_side(found, side,
                                                                                                     channel)))
    return "".join(parts) or "<p>No feature matching involves this unit.</p>"
