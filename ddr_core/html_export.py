"""A static, self-contained HTML report of one variant's representation (opens from disk, no server).

::

    <out_dir>/
      index.html                   sortable / filterable table of the active channels with thumbnails
      channels/channel_<c:05d>.html  one page per channel: activity profile and max-activation charts
                                   (inline SVG), peaks, ground truth (when ``feature_concepts`` scored the
                                   variant), dataset examples, dreams (both runs, every seed, intermediate
                                   steps with their statistics) and priors
      files/<path below the data root>   copies of every image shown (relative links)

The pages need no JavaScript except the table sorting/filter of ``index.html`` (inline, vanilla).
Images are copied through :func:`ddr_core.representation.resolve_file`: a path in a shard that is
missing, escapes the data root, cannot be a file name (a NUL byte, too long) or names a file that is not a
readable image is not copied and is shown as a placeholder naming it.

One bad entry never aborts the export: a shard that cannot be read (truncated JSON, wrong field types,
another channel's), a shard that cannot be built for a channel of the index, an unreadable curve table, an
unreadable ``index.parquet`` (the index is then rebuilt from the statistics) or ground-truth table is
skipped or replaced, and each problem is listed, named and with its reason, at the top of ``index.html``
(and on the channel's page), in ``problems.json`` and in :attr:`HtmlExport.problems`. A failure to *write*
the report (a full disk) still stops it, naming the file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddr_core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ddr_core.channel_store import channel_file
from ddr_core.column_help import column_help
from ddr_core.dose_response_view import dose_effects_html, dose_response_html
from ddr_core.dream_verdict import unshown_dream_lines
from ddr_core.heatmap_view import heatmaps_html
from ddr_core.labels_view import labels_html
from ddr_core.matching_view import channel_matching_html, matching_html
from ddr_core.paths import DataLayout, resolve_inside, shown
from ddr_core.representation import (
    DREAM_RUNS,
    BadShardError,
    MissingStatsError,
    ShardFileError,
    check_image,
    curves_or_observed,
    display_path,
    load_index_or_rebuild,
    load_shard,
    representation_dir,
    resolve_file,
    shard_path,
)

PROBLEMS_FILE = "problems.json"


@dataclass
class ExportProblem:
    """One entry the export skipped or replaced: ``what`` (e.g. ``"channel 3"``, ``"dataset example image"``),
    ``name`` (the file or path, escaped for display) and the ``reason``."""

    what: str
    name: str
    reason: str

    def text(self) -> str:
        return f"{self.what} {self.name}: {self.reason}"


@dataclass
class HtmlExport:
    """What :func:`write_html_report` wrote: the index page, the channels with a full page, and the problems."""

    index: Path
    channels: list[int] = field(default_factory=list)
    problems: list[ExportProblem] = field(default_factory=list)

RUN_TITLES = {"noise": "with schedule noise", "no_noise": "without schedule noise"}
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;font-size:.9rem}th,td{border-bottom:1px solid #ddd;padding:.3rem .5rem;text-align:left}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}th.sorted-asc::after{content:" \\25B2"}
th.sorted-desc::after{content:" \\25BC"}img.thumb{width:64px;height:64px;object-fit:cover}
.grid{display:flex;flex-wrap:wrap;gap:.8rem}.card{width:180px;font-size:.8rem}.card img{width:180px}
.steps .card{width:110px}.steps .card img{width:110px}.missing{width:180px;height:60px;background:#fee;
color:#a00;font-size:.75rem;padding:.3rem;overflow-wrap:anywhere}svg{background:#fff;border:1px solid #eee}
nav a{margin-right:1rem}h3{margin-bottom:.3rem}.failed{color:#a00}
"""
_SORT_SCRIPT = """
document.querySelectorAll('th[data-col]').forEach(function(th){th.addEventListener('click',function(){
 var table=th.closest('table'),body=table.tBodies[0],col=+th.dataset.col,type=th.dataset.type;
 var asc=!th.classList.contains('sorted-asc');
 table.querySelectorAll('th').forEach(function(h){h.classList.remove('sorted-asc','sorted-desc');});
 th.classList.add(asc?'sorted-asc':'sorted-desc');
 var rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){var x=a.cells[col].dataset.value,y=b.cells[col].dataset.value;
  if(type==='num'){x=x===''?-Infinity:+x;y=y===''?-Infinity:+y;}
  return (x<y?-1:x>y?1:0)*(asc?1:-1);});
 rows.forEach(function(r){body.appendChild(r);});});});
document.getElementById('filter').addEventListener('input',function(e){var q=e.target.value.toLowerCase();
 Array.prototype.forEach.call(document.querySelectorAll('#channels tbody tr'),function(r){
  r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


class _Files:
    """Copies images from the data root into ``out_dir/files`` (path-checked, decoded once) and makes links.

    A path that cannot be used or a file that cannot be read or decoded is a problem (recorded once per path,
    with its reason), never an error; failing to *write* the copy (a full disk) raises, naming the copy.
    """

    def __init__(self, data_root: Path, out_dir: Path) -> None:
        self.data_root, self.files_dir = data_root, out_dir / "files"
        self.problems: list[ExportProblem] = []
        self._checked: dict[str, str | None] = {}  # relative path -> reason it is unusable, None when copied

    def _copy(self, relative: str, what: str) -> str | None:
        """Copy ``relative`` into the report; ``None``, or the reason it is unusable (without its name)."""
        try:
            source = resolve_file(self.data_root, relative, what)
            data = source.read_bytes()
        except ShardFileError as error:
            return str(error).removeprefix(f"{what} {shown(relative, 200)} ")
        except OSError as error:
            return f"cannot be read: {error.strerror or error}"
        reason = check_image(data)
        if reason is not None:
            return f"is {reason}"
        destination = resolve_inside(self.files_dir, relative)  # relative is known to stay inside
        if not destination.is_file() or destination.read_bytes() != data:
            atomic_write_bytes(destination, data)
        return None

    def link(self, relative: str | None, depth: int, what: str) -> str | None:
        """The link to the copy of ``relative`` from a page ``depth`` folders below ``out_dir``, or ``None``
        (no image recorded, or a problem, recorded once per path)."""
        if relative is None:
            return None
        key = relative if isinstance(relative, str) else repr(relative)
        if key not in self._checked:
            reason = self._copy(relative, what) if isinstance(relative, str) else "is not a path"
            self._checked[key] = reason
            if reason is not None:
                self.problems.append(ExportProblem(what, display_path(relative), reason))
        if self._checked[key] is not None:
            return None
        return "../" * depth + "files/" + Path(relative).as_posix()

    def img(self, relative: str | None, depth: int, what: str, css: str = "", alt: str = "") -> str:
        link = self.link(relative, depth, what)
        if link is None and relative is None:
            return f'<div class="missing">no {_e(what)}</div>'
        if link is None:
            return f'<div class="missing">{_e(what)} unavailable: {_e(display_path(relative))}</div>'
        return f'<img src="{_e(link)}" class="{css}" alt="{_e(alt or what)}" loading="lazy">'


def svg_chart(
    timesteps: Sequence[float], values: Sequence[float], total_timesteps: int, title: str, colour: str,
    markers: Iterable[tuple[float, float, str, str]] = (), rules: Iterable[float] = (), fill: bool = False,
    width: int = 640, height: int = 220, more: Sequence[tuple[Sequence[float], str, str]] = (),
) -> str:
    """A line chart as inline SVG, timestep axis reversed (``total_timesteps`` left, 0 right).

    ``markers``: ``(timestep, value, colour, label)`` drawn as labelled dots; ``rules``: timesteps
    drawn as vertical dashed lines; ``more``: further series ``(values, colour, dash)`` over the same
    timesteps (``dash`` an SVG ``stroke-dasharray``, ``""`` for a solid line).
    """
    left, right, top, bottom = 48, 12, 24, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    ys = np.asarray(values, dtype=np.float64)
    every = np.concatenate([ys, *(np.asarray(v, dtype=np.float64) for v, _, _ in more)])
    finite = every[np.isfinite(every)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    high = high if high > low else low + 1.0

    def px(t: float) -> float:
        return left + (total_timesteps - float(t)) / total_timesteps * plot_w

    def py(v: float) -> float:
        return top + (high - float(v)) / (high - low) * plot_h

    points = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in zip(timesteps, ys, strict=True) if np.isfinite(v))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}">', f'<text x="{left}" y="16" font-size="13">{_e(title)}</text>']
    for tick in range(0, total_timesteps + 1, max(1, total_timesteps // 5)):
        x = px(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - 10}" font-size="10" text-anchor="middle">{tick}</text>')
    for value in (low, (low + high) / 2, high):
        parts.append(f'<text x="{left - 4}" y="{py(value) + 3:.1f}" font-size="10" text-anchor="end">'
                     f'{value:.2g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    if fill and points:
        first_x = px(timesteps[0])
        last_x = px(timesteps[-1])
        parts.append(f'<polygon points="{first_x:.1f},{py(low):.1f} {points} {last_x:.1f},{py(low):.1f}" '
                     f'fill="{colour}" fill-opacity="0.18" stroke="none"/>')
    parts.append(f'<polyline class="curve" points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
    for series, series_colour, dash in more:
        line = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in zip(timesteps, series, strict=True) if np.isfinite(v))
        dashing = f' stroke-dasharray="{_e(dash)}"' if dash else ""
        parts.append(f'<polyline class="curve" points="{line}" fill="none" stroke="{_e(series_colour)}" '
                     f'stroke-width="1.5"{dashing}/>')
    for rule in rules:
        x = px(rule)
        parts.append(f'<line class="rule" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
                     f'stroke="#3b5bdb" stroke-dasharray="4 3"/>')
    for t, v, marker_colour, label in markers:
        parts.append(f'<circle class="marker" cx="{px(t):.1f}" cy="{py(v):.1f}" r="5" fill="{marker_colour}">'
                     f'<title>{_e(label)}</title></circle>')
        if label:
            anchor, dx = ("end", -6) if px(t) > left + plot_w * 0.85 else ("start", 6)
            parts.append(f'<text x="{px(t) + dx:.1f}" y="{py(v) - 6:.1f}" font-size="10" '
                         f'text-anchor="{anchor}">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def downloadable(svg: str, filename: str) -> str:
    """An inline SVG chart with a link that saves it as a ``.svg`` file (a data URL: the report stays one
    self-contained folder). ``filename`` is made here from numbers and fixed words, never from data."""
    href = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
    return (f'<figure class="chart">{svg}<figcaption><a download="{_e(filename)}" href="{href}">download SVG'
            f"</a></figcaption></figure>")


def _page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}"
            + (f"<script>{script}</script>" if script else "") + "</body></html>")


def _thumbnail(shard: dict[str, Any]) -> str | None:
    peak_ts = [p["observed_timestep"] for p in shard["peaks"]]
    for timestep in peak_ts:
        for example in shard["examples"]:
            if example["timestep"] == timestep and example["image"]:
                return example["image"]
    for run in DREAM_RUNS:
        section = shard["dreams"].get(run)
        if section and section["results"]:
            return section["results"][0]["image"]
    if shard["examples"]:
        return shard["examples"][0]["image"]
    return None


def ground_truth_html(row: dict[str, Any] | None, families: Sequence[str]) -> str:
    """A paragraph with a channel's ground-truth concepts (``feature_concepts`` row), or ``""`` without one."""
    if row is None:
        return ""
    if row.get("purity") is None:
        return f'<p class="truth">Ground truth: not scored ({_e(row.get("n_labelled") or 0)} labelled top examples).</p>'
    parts = [f"{_e(f)} <b>{_e(row[f'dominant_{f}'])}</b> (purity {_fmt(row[f'purity_{f}'], 2)}, chance "
             f"{_fmt(row[f'chance_purity_{f}'], 2)}, q {_fmt(row.get(f'q_{f}'), 3)})" for f in families]
    parts.insert(0, f"<b>{_e(concept_label(row, families))}</b>")
    for source, label in (("prior", "priors"), ("dream", "dreams")):
        count = row.get(f"n_{source}_images")
        if not count:
            continue
        agree = ", ".join(f"{_e(f)} {_fmt(row.get(f'{source}_agreement_{f}'), 2)}" for f in families)
        recognisable = row.get(f"{source}_recognisable")
        look = "" if recognisable is None else f", {_fmt(recognisable, 2)} recognisable"
        parts.append(f"{label} agree: {agree} ({_e(count)} images{look})")
    return (f'<p class="truth">Ground truth ({_e(row["n_labelled"])} labelled top examples): '
            + " &middot; ".join(parts) + "</p>")


def _ground_truth(layout: DataLayout, variant: str) -> tuple[dict[int, dict[str, Any]], list[str], float]:
    """The variant's ``feature_concepts`` rows by channel, its families and the false discovery rate of
    its concept verdicts (empty without scores)."""
    from ddr_core.feature_concepts import FeatureConceptsConfig, feature_concepts_dir, read_feature_concepts

    alpha = FeatureConceptsConfig().alpha
    found = read_feature_concepts(feature_concepts_dir(layout, variant))
    if found is None:
        return {}, [], alpha
    table, summary = found
    alpha = float((summary.get("config") or {}).get("alpha", alpha))
    rows = {int(row["channel"]): row for row in table.iter_rows(named=True)}
    return rows, list(summary.get("families", [])), alpha


def concept_label(row: dict[str, Any] | None, families: Sequence[str]) -> str:
    """The channel's verdict: ``"selective for colour=red, shape=circle"`` (the families whose BH q-value is
    below the run's alpha, the ``concept`` column), ``"not selective"``, or ``""`` when not scored."""
    if row is None or row.get("purity") is None:
        return ""
    concept = row.get("concept")
    return f"selective for {concept}" if concept else "not selective"


def _nav(neighbours: tuple[int | None, int | None]) -> list[str]:
    nav = ['<nav><a href="../index.html">all channels</a>']
    for label, other in zip(("previous", "next"), neighbours, strict=True):
        if other is not None:
            nav.append(f'<a href="channel_{other:05d}.html">{label}: channel {other}</a>')
    nav.append("</nav>")
    return nav


def _failed_channel_page(variant: str, channel: int, problem: ExportProblem,
                         neighbours: tuple[int | None, int | None]) -> str:
    body = [*_nav(neighbours), f"<h1>{_e(variant)} - channel {channel}</h1>",
            f'<p class="failed">This channel could not be exported: {_e(problem.text())}</p>']
    return _page(f"{variant} channel {channel}", "".join(body))


def _channel_page(layout: DataLayout, variant: str, shard: dict[str, Any], files: _Files,
                  neighbours: tuple[int | None, int | None], truth: str = "",
                  problems: list[ExportProblem] | None = None) -> str:
    channel, total = int(shard["channel"]), int(shard["total_timesteps"])
    curves, curve_problem = curves_or_observed(layout, shard)
    if curve_problem is not None and problems is not None:
        problems.append(ExportProblem(f"channel {channel} curve table", display_path(shard.get("curves")),
                                      curve_problem))
    activity = curves["activity"].to_numpy()
    nav = _nav(neighbours)
    peak_markers = [(p["timestep"], p["height"], "#e74c3c", f"peak {p['timestep']}") for p in shard["peaks"]]
    peak_timesteps = {p["timestep"] for p in shard["peaks"]}
    dream_markers = [(t, float(activity[t]) if 0 <= t < total else 0.0, "#2ecc71",
                      "" if t in peak_timesteps else f"dream {t}") for t in shard["visualised_timesteps"]]
    summary = shard["summary"]
    body = [*nav, f"<h1>{_e(variant)} - channel {channel}</h1>",
            f"<p>total frequency {_fmt(summary.get('total_frequency'))}, active timesteps "
            f"{_e(summary.get('n_active_timesteps'))}, max activation {_fmt(summary.get('max_activation'))}, "
            f"peaks: {_e(', '.join(str(p['timestep']) for p in shard['peaks']) or 'none')}</p>",
            '<div class="charts">',
            downloadable(svg_chart(curves["timestep"].to_list(), activity, total, "activity profile (frequency in top-k)",
                                   "#2b8a3e", markers=dream_markers + peak_markers,
                                   rules=[p["timestep"] for p in shard["peaks"]], fill=True),
                         f"channel_{channel:05d}_activity.svg"),
            downloadable(svg_chart(curves["timestep"].to_list(), curves["max_activation"].to_numpy(), total,
                                   "maximum activation over the dataset", "#e67e22",
                                   rules=[p["timestep"] for p in shard["peaks"]]),
                         f"channel_{channel:05d}_max_activation.svg"),
            "</div>", truth]
    if curve_problem is not None:
        body.append(f'<p class="failed">{_e(curve_problem)}</p>')
    for error in shard.get("errors", []):
        body.append(f'<p class="failed">{_e(error["what"])} {_e(display_path(error["file"]))}: '
                    f'{_e(error["problem"])}</p>')

    sections = [("dreams", "Deep dreams", _dreams_html(shard, files)),
                ("where", "Where it fires", heatmaps_html(layout, variant, channel, files.img)),  # heatmap_view.py
                ("priors", "Priors", _priors_html(shard, files)),
                ("dose", "Steering dose-response", dose_response_html(layout, variant, channel, files)),  # its view
                ("cfg", "Conditional vs unconditional", cfg_contrast_section(layout, variant, channel, total)),
                ("label", "Label", labels_html(layout, variant, channel)),  # labels_view.py
                ("across", "Across models", channel_matching_html(layout, variant, channel)),  # matching_view.py
                ("examples", "Dataset examples", _examples_html(shard, files))]
    body.append('<nav class="contents">On this page: '
                + " · ".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title, _ in sections) + "</nav>")
    for anchor, title, html_text in sections:
        body.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>{html_text}</section>')
    return _page(f"{variant} channel {channel}", "".join(body))


def _examples_html(shard: dict[str, Any], files: _Files) -> str:
    """The dataset examples per timestep (prompts as text); last on the page: there may be hundreds."""
    body = []
    for timestep in sorted({e["timestep"] for e in shard["examples"]}, reverse=True):
        cards = [f'<div class="card">{files.img(e["image"], 1, "dataset example image", alt=e["prompt"] or "")}'
                 f'<div>#{e["rank"] + 1} activation {_fmt(e["activation"])}</div><div>{_e(e["prompt"])}</div></div>'
                 for e in shard["examples"] if e["timestep"] == timestep]
        body.append(f'<h3>t={timestep}</h3><div class="grid">{"".join(cards)}</div>')
    return "".join(body) or "<p>No dataset examples.</p>"


def _dreams_html(shard: dict[str, Any], files: _Files) -> str:
    """The raised dreams of each run with their optimisation snapshots; the others listed as text."""
    body = []
    any_dream = False
    for run in DREAM_RUNS:
        section = shard["dreams"].get(run)
        if not section:
            continue
        unshown = unshown_dream_lines(section)
        if unshown:  # not pictures of the channel: their numbers as plain text, no image
            body.append(f"<h3>{_e(RUN_TITLES.get(run, run))}: not shown as dreams</h3>"
                        f"<ul class=\"unshown\">{''.join(f'<li>{_e(line)}</li>' for line in unshown)}</ul>")
        if not section["results"]:
            continue
        any_dream = True
        body.append(f"<h3>{_e(RUN_TITLES.get(run, run))}</h3>")
        for timestep in sorted({r["timestep"] for r in section["results"]}, reverse=True):
            body.append(f"<h4>t={timestep}</h4>")
            for result in (r for r in section["results"] if r["timestep"] == timestep):
                status = (f'<span class="failed">failed: {_e(result["failure_reason"])}</span>'
                          if result["failed"] else "")
                steps = "".join(
                    f'<div class="card">{files.img(s["image"], 1, "dream snapshot image")}<div>step {s["step"]}: '
                    f'act {_fmt(s.get("activation"))}, loss {_fmt(s.get("loss"))}</div></div>'
                    for s in result["steps"]
                )
                body.append(
                    f'<div class="grid"><div class="card">{files.img(result["image"], 1, "dream image")}'
                    f'<div>seed {result["seed"]}: activation {_fmt(result["final_activation"])} {status}</div></div>'
                    f'<div class="grid steps">{steps}</div></div>'
                )
    if not any_dream:
        body.append("<p>No deep dreams.</p>")
    return "".join(body)


def _priors_html(shard: dict[str, Any], files: _Files) -> str:
    priors = shard.get("priors")
    if priors and priors["status"] == "done":
        cards = "".join(f'<div class="card">{files.img(p["image"], 1, "prior image")}<div>seed {_e(p["seed"])}'
                        f'{"; " + _e(p["verdict"]) if p.get("verdict") else ""}</div></div>' for p in priors["images"])
        return f'<p>steered at timesteps {_e(priors["steered_timesteps"])}</p><div class="grid">{cards}</div>'
    if priors:
        return f"<p>Priors skipped: {_e(priors.get('reason'))}</p>"
    return "<p>No priors.</p>"


def cfg_contrast_section(layout: DataLayout, variant: str, channel: int, total_timesteps: int) -> str:
    """The feature card's conditional-vs-unconditional section (``cfg_contrast``): both halves' mean activity
    per timestep, their difference with its interval over prompts, and the channel's sentence (as text)."""
    from ddr_core.cfg_contrast import channel_contrast, contrast_sentence

    try:
        summary, profile, row = channel_contrast(layout.stage_dir("cfg_contrast", variant), channel)
    except Exception as error:  # an unreadable table: the card goes on without it
        return (f'<p class="failed">cfg_contrast cannot be read '
                f"({_e(type(error).__name__)}: {_e(str(error)[:200])}); re-materialize cfg_contrast</p>")
    parts = [f"<p>{_e(contrast_sentence(summary, row))}</p>"]
    if profile is not None and profile.height:
        timesteps = profile["timestep"].to_list()
        parts += ['<div class="charts">',
                  svg_chart(timesteps, profile["mean_conditional"].to_numpy(), total_timesteps,
                            "mean activation: conditional half (solid), unconditional half (dashed)", "#1864ab",
                            more=[(profile["mean_unconditional"].to_numpy(), "#868e96", "5 3")]),
                  svg_chart(timesteps, profile["difference"].to_numpy(), total_timesteps,
                            f"conditional - unconditional, {summary['confidence']:.0%} interval over prompts (dotted)",
                            "#c2255c", more=[(profile["ci_low"].to_numpy(), "#c2255c", "2 3"),
                                             (profile["ci_high"].to_numpy(), "#c2255c", "2 3")]),
                  "</div>"]
    return "".join(parts)


def export_html(
    layout: DataLayout, variant: str, out_dir: str | Path, channels: Iterable[int] | None = None
) -> Path:
    """Write the static report of ``variant`` into ``out_dir``; returns ``out_dir/index.html``.

    :func:`write_html_report`, returning only the index page (its problems are listed on it and in
    ``problems.json``).
    """
    return write_html_report(layout, variant, out_dir, channels).index


def _ground_truth_or_problem(layout: DataLayout, variant: str, problems: list[ExportProblem]
                             ) -> tuple[dict[int, dict[str, Any]], list[str], float]:
    from ddr_core.feature_concepts import FeatureConceptsConfig, feature_concepts_dir

    try:
        return _ground_truth(layout, variant)
    except Exception as error:  # an unreadable table: the report goes on without the ground truth
        problems.append(ExportProblem("ground truth", display_path(str(feature_concepts_dir(layout, variant))),
                                      f"cannot be read ({type(error).__name__}: {str(error)[:200]}); shown "
                                      "without it: re-materialize feature_concepts"))
        return {}, [], FeatureConceptsConfig().alpha


def _load_channel(layout: DataLayout, variant: str, channel: int, row: dict[str, Any],
                  problems: list[ExportProblem]) -> tuple[dict[str, Any] | None, ExportProblem | None]:
    """The channel's shard, or ``None`` and the problem that made it unusable."""
    path = shard_path(layout, variant, channel)
    if row.get("has_shard") and not path.is_file():
        problems.append(ExportProblem(f"channel {channel}", str(path), "the index lists this shard but it is "
                                      "missing: built from the upstream stages instead; rebuild the shards"))
    try:
        return load_shard(layout, variant, channel), None
    except (BadShardError, MissingStatsError, ShardFileError) as error:
        reason = str(error)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:  # the in-memory build failed
        reason = f"the shard cannot be built from the upstream stages ({type(error).__name__}: {str(error)[:300]})"
    return None, ExportProblem(f"channel {channel}", str(path), f"skipped: {reason}")


def _number(value: Any) -> float | None:
    return None if value is None or not isinstance(value, (int, float)) else value


def write_html_report(
    layout: DataLayout, variant: str, out_dir: str | Path, channels: Iterable[int] | None = None
) -> HtmlExport:
    """Write the static report of ``variant`` into ``out_dir``.

    Args:
        layout: data root + experiment.
        variant: a variant with finished timestep statistics (shards are read from the representation
            stage, or built in memory where it has not run).
        out_dir: the report folder (created; existing files of a previous export are overwritten).
        channels: channels to include; default: the active channels.

    Returns:
        An :class:`HtmlExport`: the index page, the channels exported in full, and every problem (a bad shard,
        image, curve table, index or ground-truth table: skipped or replaced, named with its reason).

    Raises:
        MissingStatsError: the variant has no finished statistics (nothing to export).
        OSError: writing the report failed (e.g. a full disk), naming the file.
    """
    out = Path(out_dir).resolve()
    (out / "channels").mkdir(parents=True, exist_ok=True)
    problems: list[ExportProblem] = []
    index, index_problem = load_index_or_rebuild(layout, variant)
    if index_problem is not None:
        problems.append(ExportProblem("index", str(representation_dir(layout, variant) / "index.parquet"),
                                      index_problem))
    rows = index.filter(index["is_active"]) if channels is None else index.filter(
        index["channel"].is_in([int(c) for c in channels]))
    selected = [int(c) for c in rows["channel"]]
    files = _Files(layout.data_root, out)
    truths, families, alpha = _ground_truth_or_problem(layout, variant, problems)
    table_rows = []
    exported: list[int] = []
    for position, channel in enumerate(selected):
        row = rows.row(position, named=True)
        neighbours = (selected[position - 1] if position > 0 else None,
                      selected[position + 1] if position + 1 < len(selected) else None)
        page = channel_file(out / "channels", channel, ".html")
        shard, failure = _load_channel(layout, variant, channel, row, problems)
        if shard is None:
            problems.append(failure)
            atomic_write_text(page, _failed_channel_page(variant, channel, failure, neighbours))
            thumbnail = '<div class="missing">shard unreadable</div>'
        else:
            atomic_write_text(page, _channel_page(layout, variant, shard, files, neighbours,
                                                  ground_truth_html(truths.get(channel), families) if families
                                                  else "", problems))
            thumbnail = files.img(_thumbnail(shard), 0, "thumbnail", css="thumb")
            exported.append(channel)
        peaks = row["peak_timesteps"] or []
        cells = [
            ("", thumbnail),
            (channel, f'<a href="channels/channel_{channel:05d}.html">{channel}</a>'
                      + ("" if shard is not None else ' <span class="failed">(skipped)</span>')),
            (row["total_frequency"], _fmt(row["total_frequency"])),
            (row["n_active_timesteps"], _e(row["n_active_timesteps"])),
            (row["top_peak_timestep"], _e(", ".join(str(p) for p in peaks))),
            (row["max_activation"], _fmt(row["max_activation"])),
            (row["n_examples"], _e(row["n_examples"])),
            (int(bool(row["has_priors"])), "yes" if row["has_priors"] else ""),
            (row["n_dreams"], _e(row["n_dreams"] or "")),
            (row["dream_ratio_mean"], _fmt(row["dream_ratio_mean"]) if row["dream_ratio_mean"] is not None else ""),
            (row["top_prompts_text"], _e(row["top_prompts_text"])),
        ]
        if families:
            truth = truths.get(channel)
            purity = _number(None if truth is None else truth.get("purity"))
            label = concept_label(truth, families)
            cells[2:2] = [(label, _e(label)),
                          (purity, _fmt(purity, 2) if purity is not None else "")]
        table_rows.append("<tr>" + "".join(
            f'<td data-value="{_e("" if v is None else v)}">{content}</td>' for v, content in cells) + "</tr>")
    headers = [("", "text"), ("channel", "num"), ("total frequency", "num"), ("active timesteps", "num"),
               ("peaks", "num"), ("max activation", "num"), ("examples", "num"), ("priors", "num"),
               ("dreams", "num"), ("dream / top example", "num"), ("top prompts", "text")]
    if families:  # ground truth after the channel: its concept and purity
        headers[2:2] = [(f"concept (ground truth, BH q < {alpha:g})", "text"), ("purity", "num")]
    head = "".join(f'<th data-col="{i}" data-type="{kind}" title="{_e(column_help(name))}">{_e(name)}</th>'
                   for i, (name, kind) in enumerate(headers))
    columns = "".join(f"<dt>{_e(name)}</dt><dd>{_e(column_help(name))}</dd>" for name, _ in headers if name)
    problems += files.problems
    unique = list({p.text(): p for p in problems}.values())
    problem_items = "".join(f"<li>{_e(p.text())}</li>" for p in unique)
    skipped = len(selected) - len(exported)
    body = (f"<h1>{_e(variant)} ({_e(layout.experiment)})</h1>"
            f"<p>{len(selected)} of {index.height} channels shown ({int(index['is_active'].sum())} active)"
            + (f", {skipped} of them skipped (unreadable)" if skipped else "") + ". Click a column header to sort.</p>"
            '<p><input id="filter" type="search" placeholder="filter rows (e.g. a prompt word)" size="40"></p>'
            + (f'<details id="problems" open><summary class="failed">{len(unique)} problem(s): skipped or '
               f"unavailable entries</summary><ul>{problem_items}</ul></details>" if unique else "")
            + f'<table id="channels"><thead><tr>{head}</tr></thead><tbody>{"".join(table_rows)}</tbody></table>'
            + f'<details id="columns"><summary>What the columns mean</summary><dl>{columns}</dl></details>'
            + dose_effects_html(layout, variant) + matching_html(layout, variant))
    atomic_write_json(out / PROBLEMS_FILE, [{"what": p.what, "name": p.name, "reason": p.reason} for p in unique])
    index_page = atomic_write_text(out / "index.html", _page(f"ddr - {variant}", body, _SORT_SCRIPT))
    return HtmlExport(index=index_page, channels=exported, problems=unique)

