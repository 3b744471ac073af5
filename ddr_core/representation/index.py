"""The per-variant index (one row per channel, :data:`INDEX_COLUMNS`): built from the statistics and the
stages' records, written under a lock, checked on read; and the prompt search over dataset examples.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ddr_core.atomic import atomic_path, atomic_write_json, remove_temporaries_of
from ddr_core.channel_store import channel_file, read_dream, read_prior
from ddr_core.dream_verdict import VERDICT_SCHEMA, with_raised
from ddr_core.locks import partition_lock, stage_locks_dir
from ddr_core.paths import DataLayout
from ddr_core.representation.files import (
    DREAM_RUNS,
    INDEX_FORMAT,
    PRIORS_STAGE,
    BadShardError,
    MissingStatsError,
    representation_dir,
)
from ddr_core.representation.upstream import _read_quality, _read_stats_summary

TOP_PROMPTS_PER_CHANNEL = 5
INDEX_SCHEMA = pa.schema(
    [
        ("channel", pa.int32()),
        ("is_active", pa.bool_()),
        ("n_active_timesteps", pa.int32()),
        ("total_frequency", pa.float64()),
        ("max_frequency", pa.float64()),
        ("max_activation", pa.float64()),
        ("n_peaks", pa.int32()),
        ("peak_timesteps", pa.list_(pa.int32())),
        ("top_peak_timestep", pa.int32()),
        ("n_examples", pa.int32()),
        ("top_prompts", pa.list_(pa.string())),
        ("top_prompts_text", pa.string()),
        ("has_priors", pa.bool_()),
        ("has_dreams", pa.bool_()),
        ("has_dreams_no_noise", pa.bool_()),
        ("n_dreams", pa.int32()),
        ("n_not_raised_dreams", pa.int32()),
        ("n_failed_dreams", pa.int32()),
        ("dream_ratio_mean", pa.float64()),
        ("dream_ratio_max", pa.float64()),
        ("dream_activation_mean", pa.float64()),
        ("has_shard", pa.bool_()),
    ]
)
INDEX_COLUMNS: tuple[str, ...] = tuple(INDEX_SCHEMA.names)


def make_index_table(layout: DataLayout, variant: str) -> pl.DataFrame:
    """One row per channel of ``variant`` (columns :data:`INDEX_COLUMNS`), from the statistics, the
    priors / dreams folders and the quality tables; built in memory."""
    summary = _read_stats_summary(layout, variant)
    stats_dir = layout.timestep_stats_dir(variant)
    con = duckdb.connect()
    try:
        def table(name: str) -> str:
            path = stats_dir / f"{name}.parquet"
            if not path.is_file():
                raise MissingStatsError(f"{path} is missing: rerun timestep_stats for this variant")
            return "read_parquet('" + str(path).replace("'", "''") + "')"

        base = con.sql(f"""
            WITH peaks AS (
                SELECT channel, list(timestep ORDER BY peak_rank)::INTEGER[] AS peak_timesteps,
                       arg_min(timestep, peak_rank)::INTEGER AS top_peak_timestep
                FROM {table('activity_peaks')} GROUP BY channel
            ), examples AS (
                SELECT channel, count(*)::INTEGER AS n_examples FROM {table('dataset_examples')} GROUP BY channel
            ), prompts AS (
                SELECT channel, list(prompt ORDER BY best DESC, prompt)[1:{TOP_PROMPTS_PER_CHANNEL}] AS top_prompts
                FROM (SELECT channel, prompt, max(activation) AS best FROM {table('dataset_examples')}
                      WHERE prompt IS NOT NULL GROUP BY channel, prompt)
                GROUP BY channel
            )
            SELECT c.channel::INTEGER AS channel, c.is_active, c.n_active_timesteps::INTEGER AS n_active_timesteps,
                   c.total_frequency::DOUBLE AS total_frequency, c.max_frequency::DOUBLE AS max_frequency,
                   c.max_activation::DOUBLE AS max_activation, c.n_peaks::INTEGER AS n_peaks,
                   coalesce(p.peak_timesteps, []::INTEGER[]) AS peak_timesteps, p.top_peak_timestep,
                   coalesce(e.n_examples, 0)::INTEGER AS n_examples,
                   coalesce(t.top_prompts, []::VARCHAR[]) AS top_prompts,
                   array_to_string(coalesce(t.top_prompts, []::VARCHAR[]), ' | ') AS top_prompts_text
            FROM {table('channels')} c
            LEFT JOIN peaks p USING (channel) LEFT JOIN examples e USING (channel) LEFT JOIN prompts t USING (channel)
            ORDER BY c.channel
        """).pl()
    finally:
        con.close()
    channels = base["channel"].to_list()
    priors_root = layout.stage_dir(PRIORS_STAGE, variant)
    has_priors = []
    for c in channels:
        prior = read_prior(priors_root, c)
        has_priors.append(bool(prior and prior.get("status") == "done"))
    # A channel "has dreams" only with a raised one (ddr_core.dreams.quality.with_raised): the others are no
    # pictures of it. n_dreams and the ratios count raised dreams; n_not_raised_dreams the rest.
    dream_flags: dict[str, list[bool]] = {}
    qualities: dict[str, pl.DataFrame | None] = {}
    for run, stage in DREAM_RUNS.items():
        quality = _read_quality(layout, variant, run, None)
        if quality is not None and quality.height and not all(c in quality.columns for c in VERDICT_SCHEMA):
            quality = with_raised(quality)
        qualities[run] = quality
        raised = (set(quality.filter(pl.col("raised"))["channel"].to_list())
                  if quality is not None and quality.height else set())
        root = layout.stage_dir(stage, variant)
        flags = []
        for c in channels:
            dream = read_dream(root, c) if root.is_dir() else None
            flags.append(bool(dream and dream.get("results")) and c in raised)
        dream_flags[run] = flags
    quality = qualities["noise"]
    if quality is not None and quality.height:
        ratio = pl.col("ratio").filter(pl.col("raised") & pl.col("ratio").is_finite())
        quality_summary = quality.group_by("channel").agg(
            pl.col("raised").cast(pl.Int32).sum().cast(pl.Int32).alias("n_dreams"),
            (~pl.col("raised")).cast(pl.Int32).sum().cast(pl.Int32).alias("n_not_raised_dreams"),
            pl.col("failed").cast(pl.Int32).sum().cast(pl.Int32).alias("n_failed_dreams"),
            ratio.mean().alias("dream_ratio_mean"),
            ratio.max().alias("dream_ratio_max"),
            pl.col("dream_activation").filter(pl.col("raised") & pl.col("dream_activation").is_finite()).mean()
            .alias("dream_activation_mean"),
        ).with_columns(pl.col("channel").cast(pl.Int32))
    else:
        quality_summary = pl.DataFrame(schema={
            "channel": pl.Int32, "n_dreams": pl.Int32, "n_not_raised_dreams": pl.Int32, "n_failed_dreams": pl.Int32,
            "dream_ratio_mean": pl.Float64, "dream_ratio_max": pl.Float64, "dream_activation_mean": pl.Float64,
        })
    rep = representation_dir(layout, variant)
    frame = base.with_columns(
        pl.Series("has_priors", has_priors, dtype=pl.Boolean),
        pl.Series("has_dreams", dream_flags["noise"], dtype=pl.Boolean),
        pl.Series("has_dreams_no_noise", dream_flags["no_noise"], dtype=pl.Boolean),
        pl.Series("has_shard", [channel_file(rep, c, ".json").is_file() for c in channels], dtype=pl.Boolean),
    ).join(quality_summary, on="channel", how="left").with_columns(
        pl.col("n_dreams").fill_null(0), pl.col("n_not_raised_dreams").fill_null(0),
        pl.col("n_failed_dreams").fill_null(0),
    )
    frame = pl.from_arrow(frame.select(list(INDEX_COLUMNS)).to_arrow().cast(INDEX_SCHEMA))
    if int(summary["width"]) != frame.height:
        raise ValueError(f"channels.parquet of {variant!r} has {frame.height} rows but the width is {summary['width']}")
    return frame


def build_index(layout: DataLayout, variant: str, out_dir: str | Path | None = None, lock_owner: str = "") -> Path:
    """Write ``index.parquet`` and ``index.json`` for ``variant`` (under the index lock, waiting for another
    run's index); returns the Parquet path.

    Query it with DuckDB, e.g. ``select channel, top_prompts_text from 'index.parquet' where is_active
    and top_prompts_text ilike '%cat%' order by total_frequency desc``.
    """
    out = Path(out_dir) if out_dir is not None else representation_dir(layout, variant)
    out.mkdir(parents=True, exist_ok=True)
    with partition_lock(stage_locks_dir(out) / "index.lock", wait=True, owner=lock_owner or f"index {variant}"):
        remove_temporaries_of(out, ["index.parquet", "index.json"])
        return _write_index(layout, variant, out)


def _write_index(layout: DataLayout, variant: str, out: Path) -> Path:
    summary = _read_stats_summary(layout, variant)
    frame = make_index_table(layout, variant)
    index_file = out / "index.parquet"
    with atomic_path(index_file) as tmp:
        pq.write_table(frame.to_arrow().cast(INDEX_SCHEMA), tmp, compression="zstd")
    atomic_write_json(out / "index.json", {
        "format": INDEX_FORMAT,
        "variant": variant,
        "experiment": layout.experiment,
        "total_channels": frame.height,
        "active_channels": int(frame["is_active"].sum()),
        "timesteps": [int(t) for t in summary["timesteps"]],
        "total_timesteps": int(summary["config"]["total_timesteps"]),
        "n_generations": summary.get("n_generations"),
        "channels_with_shards": int(frame["has_shard"].sum()),
        "channels_with_priors": int(frame["has_priors"].sum()),
        "channels_with_dreams": int(frame["has_dreams"].sum()),
        "channels_with_dreams_no_noise": int(frame["has_dreams_no_noise"].sum()),
        "index": "index.parquet",
        "built_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    })
    return index_file


def check_index(frame: pl.DataFrame, source: str = "index") -> pl.DataFrame:
    """``frame`` with the columns of :data:`INDEX_SCHEMA` in their types, checked: one row per channel.

    Raises:
        BadShardError: a column is missing or cannot take its type, or a channel is null or repeated.
    """
    fix = "rebuild it with build_index (`ddr build-shards` or materialize representation_shards)"
    missing = [c for c in INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise BadShardError(f"{source} lacks the column(s) {missing}: {fix}")
    try:
        frame = pl.from_arrow(frame.select(list(INDEX_COLUMNS)).to_arrow().cast(INDEX_SCHEMA))
    except (pa.ArrowException, ValueError, TypeError) as error:
        raise BadShardError(f"{source} has columns of the wrong type ({str(error)[:200]}): {fix}") from None
    channels = frame["channel"]
    if channels.null_count() or channels.n_unique() != frame.height:
        raise BadShardError(f"{source} has null or repeated channels: {fix}")
    return frame


def load_index(layout: DataLayout, variant: str) -> pl.DataFrame:
    """``index.parquet`` of ``variant`` when written (checked with :func:`check_index`), else built in memory
    from the statistics.

    Raises:
        BadShardError: ``index.parquet`` cannot be read or has the wrong columns (names the file and the fix).
    """
    path = representation_dir(layout, variant) / "index.parquet"
    if path.is_file():
        try:
            frame = pl.read_parquet(path)
        except Exception as error:  # polars / pyarrow / OS errors: all mean an unreadable table
            raise BadShardError(f"index {path} cannot be read ({type(error).__name__}: {str(error)[:200]}): "
                                "rebuild it with build_index (`ddr build-shards`)") from None
        return check_index(frame, f"index {path}")
    return make_index_table(layout, variant)


def load_index_or_rebuild(layout: DataLayout, variant: str) -> tuple[pl.DataFrame, str | None]:
    """:func:`load_index`, or where ``index.parquet`` is unusable the index built in memory from the upstream
    stages and the reason, for a warning."""
    try:
        return load_index(layout, variant), None
    except BadShardError as error:
        return make_index_table(layout, variant), f"{error} (the index was rebuilt in memory from the statistics)"


def search_channels(
    layout: DataLayout, variant: str, text: str, limit: int = 200, active_only: bool = True
) -> pl.DataFrame:
    """Channels whose dataset examples have a prompt containing ``text`` (case-insensitive ``ILIKE``).

    Returns ``channel, matches, best_activation, prompt`` (the best matching prompt), most matches
    first. ``%`` and ``_`` in ``text`` match literally.
    """
    path = layout.timestep_stats_dir(variant) / "dataset_examples.parquet"
    if not path.is_file():
        raise MissingStatsError(f"{path} is missing: materialize timestep_stats[{variant}] first")
    pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    active_filter = ""
    params: list[Any] = [str(path), pattern]
    if active_only:
        channels_path = layout.timestep_stats_dir(variant) / "channels.parquet"
        active_filter = "AND channel IN (SELECT channel FROM read_parquet(?) WHERE is_active)"
        params.append(str(channels_path))
    params.append(int(limit))
    con = duckdb.connect()
    try:
        return con.sql(
            f"""
            SELECT channel::INTEGER AS channel, count(*)::INTEGER AS matches, max(activation) AS best_activation,
                   arg_max(prompt, activation) AS prompt
            FROM read_parquet(?)
            WHERE prompt ILIKE ? ESCAPE '\\' {active_filter}
            GROUP BY channel ORDER BY matches DESC, best_activation DESC, channel LIMIT ?
            """,
            params=params,
        ).pl()
    finally:
        con.close()
