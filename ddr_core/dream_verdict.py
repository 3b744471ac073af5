"""Whether a dream raised its channel: the one definition of a **raised** dream (:func:`with_raised`), used by
the dream quality table (:mod:`ddr_core.dreams.quality`, which re-exports it), the representation shards and
index, the inspector, the HTML export and the visualisation benchmark. Pure polars/numpy (no torch), so the
inspector can apply it.

**Raised.** A dream is raised when its gain (re-measured final activation minus the re-measured activation of
the latent it started from) exceeds the noise of the start activation: ``gain > noise_sd_multiple * noise_sd``
and ``gain > 0``, not failed. ``noise_sd`` of a (channel, timestep) is the standard deviation of its *single*
start measurements: every seed's start latent under every schedule-noise draw the quality check made
(``n_seeds x quality_noise_draws`` values, pooled exactly from each element's draw mean and draw spread). It
holds both sources of "another start would have given another value": seed-to-seed differences of the starts
and the schedule noise a single look sees. Why pooled rather than one source: the demo dreams 2 seeds per
(channel, timestep) (an sd from 2 values is a coin toss) and measures 4 noise draws per element; pooled there are
8 samples, and without schedule noise (``dreams_no_noise``, one clean look) it is the spread over seeds. A
(channel, timestep) with a single sample takes the median ``noise_sd`` of the table (the variant's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

VERDICT_SCHEMA = {
    "gain": pl.Float64,
    "noise_sd": pl.Float64,
    "noise_samples": pl.Int32,
    "raised": pl.Boolean,
}
"""The verdict columns :func:`with_raised` adds (in the union ``quality.parquet``)."""
NOISE_SD_MULTIPLE = 1.0
"""A dream is raised when its gain exceeds this many ``noise_sd`` (the visual benchmark's default too)."""


def with_raised(quality: pl.DataFrame, multiple: float = NOISE_SD_MULTIPLE) -> pl.DataFrame:
    """``quality`` (columns of :data:`QUALITY_SCHEMA`; ``prior_draw_sd`` / ``noise_draws`` may be missing: one clean
    look per start) with the verdict columns of :data:`VERDICT_SCHEMA` (replaced if present).

    Per (channel, timestep) with elements ``i`` (start mean ``m_i`` over ``k_i`` draws, draw sd ``s_i``), the
    ``N = sum k_i`` single start measurements have the pooled variance
    ``(sum (k_i - 1) s_i^2 + k_i (m_i - M)^2) / (N - 1)`` around their mean ``M``; ``noise_sd`` is its root and
    ``noise_samples`` is ``N`` (rows with a non-finite start left out). ``N <= 1``: the median ``noise_sd`` of the
    table (no such median: 0, so only ``gain > 0`` is asked). A table with a ``variant`` column is judged per
    variant. ``gain = dream_activation - prior_activation``;
    ``raised = not failed and gain > 0 and gain > multiple * noise_sd`` (false wherever anything is missing).
    """
    frame = quality.drop([c for c in VERDICT_SCHEMA if c in quality.columns])
    if "variant" in frame.columns and frame["variant"].n_unique() > 1:  # several variants: each on its own
        frame = frame.with_row_index("_row")
        parts = [with_raised(part.drop("_row"), multiple).with_columns(part["_row"])
                 for _, part in frame.group_by("variant", maintain_order=True)]
        return pl.concat(parts, how="vertical").sort("_row").drop("_row")
    if "prior_draw_sd" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.Float64).alias("prior_draw_sd"))
    if "noise_draws" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.Int32).alias("noise_draws"))
    start = pl.col("prior_activation")
    k = pl.col("noise_draws").fill_null(1).clip(lower_bound=1).cast(pl.Float64)
    s = pl.col("prior_draw_sd").fill_null(0.0).fill_nan(0.0)
    finite = frame.filter(start.is_not_null() & start.is_finite())
    groups = (finite.with_columns(k.alias("_k"), s.alias("_s"))
              .group_by("channel", "timestep")
              .agg(pl.col("_k").sum().alias("_n"), (pl.col("_k") * start).sum().alias("_sum"),
                   ((pl.col("_k") - 1) * pl.col("_s") ** 2).sum().alias("_within"),
                   pl.struct("_k", "prior_activation").alias("_parts")))
    rows = []
    for row in groups.iter_rows(named=True):
        n, mean = row["_n"], row["_sum"] / row["_n"]
        between = sum(p["_k"] * (p["prior_activation"] - mean) ** 2 for p in row["_parts"])
        sd = float(np.sqrt((row["_within"] + between) / (n - 1))) if n > 1 else None
        rows.append({"channel": row["channel"], "timestep": row["timestep"], "noise_sd": sd,
                     "noise_samples": int(round(n))})
    noise = pl.DataFrame(rows, schema={"channel": frame.schema["channel"], "timestep": frame.schema["timestep"],
                                       "noise_sd": pl.Float64, "noise_samples": pl.Int32})
    known = noise["noise_sd"].drop_nulls()
    fallback = float(known.median()) if known.len() else 0.0
    noise = noise.with_columns(pl.col("noise_sd").fill_null(fallback))
    out = frame.join(noise, on=["channel", "timestep"], how="left", maintain_order="left").with_columns(
        (pl.col("dream_activation") - start).alias("gain"))
    gain = pl.col("gain")
    raised = (gain.is_not_null() & gain.is_finite() & ~pl.col("failed").fill_null(True) & (gain > 0)
              & pl.col("noise_sd").is_not_null() & (gain > multiple * pl.col("noise_sd")))
    out = out.with_columns(raised.fill_null(False).alias("raised"), pl.col("noise_samples").fill_null(0).cast(pl.Int32))
    return out.select(*[c for c in frame.columns], *VERDICT_SCHEMA)


def verdict_text(row: dict[str, Any]) -> str:
    """One line for a dream's verdict (a quality row with :data:`VERDICT_SCHEMA`), as plain text:
    ``"raised (gain 0.52 vs noise 0.10)"``, ``"not raised (gain 0.001 vs noise 0.03)"``, ``"failed"``,
    ``"not measured"``."""
    if row.get("failed"):
        return "failed"
    gain, noise = row.get("gain"), row.get("noise_sd")
    if gain is None or not np.isfinite(gain):
        return "not measured"
    numbers = f"gain {gain:.3g} vs noise {noise:.3g}" if noise is not None else f"gain {gain:.3g}, noise unknown"
    return f"{'raised' if row.get('raised') else 'not raised'} ({numbers})"


def unshown_dream_lines(section: dict[str, Any]) -> list[str]:
    """Plain-text lines for a shard's dream run (``shard["dreams"][run]``): the timesteps skipped for lack of
    signal and the dreams not shown as dreams (not raised above their start's noise, failed, or not measured:
    the section's ``not_raised``), each with its numbers. Shown as text, never as Markdown/HTML."""
    lines = [f"t={item.get('timestep')}: skipped: {item.get('reason')}"
             for item in section.get("skipped_timesteps") or []]
    lines += [f"t={item.get('timestep')}, seed {item.get('seed')}: {item.get('verdict')}"
              for item in section.get("not_raised") or []]
    return lines
