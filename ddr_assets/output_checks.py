"""Asset checks on what ``heatmaps``, ``dose_response`` and ``cfg_contrast`` wrote (issue 18).

Each function reads the stage's own output tables and returns one :class:`dagster.AssetCheckResult` whose
description names what is wrong (the channels, the rows) and passes only on output that is whole and coherent:

- ``heatmaps_complete``: every selected channel has its overlay images on disk, or a stated reason (no dataset
  examples); every scored example's ``heat_on_shape``, ``chance`` and ``ideal_detector`` are finite and within
  ``[0, 1]``, every unscored one says why (``mask_source``).
- ``dose_response_grid``: every done channel has the whole strength x window x seed grid, each generation its
  re-measured activation (finite) and its image; every effect's interval is ordered ``low <= value <= high``.
- ``cfg_contrast_verdicts``: q-values within ``[0, 1]``, intervals ordered, and each verdict the one its q-value
  and the sign of its difference give (``text-driven``: q < alpha and difference > 0; ``text-suppressed``:
  q < alpha and difference < 0; else ``no evidence``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import polars as pl

HEATMAPS_CHECK = "heatmaps_complete"
DOSE_RESPONSE_CHECK = "dose_response_grid"
CFG_CONTRAST_CHECK = "cfg_contrast_verdicts"
UNSCORED_REASONS = frozenset({"not scored", "unrecognisable"})
SCORE_COLUMNS = ("heat_on_shape", "chance", "ideal_detector")
TOLERANCE = 1e-9


def _listed(values: Sequence, limit: int = 10) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values[:limit]) + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _result(name: str, problems: list[str], passed_text: str, metadata: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, passed=not problems,
                               description="; ".join(problems) if problems else passed_text, metadata=metadata)


def combine_checks(name: str, checks: list[dg.AssetCheckResult]) -> dg.AssetCheckResult:
    """One result per run (Dagster takes one per check) from one per variant: the failed ones' problems, or every
    variant's summary."""
    if len(checks) == 1:
        return checks[0]
    failed = [c for c in checks if not c.passed]
    return dg.AssetCheckResult(check_name=name, passed=not failed,
                               description="; ".join(c.description or "" for c in failed or checks))


def _unit_interval(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and -TOLERANCE <= value <= 1 + TOLERANCE


def heatmaps_check(table: pl.DataFrame, channels: Sequence[int], without_examples: Sequence[int],
                   data_root: str | Path) -> dg.AssetCheckResult:
    """``heatmaps_complete`` (module docstring). ``table``: the heatmaps rows of the run's variants (other channels
    are ignored); ``channels``: the channels selected; ``without_examples``: those the stage said have no dataset
    example (the stated reason); ``data_root``: what the image paths are relative to."""
    root = Path(data_root)
    selected = sorted({int(c) for c in channels})
    reasoned = {int(c) for c in without_examples}
    rows = table.filter(pl.col("channel").is_in(selected)) if table.height else table
    have = set(rows["channel"].to_list()) if rows.height else set()
    problems = []
    missing = [c for c in selected if c not in have and c not in reasoned]
    if missing:
        problems.append(f"channel(s) {_listed(missing)} have no heatmap and no stated reason")
    unreadable = [f"{r['channel']}/g{r['generation_id']}" for r in rows.iter_rows(named=True)
                  if not (root / r["peak_image"]).is_file() or not (root / r["steps_image"]).is_file()]
    if unreadable:
        problems.append(f"overlay image(s) missing for channel/example {_listed(unreadable)}")
    scored = rows.filter(pl.col("mask_source") == "fitted world scene") if rows.height else rows
    bad = [f"{r['channel']}/g{r['generation_id']} {k}={r[k]}" for r in scored.iter_rows(named=True)
           for k in SCORE_COLUMNS if not _unit_interval(r.get(k))]
    if bad:
        problems.append(f"score(s) not finite or outside [0, 1]: {_listed(bad)}")
    unexplained = sorted({str(s) for s in rows["mask_source"].to_list()} - UNSCORED_REASONS - {"fitted world scene"}
                         ) if rows.height else []
    if unexplained:
        problems.append(f"unscored example(s) without a known reason: mask_source {_listed(unexplained)}")
    return _result(HEATMAPS_CHECK, problems,
                   f"{len(have)} channel(s) with overlays ({rows.height} example(s), {scored.height} scored), "
                   f"{len(reasoned & set(selected))} without dataset examples",
                   {"channels": len(selected), "with_heatmaps": len(have), "examples": rows.height,
                    "scored_examples": scored.height, "missing_channels": dg.MetadataValue.json(missing)})


def dose_response_check(grid: pl.DataFrame, channels: Sequence[int], skipped: dict[int, str],
                        seeds: Sequence[int], multiples: Sequence[float], effects: pl.DataFrame | None,
                        data_root: str | Path) -> dg.AssetCheckResult:
    """``dose_response_grid`` (module docstring). ``grid``: the finished channels' rows; ``channels``: those
    selected; ``skipped``: channel -> the stage's reason (no activity peak); ``seeds`` / ``multiples``: the grid
    asked for; ``effects``: the variant's pooled effects (``None``: not summarised)."""
    from ddr_core.dose_response import grid_cells

    root = Path(data_root)
    expected = {(w, float(m), int(s)) for w, m in grid_cells(sorted(multiples)) for s in seeds}
    problems = []
    incomplete = []
    for channel in sorted({int(c) for c in channels} - {int(c) for c in skipped}):
        rows = grid.filter(pl.col("channel") == channel) if grid.height else grid
        found = {(w, float(m), int(s)) for w, m, s in rows.select("window", "multiple", "seed").iter_rows()}
        if found != expected or rows.height != len(expected):
            incomplete.append(f"{channel} ({rows.height} of {len(expected)} cells)")
    if incomplete:
        problems.append(f"grid incomplete for channel(s) {_listed(incomplete)}")
    mine = grid.filter(pl.col("channel").is_in([int(c) for c in channels])) if grid.height else grid
    unmeasured = sorted({int(r["channel"]) for r in mine.iter_rows(named=True)
                         if r["activation"] is None or not math.isfinite(r["activation"])})
    if unmeasured:
        problems.append(f"re-measured activation missing or not finite in channel(s) {_listed(unmeasured)}")
    no_image = [f"{r['channel']}/{r['window']}x{r['multiple']:g}/seed{r['seed']}" for r in mine.iter_rows(named=True)
                if not r["image"] or not (root / r["image"]).is_file()]
    if no_image:
        problems.append(f"generation image(s) missing: {_listed(no_image)}")
    disordered = []
    for r in (effects.iter_rows(named=True) if effects is not None and effects.height else []):
        value, low, high = r["value"], r["low"], r["high"]
        if any(v is None or math.isnan(v) for v in (low, high)):  # fewer than two channels: no interval
            continue
        slack = TOLERANCE * (1 + abs(value or 0.0))
        if value is None or not (low - slack <= value <= high + slack):
            disordered.append(f"{r['metric']} {r['contrast']} x{r['multiple']:g}: [{low}, {high}] around {value}")
    if disordered:
        problems.append(f"effect interval(s) not ordered low <= value <= high: {_listed(disordered)}")
    return _result(DOSE_RESPONSE_CHECK, problems,
                   f"{mine['channel'].n_unique() if mine.height else 0} channel(s) with the whole grid "
                   f"({len(expected)} generations each), {len(skipped)} skipped with a reason, every effect's "
                   f"interval ordered",
                   {"channels": len(list(channels)), "generations": mine.height,
                    "skipped": dg.MetadataValue.json({str(k): v for k, v in skipped.items()})})


def cfg_contrast_check(channels: pl.DataFrame | None, alpha: float, halves: int) -> dg.AssetCheckResult:
    """``cfg_contrast_verdicts`` (module docstring) on ``channels.parquet``; a one-half capture has no table and
    passes saying so."""
    if halves == 1:
        return _result(CFG_CONTRAST_CHECK, [], "one CFG half recorded: no comparison to check", {"channels": 0})
    if channels is None or channels.height == 0:
        return _result(CFG_CONTRAST_CHECK, ["channels.parquet is missing or empty for a two-half capture"], "",
                       {"channels": 0})
    problems = []
    q = channels["q_value"]
    out_of_range = channels.filter(q.is_not_nan() & ((q < 0) | (q > 1)))["channel"].to_list()
    if out_of_range:
        problems.append(f"q-value(s) outside [0, 1] for channel(s) {_listed(out_of_range)}")
    disordered = channels.filter(pl.col("ci_low").is_not_nan() & pl.col("ci_high").is_not_nan()
                                 & ((pl.col("ci_low") > pl.col("difference") + TOLERANCE)
                                    | (pl.col("difference") > pl.col("ci_high") + TOLERANCE)))["channel"].to_list()
    if disordered:
        problems.append(f"interval not ordered ci_low <= difference <= ci_high for channel(s) {_listed(disordered)}")
    significant = q.is_not_nan() & (q < alpha)
    implied = (pl.when(significant & (pl.col("difference") > 0)).then(pl.lit("text-driven"))
               .when(significant & (pl.col("difference") < 0)).then(pl.lit("text-suppressed"))
               .otherwise(pl.lit("no evidence")))
    wrong = channels.with_columns(implied.alias("_implied")).filter(pl.col("verdict") != pl.col("_implied"))
    if wrong.height:
        problems.append("verdict not the one its q-value and sign give for channel(s) "
                        + _listed([f"{r['channel']} ({r['verdict']}, q={r['q_value']:.3g}, "
                                   f"difference={r['difference']:.3g})" for r in wrong.iter_rows(named=True)]))
    return _result(CFG_CONTRAST_CHECK, problems,
                   f"{channels.height} channel(s): q-values in [0, 1], intervals ordered, verdicts consistent "
                   f"with q < {alpha} and the sign",
                   {"channels": channels.height, "inconsistent_verdicts": wrong.height})
