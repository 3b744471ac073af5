"""When in the denoising process is each channel active? Timestep statistics from an activation store.

For one variant of an :class:`~ddr_core.activation_store.ActivationStore` (``G`` generations, ``T``
recorded timesteps, ``F`` channels) this computes, from the dense activations of one CFG half
(the **conditional** half by default; the thesis mixed both halves, we do not):

- **top-k**: at every (generation, timestep), the ``top_k`` channels with the largest spatial-mean
  activation (ties to the lower channel). Computed here from the dense values, so a new ``top_k``
  needs no new generation.
- **frequency** of a channel at a timestep: the fraction of the ``G`` generations in whose top-k the
  channel is at that timestep.
- **activity profile** of a channel: its frequencies at the observed timesteps, linearly interpolated
  with ``np.interp`` onto every timestep ``0..total_timesteps-1``. Outside the observed range
  ``np.interp`` holds the nearest observed value (with 50 steps ``981..1``, timesteps ``982..999`` take
  the value at 981 and timestep 0 the value at 1).
- **active timesteps**: where the profile is ``> 0``. A channel is *active* if it has any.
- **activity peaks**: ``scipy.signal.find_peaks`` on the profile with ``height=peak_threshold``,
  ``distance=peak_separation`` and ``plateau_size=1`` (a flat top counts once, at its middle). The
  profile is padded with a lower value on both sides, so a maximum at the first or last timestep (also
  a flat one) counts as a peak too; a peak must have height ``> 0``. The ``top_peak_count`` highest
  are kept (ties to the lower timestep).
- **dataset examples** of a channel at an observed timestep: the generations in whose top-k it is,
  ranked by activation (ties to the lower generation id), the first ``n_examples`` kept.

Ranks (``rank``, ``peak_rank``) are 0-based: 0 is the largest. Outputs in ``out_dir`` (all Parquet):

=========================  ==================================================================
``topk.parquet``           generation_id, timestep, rank, channel, activation
``frequency.parquet``      channel, timestep, count, frequency (only rows with count > 0; a
                           missing (channel, timestep) has frequency 0)
``max_activation.parquet`` channel, timestep, max_activation (every channel and observed timestep)
``active_timesteps.parquet`` channel, timestep, frequency (interpolated; only active timesteps)
``activity_peaks.parquet`` channel, peak_rank, timestep, height, plateau_start, plateau_end,
                           observed_timestep (the observed timestep nearest the peak)
``dataset_examples.parquet`` channel, timestep, rank, generation_id, activation, prompt, image_path
``channels.parquet``       channel, is_active, n_active_timesteps, total_frequency, max_frequency,
                           max_activation, first_active_timestep, last_active_timestep, n_peaks
``stats.duckdb``           views of the same names over these files (absolute paths) + ``config``
``summary.json``           config, config_hash, counts, preview; written last (completion marker)
=========================  ==================================================================

Memory (``memory_budget_mib``, peak RSS of the process, default 4096) does not grow with the number of
generations: the dense activations are read in chunks of generations sized to the budget
(:func:`ddr_core.stats_streaming.plan_memory`), the accumulators are ``F x T`` (maximum, counts) and
``F x T x n_examples`` (running top examples, :class:`~ddr_core.stats_streaming.TopExamples`); top-k rows
are appended to ``topk.parquet`` as they come (no sort when the batches come in generation order) and
aggregated by DuckDB within a ``memory_limit`` taken from the budget (it spills to disk); profiles are
built per channel. A budget too small for the accumulators is refused before anything is written.

Reliability: the inputs (variant, ``top_k`` against the width, timesteps) are checked before anything
is written. One run at a time writes a given ``out_dir``: it holds the lock file
``<out_dir's parent>/.<out_dir's name>.lock`` (:mod:`ddr_core.locks`; a second run fails at once
naming the first, or waits ``lock_wait`` seconds). Everything is computed into a temporary sibling
folder that replaces ``out_dir`` as a whole at the end (:func:`ddr_core.atomic.atomic_dir`), so a
failure (a full disk, a kill) leaves the previous finished statistics in place and readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from ddr_core.activation_store import ActivationStore, check_finite, topk_table
from ddr_core.atomic import atomic_dir, atomic_path, atomic_write_json, recover_dir
from ddr_core.locks import partition_lock
from ddr_core.paths import check_output_folder
from ddr_core.stats_streaming import TOPK_SCHEMA, MemoryPlan, TopExamples, TopkWriter, plan_memory

LogFn = Callable[[str], None]

STATS_TABLES: tuple[str, ...] = (
    "topk",
    "frequency",
    "max_activation",
    "active_timesteps",
    "activity_peaks",
    "dataset_examples",
    "channels",
)

ACTIVE_TIMESTEPS_SCHEMA = pa.schema(
    [("channel", pa.int32()), ("timestep", pa.int32()), ("frequency", pa.float64())]
)
PEAKS_SCHEMA = pa.schema(
    [
        ("channel", pa.int32()),
        ("peak_rank", pa.int32()),
        ("timestep", pa.int32()),
        ("height", pa.float64()),
        ("plateau_start", pa.int32()),
        ("plateau_end", pa.int32()),
        ("observed_timestep", pa.int64()),
    ]
)
CHANNELS_SCHEMA = pa.schema(
    [
        ("channel", pa.int32()),
        ("is_active", pa.bool_()),
        ("n_active_timesteps", pa.int32()),
        ("total_frequency", pa.float64()),
        ("max_frequency", pa.float64()),
        ("max_activation", pa.float32()),
        ("first_active_timestep", pa.int32()),
        ("last_active_timestep", pa.int32()),
        ("n_peaks", pa.int32()),
    ]
)


class TimestepStatsConfig(BaseModel):
    """Parameters of :func:`compute_timestep_stats` (defaults as in the thesis, threshold 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(20, ge=1, description="channels counted per (generation, timestep); <= width")
    total_timesteps: int = Field(1000, ge=1, description="train timesteps of the scheduler (profile length)")
    peak_threshold: float = Field(0.0, description="minimum profile height of a peak (find_peaks height)")
    peak_separation: int = Field(100, ge=1, description="minimum distance in timesteps between peaks")
    top_peak_count: int = Field(3, ge=1, description="peaks kept per channel, highest first")
    n_examples: int | None = Field(None, ge=1, description="dataset examples per (channel, timestep); None: top_k")
    half: Literal["conditional", "unconditional"] = Field("conditional", description="CFG half analysed")
    profile: Literal["interpolated", "sampled"] = Field(
        "interpolated", description="interpolated: the frequencies linearly interpolated between the observed "
        "timesteps (edges held); sampled: the frequencies at the observed timesteps only, 0 elsewhere (few-step "
        "models such as SDXL-Turbo, whose 1-4 timesteps say nothing about the others)")
    memory_budget_mib: int = Field(
        4096, ge=1024, le=1_048_576, description="peak memory (RSS, MiB) of the statistics process, whatever the "
        "number of generations: sets the chunk of generations read at a time and DuckDB's memory_limit; not part "
        "of the results (nor of config_hash)")

    @property
    def resolved_n_examples(self) -> int:
        return self.n_examples if self.n_examples is not None else self.top_k

    def resolved(self) -> dict[str, Any]:
        """The config as a plain dict with ``n_examples`` filled in (``profile`` only when ``sampled``: the
        interpolated profile is what every earlier statistics folder was made with, so their hashes hold;
        without ``memory_budget_mib``, which changes how the results are computed, never what they are)."""
        data = {**self.model_dump(exclude={"memory_budget_mib"}), "n_examples": self.resolved_n_examples}
        if data["profile"] == "interpolated":
            data.pop("profile")
        return data

    def config_hash(self) -> str:
        """16 hex digits identifying the resolved config."""
        canonical = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class StatsSummary:
    """What :func:`compute_timestep_stats` computed; ``preview`` lists the most active channels."""

    variant: str
    half: str
    out_dir: str
    config: dict[str, Any]
    config_hash: str
    n_generations: int
    timesteps: list[int]
    width: int
    active_channel_count: int
    peak_count: int
    files: dict[str, int] = field(default_factory=dict)
    preview: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def interpolate_profile(
    observed_timesteps: np.ndarray, frequency: np.ndarray, total_timesteps: int
) -> np.ndarray:
    """Linear interpolation of ``frequency`` (one per observed timestep, any order) onto
    ``0..total_timesteps-1``; returns ``(total_timesteps,)`` float64 (edges held, as ``np.interp``)."""
    order = np.argsort(observed_timesteps)
    return np.interp(
        np.arange(total_timesteps, dtype=np.float64),
        np.asarray(observed_timesteps, dtype=np.float64)[order],
        np.asarray(frequency, dtype=np.float64)[order],
    )


def sampled_profile(observed_timesteps: np.ndarray, frequency: np.ndarray, total_timesteps: int) -> np.ndarray:
    """``frequency`` at the observed timesteps, 0 at every other of ``0..total_timesteps-1`` (``profile: sampled``)."""
    profile = np.zeros(total_timesteps, dtype=np.float64)
    profile[np.asarray(observed_timesteps, dtype=np.int64)] = np.asarray(frequency, dtype=np.float64)
    return profile


def nearest_observed_timestep(observed_timesteps: np.ndarray, timestep: int) -> int:
    """The observed timestep closest to ``timestep`` (ties to the larger, i.e. earlier in denoising)."""
    observed_timesteps = np.asarray(observed_timesteps, dtype=np.int64)
    distance = np.abs(observed_timesteps - timestep) * 2 - (observed_timesteps > timestep)
    return int(observed_timesteps[np.argmin(distance)])


def find_activity_peaks(
    profile: np.ndarray, peak_threshold: float, peak_separation: int, top_peak_count: int
) -> list[tuple[int, float, int, int]]:
    """Peaks of a ``(total_timesteps,)`` profile: ``[(timestep, height, plateau_start, plateau_end)]``.

    ``find_peaks`` with ``height=peak_threshold``, ``distance=peak_separation``, ``plateau_size=1`` on
    the profile padded with a lower value at both ends (so maxima at the edges count); heights must be
    ``> 0``. The ``top_peak_count`` highest are returned, highest first, ties by timestep.
    """
    if profile.size == 0 or not np.any(profile > 0):
        return []
    pad = min(float(profile.min()), 0.0) - 1.0
    padded = np.concatenate([[pad], profile, [pad]])
    from scipy.signal import find_peaks  # here, not at the top: loading the definitions stays light

    indices, properties = find_peaks(
        padded, height=peak_threshold, distance=peak_separation, plateau_size=1
    )
    peaks = [
        (int(i) - 1, float(h), int(left) - 1, int(right) - 1)
        for i, h, left, right in zip(
            indices, properties["peak_heights"], properties["left_edges"], properties["right_edges"],
            strict=True,
        )
        if h > 0
    ]
    peaks.sort(key=lambda peak: (-peak[1], peak[0]))
    return peaks[:top_peak_count]


def _sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _copy_to_parquet(con: duckdb.DuckDBPyConnection, query: str, destination: Path) -> None:
    with atomic_path(destination) as tmp:
        con.execute(f"COPY ({query}) TO {_sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd)")


def compute_timestep_stats(
    store: ActivationStore,
    variant: str,
    out_dir: str | os.PathLike[str],
    config: TimestepStatsConfig | None = None,
    log: LogFn | None = None,
    duckdb_memory_limit: str | None = None,
    *,
    lock_wait: bool | float = False,
    lock_owner: str = "",
    merged: Callable[[Path], tuple[list[Path], np.ndarray, int]] | None = None,
) -> StatsSummary:
    """Compute the timestep statistics of ``variant`` into ``out_dir`` (see the module docstring).

    Args:
        store: the capture group's store (finished batches only are read).
        variant: a variant of the store.
        out_dir: output folder; replaced as a whole once the new statistics are complete.
        config: parameters; defaults to ``TimestepStatsConfig()``.
        log: optional progress callback (e.g. Dagster's ``context.log.info``).
        duckdb_memory_limit: e.g. ``"4GB"``; DuckDB spills to a temporary folder beside ``out_dir``.
        lock_wait, lock_owner: see :func:`ddr_core.locks.partition_lock` (another run writing the
            same ``out_dir``: fail at once, or wait that many seconds).
        merged: instead of reading the store, a function of the work folder giving the top-k parts, the
            ``(T, F)`` maximum and the generation count: the merge of channel shards
            (:mod:`ddr_core.statistics_shards`).
    """
    config = config or TimestepStatsConfig()
    out = check_output_folder(Path(out_dir), None, "statistics folder")  # replaced whole: a link would be lost
    width = store.width(variant)
    if config.top_k > width:
        raise ValueError(
            f"top_k={config.top_k} exceeds the width {width} of variant {variant!r}; "
            f"set top_k to at most {width}"
        )
    observed = store.timesteps()  # denoising order
    if observed.min() < 0 or observed.max() >= config.total_timesteps:
        raise ValueError(
            f"recorded timesteps span {observed.min()}..{observed.max()}, outside 0..{config.total_timesteps - 1}; "
            f"set total_timesteps to the scheduler's number of train timesteps"
        )
    if config.profile == "interpolated" and len(observed) < 2:
        raise ValueError(
            f"the capture of {variant!r} observed only timestep {observed.tolist()} (a one-step generation, e.g. "
            f"SDXL-Turbo): an interpolated profile would hold that value at every timestep; set profile: sampled "
            f"(frequencies at the observed timesteps only)"
        )
    plan = plan_memory(config.memory_budget_mib, width, len(observed), config.resolved_n_examples)  # fits?
    with partition_lock(stats_lock_path(out), wait=lock_wait,
                        owner=lock_owner or f"timestep_stats {variant}"):
        recover_dir(out, remove_leftovers=True)  # a killed run's staging folder or swapped-out copy
        with atomic_dir(out) as staging:
            summary = _compute_into(store, variant, out, staging, observed, width, config,
                                    log or (lambda _message: None), duckdb_memory_limit, plan, merged)
        write_stats_database(out, config)  # again: the views must name the final paths
    return summary


def _read_merged_shards(merged: Callable[[Path], tuple[list[Path], np.ndarray, int]], work: Path,
                        observed: np.ndarray, maximum: np.ndarray, examples: TopExamples, topk_writer: TopkWriter,
                        rows_per_batch: int) -> int:
    """Phase 1 from channel shards instead of the store: their merged top-k rows go to the top-k file and the
    running top examples batch by batch (bounded memory), their maxima into ``maximum``; returns the generations."""
    parts, shard_maximum, n_generations = merged(work)
    maximum[...] = shard_maximum
    column_of = np.full(int(observed.max()) + 1, -1, dtype=np.int64)
    column_of[observed] = np.arange(len(observed))
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=max(rows_per_batch, 1)):
            table = pa.Table.from_batches([batch]).select(TOPK_SCHEMA.names).cast(TOPK_SCHEMA)
            generation_ids = table.column("generation_id").to_numpy()
            topk_writer.write(table, generation_ids)
            examples.add(column_of[table.column("timestep").to_numpy()], table.column("channel").to_numpy(),
                         table.column("activation").to_numpy(), generation_ids)
    return n_generations


def stats_lock_path(out_dir: str | os.PathLike[str]) -> Path:
    """The lock file of a statistics folder: a sibling, since the folder itself is replaced whole."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.lock"


def _compute_into(
    store: ActivationStore, variant: str, out: Path, target: Path, observed: np.ndarray, width: int,
    config: TimestepStatsConfig, say: LogFn, duckdb_memory_limit: str | None, plan: MemoryPlan,
    merged: Callable[[Path], tuple[list[Path], np.ndarray, int]] | None = None,
) -> StatsSummary:
    """Write every table, ``stats.duckdb`` and ``summary.json`` into ``target`` (the staging folder
    that becomes ``out``)."""
    timestep_column = {int(t): i for i, t in enumerate(observed)}
    n_examples = config.resolved_n_examples
    memory_limit = duckdb_memory_limit or plan.duckdb_memory_limit
    say(f"timestep stats {variant}: memory budget {plan.budget_mib} MiB: {plan.chunk_generations} generations "
        f"per chunk, {plan.fixed_mib:.0f} MiB accumulators, DuckDB memory_limit {memory_limit}")

    work = Path(tempfile.mkdtemp(prefix=".stats-work.tmp-", dir=target))
    try:
        # 1. Per chunk of generations: top-k rows appended to one Parquet file, running maximum and running
        #    top examples per (timestep, channel). Nothing here grows with the number of generations.
        maximum = np.full((len(observed), width), -np.inf, dtype=np.float32)
        examples = TopExamples(len(observed), width, n_examples)
        topk_writer = TopkWriter(work / "topk_rows.parquet", observed)
        n_generations = chunks = 0
        try:
            if merged is not None:  # channel shards read the store (ddr_core.statistics_shards): their merged top-k
                n_generations = _read_merged_shards(merged, work, observed, maximum, examples, topk_writer,
                                                    plan.chunk_generations * len(observed) * config.top_k)
            for generation_ids, timesteps, activations in (() if merged is not None else store.iter_dense(
                    variant, config.half, max_generations=plan.chunk_generations)):
                if timesteps.tolist() != observed.tolist():
                    raise ValueError(
                        f"a batch of {variant!r} has timesteps {timesteps.tolist()} != {observed.tolist()}")
                # a store written before capture refused non-finite values: name them instead of failing on JSON
                check_finite(activations, variant, config.half, generation_ids, timesteps)
                np.fmax(maximum, activations.max(axis=0), out=maximum)
                table = topk_table(generation_ids, timesteps, activations, config.top_k)
                del activations
                topk_writer.write(table, generation_ids)
                examples.add(np.tile(np.repeat(np.arange(len(observed)), config.top_k), len(generation_ids)),
                             table.column("channel").to_numpy(), table.column("activation").to_numpy(),
                             table.column("generation_id").to_numpy())
                n_generations += len(generation_ids)
                chunks += 1
                say(f"timestep stats {variant}: {chunks} chunks, {n_generations} generations read")
        finally:
            topk_writer.close()
        if n_generations == 0:
            raise ValueError(f"variant {variant!r} in {store.root} has no generations")
        examples_path = work / "examples.parquet"
        pq.write_table(examples.table(observed), examples_path)
        del examples

        if store.generations_path.exists():
            generations_path = store.generations_path
        else:
            generations_path = work / "generations.parquet"
            store.read_generations().write_parquet(generations_path)

        con = duckdb.connect()
        try:
            con.execute(f"SET temp_directory = {_sql_path(work / 'duckdb_spill')}")
            con.execute("SET preserve_insertion_order = false")
            con.execute(f"SET memory_limit = '{memory_limit}'")
            con.execute(f"CREATE VIEW topk_parts AS SELECT * FROM read_parquet({_sql_path(topk_writer.path)})")

            # 2. Tables written by DuckDB: out of core within memory_limit, spilling to `work`.
            if topk_writer.ordered:  # already in (generation_id, timestep DESC, rank) order: no sort
                shutil.move(topk_writer.path, target / "topk.parquet")
                con.execute(f"CREATE OR REPLACE VIEW topk_parts AS SELECT * FROM "
                            f"read_parquet({_sql_path(target / 'topk.parquet')})")
            else:
                _copy_to_parquet(
                    con,
                    "SELECT generation_id, timestep, rank, channel, activation FROM topk_parts "
                    "ORDER BY generation_id, timestep DESC, rank",
                    target / "topk.parquet",
                )
            _copy_to_parquet(
                con,
                f"SELECT channel, timestep, count(*)::BIGINT AS count, "
                f"count(*)::DOUBLE / {n_generations} AS frequency "
                f"FROM topk_parts GROUP BY channel, timestep ORDER BY channel, timestep DESC",
                target / "frequency.parquet",
            )
            _copy_to_parquet(
                con,
                f"""
                SELECT e.channel, e.timestep, e.rank, e.generation_id, e.activation, g.prompt, g.image_path
                FROM read_parquet({_sql_path(examples_path)}) e
                LEFT JOIN read_parquet({_sql_path(generations_path)}) g USING (generation_id)
                ORDER BY e.channel, e.timestep DESC, e.rank
                """,
                target / "dataset_examples.parquet",
            )
            say(f"timestep stats {variant}: top-k, frequency and dataset examples written")

            frequency_rows = con.execute(
                "SELECT channel, timestep, frequency FROM read_parquet(?)", [str(target / "frequency.parquet")]
            ).fetchnumpy()
        finally:
            con.close()
        # 3. Dense (F, T) frequency matrix; columns in denoising order like `observed`.
        frequency = np.zeros((width, len(observed)), dtype=np.float64)
        columns = np.array([timestep_column[int(t)] for t in frequency_rows["timestep"]], dtype=np.int64)
        frequency[np.asarray(frequency_rows["channel"], dtype=np.int64), columns] = frequency_rows["frequency"]

        channels = np.arange(width, dtype=np.int32)
        with atomic_path(target / "max_activation.parquet") as tmp:
            pq.write_table(
                pa.table(
                    {
                        "channel": np.repeat(channels, len(observed)),
                        "timestep": np.tile(observed, width),
                        "max_activation": maximum.T.reshape(-1),
                    }
                ),
                tmp,
                compression="zstd",
            )

        # 4. Profiles, active timesteps and peaks, one channel at a time.
        summary_columns = _profile_tables(target, observed, frequency, maximum, config)
        say(f"timestep stats {variant}: profiles, active timesteps and peaks written")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    write_stats_database(target, config)

    active = summary_columns["is_active"]
    preview_order = np.lexsort((channels, -summary_columns["total_frequency"]))
    preview = [
        {
            "channel": int(c),
            "total_frequency": float(summary_columns["total_frequency"][c]),
            "n_active_timesteps": int(summary_columns["n_active_timesteps"][c]),
            "max_activation": float(summary_columns["max_activation"][c]),
            "n_peaks": int(summary_columns["n_peaks"][c]),
        }
        for c in preview_order[:10]
        if active[c]
    ]
    summary = StatsSummary(
        variant=variant,
        half=config.half,
        out_dir=str(out),
        config=config.resolved(),
        config_hash=config.config_hash(),
        n_generations=n_generations,
        timesteps=[int(t) for t in observed],
        width=width,
        active_channel_count=int(active.sum()),
        peak_count=int(summary_columns["n_peaks"].sum()),
        files={p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file() and not p.name.startswith(".")},
        preview=preview,
    )
    atomic_write_json(target / "summary.json", {**summary.to_dict(), "store": str(store.root)})
    return summary


def _profile_tables(
    out: Path,
    observed: np.ndarray,
    frequency: np.ndarray,
    maximum: np.ndarray,
    config: TimestepStatsConfig,
    flush_rows: int = 1_000_000,
) -> dict[str, np.ndarray]:
    """Write active_timesteps, activity_peaks and channels; return the per-channel summary columns."""
    width = frequency.shape[0]
    observed_sorted = np.sort(observed)
    n_active = np.zeros(width, dtype=np.int32)
    first_active = np.full(width, -1, dtype=np.int32)
    last_active = np.full(width, -1, dtype=np.int32)
    n_peaks = np.zeros(width, dtype=np.int32)
    peak_rows: dict[str, list] = {name: [] for name in PEAKS_SCHEMA.names}

    with atomic_path(out / "active_timesteps.parquet") as active_tmp:
        writer = pq.ParquetWriter(active_tmp, ACTIVE_TIMESTEPS_SCHEMA, compression="zstd")
        try:
            buffer_channels: list[np.ndarray] = []
            buffer_timesteps: list[np.ndarray] = []
            buffer_values: list[np.ndarray] = []
            buffered = 0
            for channel in np.nonzero(frequency.sum(axis=1) > 0)[0]:
                make_profile = sampled_profile if config.profile == "sampled" else interpolate_profile
                profile = make_profile(observed, frequency[channel], config.total_timesteps)
                active_steps = np.nonzero(profile > 0)[0]
                n_active[channel] = active_steps.size
                if active_steps.size:
                    first_active[channel], last_active[channel] = active_steps[0], active_steps[-1]
                    buffer_channels.append(np.full(active_steps.size, channel, dtype=np.int32))
                    buffer_timesteps.append(active_steps.astype(np.int32))
                    buffer_values.append(profile[active_steps])
                    buffered += active_steps.size
                peaks = find_activity_peaks(
                    profile, config.peak_threshold, config.peak_separation, config.top_peak_count
                )
                n_peaks[channel] = len(peaks)
                for rank, (timestep, height, start, end) in enumerate(peaks):
                    nearest = nearest_observed_timestep(observed_sorted, timestep)
                    for name, value in zip(
                        PEAKS_SCHEMA.names,
                        (int(channel), rank, timestep, height, start, end, int(nearest)),
                        strict=True,
                    ):
                        peak_rows[name].append(value)
                if buffered >= flush_rows:
                    _flush(writer, buffer_channels, buffer_timesteps, buffer_values)
                    buffered = 0
            _flush(writer, buffer_channels, buffer_timesteps, buffer_values)
        finally:
            writer.close()

    with atomic_path(out / "activity_peaks.parquet") as tmp:
        pq.write_table(pa.table(peak_rows, schema=PEAKS_SCHEMA), tmp, compression="zstd")

    total_frequency = frequency.sum(axis=1)
    channel_max = maximum.max(axis=0)  # (F,)
    is_active = n_active > 0
    columns = {
        "channel": np.arange(width, dtype=np.int32),
        "is_active": is_active,
        "n_active_timesteps": n_active,
        "total_frequency": total_frequency,
        "max_frequency": frequency.max(axis=1),
        "max_activation": channel_max.astype(np.float32),
        "first_active_timestep": first_active,
        "last_active_timestep": last_active,
        "n_peaks": n_peaks,
    }
    table = pa.table(
        {
            **columns,
            "first_active_timestep": pa.array(first_active, mask=~is_active),
            "last_active_timestep": pa.array(last_active, mask=~is_active),
        },
        schema=CHANNELS_SCHEMA,
    )
    with atomic_path(out / "channels.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return columns


def _flush(
    writer: pq.ParquetWriter,
    channels: list[np.ndarray],
    timesteps: list[np.ndarray],
    values: list[np.ndarray],
) -> None:
    if channels:
        writer.write_table(
            pa.table(
                {
                    "channel": np.concatenate(channels),
                    "timestep": np.concatenate(timesteps),
                    "frequency": np.concatenate(values),
                },
                schema=ACTIVE_TIMESTEPS_SCHEMA,
            )
        )
    channels.clear()
    timesteps.clear()
    values.clear()


def _create_views(con: duckdb.DuckDBPyConnection, stats_dir: Path, temporary: bool = False) -> None:
    kind = "TEMPORARY VIEW" if temporary else "VIEW"
    for table in STATS_TABLES:
        path = stats_dir / f"{table}.parquet"
        if path.exists():
            con.execute(
                f"CREATE OR REPLACE {kind} {table} AS SELECT * FROM read_parquet({_sql_path(path)})"
            )


def write_stats_database(stats_dir: str | os.PathLike[str], config: TimestepStatsConfig) -> Path:
    """(Re)create ``stats_dir/stats.duckdb``: views over the Parquet tables and a ``config`` table.

    DuckDB resolves relative paths in views against the *working directory*, not the database file,
    so the views use absolute paths; after moving or copying ``stats_dir`` call this again (or use
    :func:`connect_stats`, which works from any location).
    """
    stats_dir = Path(stats_dir).resolve()
    destination = stats_dir / "stats.duckdb"
    with atomic_path(destination) as tmp:
        con = duckdb.connect(str(tmp))
        try:
            _create_views(con, stats_dir)
            resolved = config.resolved()
            con.execute(
                "CREATE TABLE config AS SELECT * FROM (SELECT "
                + ", ".join(f"? AS {name}" for name in [*resolved, "config_hash"])
                + ")",
                [*resolved.values(), config.config_hash()],
            )
            con.execute("CHECKPOINT")
        finally:
            con.close()
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return destination


def require_statistics(stats_dir: str | os.PathLike[str], variant: str) -> dict[str, Any]:
    """The finished statistics' summary of ``variant``, or ``FileNotFoundError`` naming what to materialize (the
    stages that read them call this before loading a model)."""
    try:
        return read_summary(stats_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"the timestep statistics of variant {variant!r} are missing ({error}): materialize "
            f"timestep_stats[{variant}] first (e.g. `dagster asset materialize -m dagster_project.definitions "
            f"--select timestep_stats --partition {variant}`)"
        ) from None


def connect_stats(stats_dir: str | os.PathLike[str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the stats tables as views, wherever ``stats_dir`` now lies."""
    stats_dir = Path(stats_dir).resolve()
    con = duckdb.connect()
    _create_views(con, stats_dir)
    summary_path = stats_dir / "summary.json"
    if summary_path.exists():
        resolved = json.loads(summary_path.read_text())["config"]
        con.execute(
            "CREATE TABLE config AS SELECT * FROM (SELECT "
            + ", ".join(f"? AS {name}" for name in resolved)
            + ")",
            list(resolved.values()),
        )
    return con


def read_summary(stats_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``summary.json`` of a finished statistics folder (raises if the computation did not finish)."""
    path = Path(stats_dir) / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the timestep statistics in {stats_dir} are not complete")
    return json.loads(path.read_text())
