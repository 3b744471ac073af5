"""Streamlit inspector of the representation stage: one channel at a time, at one timestep.

Run::

    streamlit run ddr_core/inspector_app.py -- --data-root data [--experiment default]
    ddr inspect --data-root data            # the same, on 127.0.0.1:8501

Arguments after ``--`` are the app's; without them ``DDR_DATA_ROOT`` / ``DDR_EXPERIMENT`` (defaults
``./data`` / ``default``) are used. The sidebar chooses the variant, sorts / filters / searches the
active channels, steps through them and chooses the timestep (activity peaks, timesteps with data, or
any number 0..1000). The left column shows the activity profile and the maximum activation over the
timesteps (axis reversed: denoising runs from 1000 to 0; peaks, visualised timesteps and the current
timestep marked); the right column has tabs for the deep dream visualisation (noise / no-noise run,
seed, intermediate optimisation steps with their statistics), the dataset examples and the priors.

For a variant with ground-truth concept scores (``feature_concepts/<variant>/``, toy world), the page
shows the channel's labels above the charts (dominant value and purity of each concept family among its
top dataset examples, with the chance level, and how often its priors and dreams are classified as that
value), and the channels can be sorted by purity.

Shards come from ``representation/<variant>/channel_<c>.json`` (built in memory from the upstream
stages when the representation stage has not run). Every file is opened through
:func:`ddr_core.representation.resolve_file`, so a path in a shard cannot leave the data root.

Bad data never breaks the page: a shard that cannot be read (truncated, wrong field types) is a warning naming
it and the fix, and every other channel stays reachable; an unreadable index is rebuilt from the statistics,
an unreadable curve table replaced by the shard's observed points, an unreadable ground-truth table left out,
and an image that is missing, refused (outside the data root, a NUL byte, a name too long) or not decodable
is a warning in its place -- each with a warning naming the file.

Text from the data (prompts, concept labels, variant names, file names, failure messages) is shown as
text: prompts with ``st.text`` (no Markdown at all), and wherever Streamlit renders Markdown (markdown,
captions, headings, alerts, image captions, button labels) through
:func:`ddr_core.markdown_text.escape_markdown`, so a prompt like ``![x](http://attacker/...)`` is never
an image the browser fetches, nor a link.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from ddr_core.column_help import COLUMN_HELP
from ddr_core.dose_response_view import render_dose_response
from ddr_core.dream_verdict import unshown_dream_lines
from ddr_core.feature_concepts import feature_concepts_dir, read_feature_concepts
from ddr_core.heatmap_view import render_inspector as render_heatmaps
from ddr_core.labels_view import render_inspector as render_label
from ddr_core.markdown_text import escape_markdown
from ddr_core.matching_view import render_across_models
from ddr_core.paths import DataLayout
from ddr_core.representation import (
    DREAM_RUNS,
    BadShardError,
    MissingStatsError,
    ShardFileError,
    check_image,
    curves_or_observed,
    display_path,
    list_variants,
    load_index_or_rebuild,
    load_shard,
    representation_dir,
    resolve_file,
    search_channels,
    shard_path,
)

DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"
SORT_OPTIONS = {
    "channel": ("channel", False),
    "activity (total frequency)": ("total_frequency", True),
    "peak timestep": ("top_peak_timestep", True),
    "dream quality (dream / top example)": ("dream_ratio_mean", True),
    "max activation": ("max_activation", True),
}
CONCEPT_SORT_OPTION = "concept purity (ground truth)"
CONCEPT_SOURCES = {"prior": "priors", "dream": "dreams"}
RUN_LABELS = {"noise": "with schedule noise", "no_noise": "without schedule noise"}
PEAK_COLOR, VISUALISED_COLOR, CURRENT_COLOR = "#e74c3c", "#2ecc71", "#3b5bdb"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ddr inspector (Streamlit)", add_help=False)
    parser.add_argument("--data-root", default=os.environ.get("DDR_DATA_ROOT", "data"))
    parser.add_argument("--experiment", default=os.environ.get("DDR_EXPERIMENT", "default"))
    args, _unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args


DAGSTER_URL_PATTERN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%/-]*)?")


def dagster_asset_url(asset: str = "representation_shards") -> str | None:
    """The Dagster UI page of ``asset`` under ``$DDR_DAGSTER_URL`` (default http://127.0.0.1:3000).

    ``None`` when the variable is not a plain ``http(s)://host[:port][/path]`` URL: it goes into a
    Markdown link, so nothing that could end the link or add markup is accepted.
    """
    base = os.environ.get("DDR_DAGSTER_URL", DEFAULT_DAGSTER_URL).strip().rstrip("/")
    if not DAGSTER_URL_PATTERN.fullmatch(base):
        return None
    return f"{base}/assets/{asset}"


# --- cached data access (keys: plain strings and file modification times) ---------------------------


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_data(show_spinner=False, max_entries=16)
def cached_index(data_root: str, experiment: str, variant: str, stamp: float) -> tuple[pd.DataFrame, str | None]:
    """The index and, where ``index.parquet`` was unusable (then rebuilt in memory), why."""
    frame, problem = load_index_or_rebuild(DataLayout(Path(data_root), experiment), variant)
    return frame.to_pandas(), problem


@st.cache_data(show_spinner=False, max_entries=64)
def cached_shard(data_root: str, experiment: str, variant: str, channel: int, stamp: float) -> dict[str, Any]:
    return load_shard(DataLayout(Path(data_root), experiment), variant, channel)


@st.cache_data(show_spinner=False, max_entries=64)
def cached_curves(data_root: str, experiment: str, shard: dict[str, Any]) -> tuple[pd.DataFrame, str | None]:
    """The curves and, where the curve table was unusable (then drawn from the observed points), why."""
    frame, problem = curves_or_observed(DataLayout(Path(data_root), experiment), shard)
    return frame.to_pandas(), problem


def shard_or_problem(layout: DataLayout, variant: str, channel: int, stamp: float
                     ) -> tuple[dict[str, Any] | None, str | None]:
    """The channel's shard, or ``None`` and why it cannot be shown (a bad file, or a failed in-memory build)."""
    try:
        return cached_shard(str(layout.data_root), layout.experiment, variant, channel, stamp), None
    except (BadShardError, MissingStatsError, ShardFileError) as error:
        return None, str(error)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:  # the in-memory build failed
        return None, (f"the shard of channel {channel} cannot be built from the upstream stages "
                      f"({type(error).__name__}: {str(error)[:300]})")


@st.cache_data(show_spinner=False, max_entries=32)
def cached_search(data_root: str, experiment: str, variant: str, text: str, stamp: float) -> list[int]:
    frame = search_channels(DataLayout(Path(data_root), experiment), variant, text, limit=100_000)
    return frame["channel"].to_list()


@st.cache_data(show_spinner=False, max_entries=16)
def cached_feature_concepts(data_root: str, experiment: str, variant: str,
                            stamp: float) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    found = read_feature_concepts(feature_concepts_dir(DataLayout(Path(data_root), experiment), variant))
    return None if found is None else (found[0].to_pandas(), found[1])


# --- helpers ------------------------------------------------------------------------------------------


def show_image(layout: DataLayout, relative: str | None, caption: str | None = None, what: str = "image") -> bool:
    """Show the image ``relative`` (below the data root) or a warning naming why it cannot be shown.

    The caption and the warning (which names the path from the shard) are escaped Markdown.
    """
    try:
        data = resolve_file(layout.data_root, relative, what).read_bytes()
    except ShardFileError as error:
        st.warning(escape_markdown(error))
        return False
    except OSError as error:
        st.warning(escape_markdown(f"{what} {display_path(relative)} cannot be read: {error.strerror or error}"))
        return False
    problem = check_image(data)
    if problem is not None:
        st.warning(escape_markdown(f"{what} {display_path(relative)} is {problem}"))
        return False
    st.image(data, caption=None if caption is None else escape_markdown(caption), width="stretch")
    return True


def nearest(values: list[int], target: int) -> int | None:
    if not values:
        return None
    return min(values, key=lambda v: (abs(v - target), -v))


def set_timestep(value: int) -> None:
    value = int(max(0, min(1000, value)))
    st.session_state["timestep"] = value
    st.session_state["timestep_input"] = value
    st.session_state.pop("data_timestep", None)  # re-chosen as the nearest timestep with data


def on_timestep_input() -> None:
    st.session_state["timestep"] = int(st.session_state["timestep_input"])


def on_data_timestep() -> None:
    value = st.session_state.get("data_timestep")
    if value is not None:
        set_timestep(int(value))


def open_link(variants: list[str]) -> None:
    """Once per browser session: open what the URL names (``?variant=<v>&channel=<c>&t=<t>``, as
    :func:`link_params` writes it), so a channel's URL can be bookmarked or sent. Values are checked: an unknown
    variant, or a channel not in the list, falls back to the first one."""
    if st.session_state.get("_link_opened"):
        return
    st.session_state["_link_opened"] = True
    params = st.query_params
    if params.get("variant") in variants:
        st.session_state["variant"] = params["variant"]
    if str(params.get("channel", "")).isdigit():
        st.session_state["channel"] = int(params["channel"])
    if str(params.get("t", "")).isdigit():
        st.session_state["_link_timestep"] = min(int(params["t"]), 1000)


def link_params(variant: str, channel: int, timestep: int) -> None:
    """Keep the page's URL on what it shows (other parameters, such as the access token, stay)."""
    wanted = {"variant": variant, "channel": str(channel), "t": str(timestep)}
    if any(st.query_params.get(k) != v for k, v in wanted.items()):
        st.query_params.update(wanted)


def step_channel(channels: list[int], offset: int) -> None:
    current = st.session_state.get("channel")
    position = channels.index(current) if current in channels else 0
    st.session_state["channel"] = channels[(position + offset) % len(channels)]


# --- charts ----------------------------------------------------------------------------------------------


def activity_chart(shard: dict[str, Any], curves: pd.DataFrame, current: int, height: int) -> alt.LayerChart:
    total = int(shard["total_timesteps"])
    x = alt.X("timestep:Q", scale=alt.Scale(domain=[total, 0]), title="timestep (denoising →)")
    base = alt.Chart(curves).encode(x=x)
    area = base.mark_area(color=VISUALISED_COLOR, opacity=0.2).encode(y=alt.Y("activity:Q", title="frequency in top-k"))
    line = base.mark_line(color="#2b8a3e").encode(y="activity:Q", tooltip=["timestep", "activity"])
    observed = pd.DataFrame({"timestep": shard["observed"]["timestep"], "activity": shard["observed"]["frequency"]})
    points = alt.Chart(observed).mark_point(color="gray", size=20).encode(x=x, y="activity:Q")
    activity_at = dict(zip(curves["timestep"], curves["activity"], strict=True))
    markers = [{"timestep": t, "activity": float(activity_at.get(t, 0.0)), "kind": "visualised"}
               for t in shard["visualised_timesteps"]]
    markers += [{"timestep": p["timestep"], "activity": p["height"], "kind": f"peak #{p['rank'] + 1}"}
                for p in shard["peaks"]]  # drawn last: on top of a visualised marker at the same timestep
    layers = [area, line, points]
    if markers:
        frame = pd.DataFrame(markers)
        frame["colour"] = [PEAK_COLOR if k.startswith("peak") else VISUALISED_COLOR for k in frame["kind"]]
        frame["shape"] = ["cross" if k.startswith("peak") else "circle" for k in frame["kind"]]
        layers.append(alt.Chart(frame).mark_point(filled=True, size=140, opacity=1.0).encode(
            x=x, y="activity:Q", color=alt.Color("colour:N", scale=None), shape=alt.Shape("shape:N", scale=None),
            tooltip=["timestep", "kind", "activity"]))
    layers.append(alt.Chart(pd.DataFrame({"timestep": [current]})).mark_rule(color=CURRENT_COLOR, strokeWidth=2)
                  .encode(x=x))
    return alt.layer(*layers).properties(title=f"activity profile - channel {shard['channel']}", height=height)


def max_activation_chart(shard: dict[str, Any], curves: pd.DataFrame, current: int, height: int) -> alt.LayerChart:
    total = int(shard["total_timesteps"])
    x = alt.X("timestep:Q", scale=alt.Scale(domain=[total, 0]), title="timestep (denoising →)")
    line = alt.Chart(curves).mark_line(color="#e67e22").encode(
        x=x, y=alt.Y("max_activation:Q", title="max activation"), tooltip=["timestep", "max_activation"])
    observed = pd.DataFrame({"timestep": shard["observed"]["timestep"],
                             "max_activation": shard["observed"]["max_activation"]}).dropna()
    points = alt.Chart(observed).mark_point(color="#e67e22", size=25, filled=True).encode(x=x, y="max_activation:Q")
    rule = alt.Chart(pd.DataFrame({"timestep": [current]})).mark_rule(color=CURRENT_COLOR, strokeWidth=2).encode(x=x)
    return alt.layer(line, points, rule).properties(title="maximum activation over the dataset", height=height)


def render_compare(layout: DataLayout, variants: list[str], variant: str, channel: int, current: int,
                   height: int) -> None:
    """Another channel beside this one (any variant: raw vs SAE, a finetune vs its base): its activity profile on
    the same axis and its top dataset examples at its top peak (prompts as text)."""
    other_variant = st.selectbox("Variant", variants, index=variants.index(variant), key="compare_variant")
    stamp = _mtime(representation_dir(layout, other_variant) / "index.parquet")
    index, _ = cached_index(str(layout.data_root), layout.experiment, other_variant, stamp)
    active = [int(c) for c in index.loc[index["is_active"], "channel"]]
    if not active:
        st.info(escape_markdown(f"{other_variant} has no active channels."))
        return
    if st.session_state.get("compare_channel") not in active:
        st.session_state["compare_channel"] = next((c for c in active if c != channel), active[0])
    other = st.selectbox("Channel", active, key="compare_channel", format_func=lambda c: f"channel {c:05d}")
    shard, problem = shard_or_problem(layout, other_variant, other, _mtime(shard_path(layout, other_variant, other)))
    if shard is None:
        st.warning(escape_markdown(f"channel {other} of {other_variant} cannot be shown: {problem}"))
        return
    curves, _ = cached_curves(str(layout.data_root), layout.experiment, shard)
    st.altair_chart(activity_chart(shard, curves, current, height).properties(
        title=f"activity profile - {other_variant} channel {other}"), width="stretch")
    peak = shard["peaks"][0]["timestep"] if shard["peaks"] else None
    at = nearest(sorted({e["timestep"] for e in shard["examples"]}, reverse=True), peak if peak is not None else 0)
    examples = [e for e in shard["examples"] if e["timestep"] == at][:3]
    for column, example in zip(st.columns(3), examples, strict=False):
        with column:
            show_image(layout, example["image"], what="dataset example image",
                       caption=f"t={at} #{example['rank'] + 1}")
            st.text(example["prompt"] or "")  # a prompt is data: plain text, never Markdown


# --- tabs --------------------------------------------------------------------------------------------------


def render_visualisation(layout: DataLayout, shard: dict[str, Any], current: int) -> None:
    for run in DREAM_RUNS:  # not pictures of the channel: listed with their numbers, as plain text
        lines = unshown_dream_lines(shard["dreams"].get(run) or {})
        if lines:
            st.caption(f"{RUN_LABELS.get(run, run)}: not shown as dreams")
            st.text("\n".join(lines))
    runs = {run: shard["dreams"][run] for run in DREAM_RUNS if (shard["dreams"].get(run) or {}).get("results")}
    if not runs:
        st.info("No deep dreams for this channel that raised its activation (run the dreams stage).")
        return
    run = st.radio("Run", list(runs), format_func=lambda r: RUN_LABELS.get(r, r), horizontal=True, key="dream_run")
    section = runs.get(run) or next(iter(runs.values()))
    results = [r for r in section["results"] if r["timestep"] == current]
    if not results:
        st.info(escape_markdown(f"No visualisation at timestep {current}. Visualised timesteps of this run: "
                                f"{sorted({r['timestep'] for r in section['results']}, reverse=True)}"))
        return
    seeds = [r["seed"] for r in results]
    if st.session_state.get("dream_seed") not in seeds:
        st.session_state["dream_seed"] = seeds[0]
    seed = st.selectbox("Seed", seeds, key="dream_seed")
    result = next(r for r in results if r["seed"] == seed)
    steps = result["steps"]
    position = len(steps)
    if steps:
        position = st.slider("Optimisation step", 0, len(steps), len(steps), key=f"dream_step_{run}_{current}_{seed}",
                             help="0 is the start; the rightmost position is the final result")
    if position < len(steps):
        label, image, stats = f"step {steps[position]['step']}", steps[position]["image"], steps[position]
    else:
        label, image, stats = "final result", result["image"], result["final_stats"]
    col_stats, col_image = st.columns([1, 2])
    with col_image:
        st.subheader(escape_markdown(label))
        show_image(layout, image, caption=f"channel {shard['channel']}, t={current}, seed {seed}", what="dream image")
    with col_stats:
        if result["failed"]:
            st.error(f"optimisation failed: {escape_markdown(result['failure_reason'])}")
        activation = stats.get("activation") if stats else None
        if position >= len(steps) and result["final_activation"] is not None:
            activation = result["final_activation"]
        st.metric("Activation", "n/a" if activation is None else f"{activation:.4f}")
        for name in ("tv", "range", "moment", "loss"):
            value = stats.get(name) if stats else None
            st.write(f"**{name}**: {'n/a' if value is None else f'{value:.4f}'}")
        quality = [q for q in shard.get("quality", {}).get(run, []) if q["timestep"] == current and q["seed"] == seed]
        if quality and quality[0].get("ratio") is not None:
            st.metric("dream / top example", f"{quality[0]['ratio']:.3f}", help=COLUMN_HELP["dream / top example"])


def render_examples(layout: DataLayout, shard: dict[str, Any], current: int) -> None:
    example_timesteps = sorted({e["timestep"] for e in shard["examples"]}, reverse=True)
    at = nearest(example_timesteps, current)
    if at is None:
        st.info("No dataset examples for this channel.")
        return
    examples = [e for e in shard["examples"] if e["timestep"] == at]
    note = "" if at == current else f" (nearest observed timestep to {current})"
    st.markdown(f"**{len(examples)} dataset examples at timestep {escape_markdown(at)}{escape_markdown(note)}**")
    columns = st.columns(3)
    for i, example in enumerate(examples):
        with columns[i % 3]:
            activation = example["activation"]
            show_image(layout, example["image"], what="dataset example image",
                       caption=f"#{example['rank'] + 1} - activation "
                               f"{'n/a' if activation is None else f'{activation:.3f}'}")
            st.text(example["prompt"] or "")  # a prompt is data: plain text, never Markdown


def render_priors(layout: DataLayout, shard: dict[str, Any]) -> None:
    priors = shard.get("priors")
    if not priors:
        st.info("No priors for this channel (run the priors stage).")
        return
    if priors["status"] != "done":
        st.info(escape_markdown(f"Priors skipped: {priors.get('reason')} - {priors.get('message') or ''}"))
        return
    st.markdown(f"**{len(priors['images'])} priors** (empty prompt, steered at {len(priors['steered_timesteps'])} "
                f"timesteps: {escape_markdown(priors['steered_timesteps'][:12])})")
    columns = st.columns(4)
    for i, item in enumerate(priors["images"]):
        with columns[i % 4]:
            show_image(layout, item["image"], what="prior image",
                       caption=f"seed {item['seed']}" + (f"; {item['verdict']}" if item.get("verdict") else ""))


def render_cfg_contrast(layout: DataLayout, variant: str, channel: int) -> None:
    """Both CFG halves' mean activity per timestep and their difference (``cfg_contrast``), with the
    channel's sentence as plain text."""
    from ddr_core.cfg_contrast import channel_contrast, contrast_sentence

    try:
        summary, profile, row = channel_contrast(layout.stage_dir("cfg_contrast", variant), channel)
    except Exception as error:  # an unreadable table: the page goes on without it
        st.warning(escape_markdown(f"cfg_contrast cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                                   "re-materialize cfg_contrast"))
        return
    st.text(contrast_sentence(summary, row))
    if profile is None or not profile.height:
        return
    frame = profile.to_pandas()
    halves = frame.melt(id_vars="timestep", value_vars=["mean_conditional", "mean_unconditional"],
                        var_name="half", value_name="activation")
    halves["half"] = halves["half"].str.removeprefix("mean_")
    axis = alt.X("timestep:Q", scale=alt.Scale(reverse=True), title="timestep")
    lines = alt.Chart(halves).mark_line().encode(axis, alt.Y("activation:Q", title="mean activation"),
                                                 alt.Color("half:N"), tooltip=["timestep", "half", "activation"])
    band = alt.Chart(frame).mark_area(opacity=0.25, color="#c2255c").encode(
        axis, alt.Y("ci_low:Q", title="conditional - unconditional"), alt.Y2("ci_high:Q"))
    difference = alt.Chart(frame).mark_line(color="#c2255c").encode(axis, alt.Y("difference:Q"),
                                                                      tooltip=["timestep", "difference"])
    st.altair_chart(lines.properties(height=200), width="stretch")
    st.altair_chart((band + difference).properties(height=160), width="stretch")


def _share(value: Any) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.2f}"


def ground_truth_text(row: dict[str, Any] | None, summary: dict[str, Any]) -> str:
    """One markdown line with a channel's ground-truth labels (see the module docstring).

    Family names and concept values come from the data: escaped, only the bold markers are Markdown.
    """
    families = summary.get("families", [])
    if row is None:
        return "**Ground truth**: this channel is not in the feature_concepts table."
    if row.get("purity") is None or pd.isna(row.get("purity")):
        needed = summary.get("config", {}).get("min_examples")
        return (f"**Ground truth**: not scored ({int(row.get('n_labelled') or 0)} labelled top examples"
                + (f", needs {needed})" if needed else ")"))
    timestep = row.get("examples_timestep")
    where = "" if timestep is None or pd.isna(timestep) else f" at t={int(timestep)}"
    verdict = f"selective for {escape_markdown(row['concept'])}" if row.get("concept") else "not selective"
    head = f"**Ground truth** ({int(row['n_labelled'])} labelled top prompts{where}): {verdict} ·"
    parts = [f"{escape_markdown(family)} **{escape_markdown(row[f'dominant_{family}'])}** "
             f"(purity {_share(row[f'purity_{family}'])}, chance {_share(row[f'chance_purity_{family}'])}, "
             f"q {_share(row.get(f'q_{family}'))})"
             for family in families]
    for source, label in CONCEPT_SOURCES.items():
        count = row.get(f"n_{source}_images")
        if count is None or pd.isna(count):
            continue
        if not count:
            parts.append(f"{label}: none")
            continue
        agreement = ", ".join(f"{escape_markdown(family)} {_share(row.get(f'{source}_agreement_{family}'))}"
                              for family in families)
        recognisable = row.get(f"{source}_recognisable")
        look = "" if recognisable is None or pd.isna(recognisable) else f", {_share(recognisable)} recognisable"
        parts.append(f"{label} agree: {agreement} ({int(count)} images{look})")
    return head + " " + " · ".join(parts)


# --- the page ----------------------------------------------------------------------------------------------


def filtered_channels(index: pd.DataFrame, layout: DataLayout, variant: str) -> list[int]:
    frame = index[index["is_active"]]
    options = dict(SORT_OPTIONS)
    if "purity" in index.columns:
        options[CONCEPT_SORT_OPTION] = ("purity", True)
    with st.expander("Sort, filter and search", expanded=False):
        sort_label = st.selectbox("Sort by", list(options), key="sort_by")
        descending = st.toggle("Descending", value=options[sort_label][1], key=f"sort_desc_{sort_label}")
        peak_range = st.slider("Top peak timestep", 0, 1000, (0, 1000), key="peak_range")
        only_dreams = st.checkbox("Only channels with dreams", key="only_dreams")
        search = st.text_input("Search top-example prompts", key="search", placeholder="e.g. cat")
    if peak_range != (0, 1000):
        peaks = frame["top_peak_timestep"]
        frame = frame[peaks.notna() & (peaks >= peak_range[0]) & (peaks <= peak_range[1])]
    if only_dreams:
        frame = frame[frame["has_dreams"] | frame["has_dreams_no_noise"]]
    if search.strip():
        stamp = _mtime(layout.timestep_stats_dir(variant) / "dataset_examples.parquet")
        matches = set(cached_search(str(layout.data_root), layout.experiment, variant, search.strip(), stamp))
        frame = frame[frame["channel"].isin(matches)]
    column, _ = options[sort_label]
    frame = frame.sort_values([column, "channel"], ascending=[not descending, True], na_position="last")
    return [int(c) for c in frame["channel"]]


def main() -> None:
    args = parse_args()
    st.set_page_config(page_title="ddr inspector", layout="wide")
    layout = DataLayout(Path(args.data_root), args.experiment)
    st.title("ddr inspector")
    variants = list_variants(layout)
    if not variants:
        st.error(f"No timestep statistics or representation found under {escape_markdown(layout.outputs_dir)}. "
                 "Materialize timestep_stats (and representation_shards) first, or pass --data-root / "
                 "--experiment.")
        st.stop()

    open_link(variants)
    with st.sidebar:
        variant = st.selectbox("Variant", variants, key="variant")
        index_stamp = _mtime(representation_dir(layout, variant) / "index.parquet")
        index, index_problem = cached_index(str(layout.data_root), layout.experiment, variant, index_stamp)
        if index_problem is not None:
            st.warning(escape_markdown(index_problem))
        concepts_stamp = _mtime(feature_concepts_dir(layout, variant) / "summary.json")
        try:
            concepts = cached_feature_concepts(str(layout.data_root), layout.experiment, variant, concepts_stamp)
        except Exception as error:  # an unreadable table: the page goes on without the ground truth
            concepts = None
            st.warning(escape_markdown(f"the ground truth of {variant} ({feature_concepts_dir(layout, variant)}) "
                                       f"cannot be read ({type(error).__name__}: {str(error)[:200]}); shown "
                                       "without it: re-materialize feature_concepts"))
        if concepts is not None:
            index = index.merge(concepts[0][["channel", "purity"]], on="channel", how="left")
        channels = filtered_channels(index, layout, variant)
        n_active = int(index["is_active"].sum())
        if not channels:
            st.warning("No active channel matches." if n_active else "This variant has no active channels.")
            st.stop()
        if st.session_state.get("channel") not in channels:
            st.session_state["channel"] = channels[0]
        prev_col, next_col = st.columns(2)
        prev_col.button("◀ Previous", key="prev_channel", on_click=step_channel, args=(channels, -1), width="stretch")
        next_col.button("Next ▶", key="next_channel", on_click=step_channel, args=(channels, 1), width="stretch")
        channel = st.selectbox(f"Channel ({len(channels)} of {n_active} active)", channels, key="channel",
                               format_func=lambda c: f"channel {c:05d}")

    shard_stamp = _mtime(shard_path(layout, variant, channel))
    shard, shard_problem = shard_or_problem(layout, variant, channel, shard_stamp)
    if shard is None:  # the other channels stay reachable from the sidebar
        st.warning(escape_markdown(f"channel {channel} cannot be shown: {shard_problem}"))
        st.stop()
    if st.session_state.get("_shown") != (variant, channel):
        st.session_state["_shown"] = (variant, channel)
        start = shard["peaks"][0]["timestep"] if shard["peaks"] else (shard["timesteps_with_data"] or [0])[0]
        set_timestep(st.session_state.pop("_link_timestep", start))
    if "timestep" not in st.session_state:
        set_timestep(0)

    with st.sidebar:
        st.divider()
        st.subheader("Go to")
        for peak in shard["peaks"]:
            st.button(f"Peak #{peak['rank'] + 1}: t={escape_markdown(peak['timestep'])} (height {peak['height']:.2f})",
                      key=f"peak_{peak['rank']}", on_click=set_timestep, args=(peak["timestep"],))
        with_data = shard["timesteps_with_data"]
        if with_data:
            if st.session_state.get("data_timestep") not in with_data:
                st.session_state["data_timestep"] = nearest(with_data, st.session_state["timestep"])
            st.selectbox("Timesteps with data", with_data, key="data_timestep", on_change=on_data_timestep,
                         format_func=lambda t: f"t={t}" + (" (dreams)" if t in shard["visualised_timesteps"] else ""))
        st.number_input("Timestep", min_value=0, max_value=1000, step=1, key="timestep_input",
                        on_change=on_timestep_input)
        st.divider()
        with st.expander("View options"):
            profile_height = st.slider("Activity chart height (px)", 150, 1000, 320, 10, key="profile_height")
            max_height = st.slider("Max-activation chart height (px)", 100, 800, 220, 10, key="max_height")
        dagster_url = dagster_asset_url()
        if dagster_url is None:
            st.warning("DDR_DAGSTER_URL is not a plain http(s)://host[:port][/path] URL; no link to the Dagster UI "
                       "is shown. Fix the variable (e.g. `http://127.0.0.1:3000`).")
        else:
            st.markdown(f"[Open `representation_shards` in the Dagster UI]({dagster_url})")

    current = int(st.session_state["timestep"])
    link_params(variant, channel, current)
    summary = shard["summary"]
    st.caption(escape_markdown(
        f"{variant} · channel {channel} · t={current} · total frequency {summary.get('total_frequency') or 0:.3f} · "
        f"active timesteps {summary.get('n_active_timesteps')} · peaks {[p['timestep'] for p in shard['peaks']]}"
    ))
    for error in shard.get("errors", []):
        st.warning(escape_markdown(f"{error['what']} {error['file']!r}: {error['problem']}"))
    if concepts is not None:
        table, concept_summary = concepts
        rows = table[table["channel"] == channel].to_dict("records")
        st.markdown(ground_truth_text(rows[0] if rows else None, concept_summary))
    curves, curve_problem = cached_curves(str(layout.data_root), layout.experiment, shard)
    if curve_problem is not None:
        st.warning(escape_markdown(curve_problem))
    col_charts, col_tabs = st.columns([1, 1])
    with col_charts:
        st.altair_chart(activity_chart(shard, curves, current, profile_height), width="stretch")
        st.altair_chart(max_activation_chart(shard, curves, current, max_height), width="stretch")
        if st.toggle("Compare with another channel (any variant)", key="compare"):
            render_compare(layout, variants, variant, channel, current, profile_height)
    with col_tabs:
        (tab_dreams, tab_examples, tab_priors, tab_where, tab_dose, tab_cfg, tab_label,
         tab_across) = st.tabs(["Visualisation", "Dataset examples", "Priors", "Where it fires", "Dose-response",
                                "Text vs image (CFG halves)", "Label", "Across models"])
        with tab_dreams:
            render_visualisation(layout, shard, current)
        with tab_examples:
            render_examples(layout, shard, current)
        with tab_priors:
            render_priors(layout, shard)
        with tab_where:  # spatial heatmaps (ddr_core/heatmap_view.py)
            render_heatmaps(layout, variant, channel, show_image)
        with tab_dose:  # steering dose-response (ddr_core/dose_response_view.py)
            render_dose_response(layout, variant, channel, show_image)
        with tab_cfg:
            render_cfg_contrast(layout, variant, channel)
        with tab_label:  # automatic label and its detection score (ddr_core/labels_view.py)
            render_label(layout, variant, channel)
        with tab_across:  # feature matching across variants (ddr_core/matching_view.py)
            render_across_models(layout, variant, channel)


if __name__ == "__main__":
    main()
