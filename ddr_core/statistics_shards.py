"""``timestep_stats`` split by channel range: shards that read the store, and a merge equal to one run.

The expensive part of :func:`ddr_core.statistics.compute_timestep_stats` is reading every dense batch
(``G x T x F`` values) and ranking channels at each (generation, timestep); everything after works on the
top-k rows and the per-(timestep, channel) maximum. Both split exactly by channel range:

- a **shard** (:func:`compute_stats_shard`, channels ``[first, stop)``) reads its channels of every batch
  and keeps, per (generation, timestep), the ``min(top_k, stop - first)`` largest of *its* channels (same
  order: activation descending, ties to the lower channel) and its slice of the maximum;
- the **merge** (:func:`merge_stats_shards`) takes, per (generation, timestep), the ``top_k`` largest of
  the shards' candidates. A channel in the global top-k is beaten by fewer than ``top_k`` channels
  overall, so by fewer than ``top_k`` of its own range: it is among its shard's candidates, and the
  merged top-k (ranks and ties included) is the one a single run computes. The maxima are concatenated.
  The rest (frequency, examples, profiles, peaks, ``stats.duckdb``, ``summary.json``) is the single-run
  code itself (``compute_timestep_stats(..., merged=...)``), so the folder equals one job's.

A shard writes ``topk.parquet``, ``maximum.npy`` and ``shard.json`` (last: the completion marker) into its
folder ``<shards_dir>/<first>-<stop>/`` via a temporary sibling renamed whole, so a killed or preempted
shard leaves nothing half-written and a rerun skips finished shards (same config and generations).
On a cluster each shard is one job (stage ``timestep_stats_shard`` through the compute resource), all of them
submitted at once and run in parallel (``ComputeResource.run_stages``); shards already finished are not
submitted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.parquet as pq

from ddr_core.activation_store import TOPK_SCHEMA, ActivationStore, check_finite, topk_table
from ddr_core.atomic import atomic_write_json
from ddr_core.statistics import StatsSummary, TimestepStatsConfig, compute_timestep_stats

LogFn = Callable[[str], None]
SHARD_FORMAT = 1


def channel_ranges(width: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ``[first, stop)`` ranges covering ``0..width`` (sizes differ by at most one)."""
    if not 1 <= shards <= width:
        raise ValueError(f"channel shards must be 1..{width} (the variant's width), got {shards}")
    edges = np.linspace(0, width, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def shard_dir(shards_dir: str | os.PathLike[str], first: int, stop: int) -> Path:
    return Path(shards_dir) / f"{first:06d}-{stop:06d}"


def _generations_key(ids: list[np.ndarray]) -> str:
    joined = np.sort(np.concatenate(ids)) if ids else np.array([], dtype=np.int64)
    return hashlib.sha256(joined.astype(np.int64).tobytes()).hexdigest()[:16]


def finished_shard(shards_dir: str | os.PathLike[str], first: int, stop: int,
                   config: TimestepStatsConfig) -> dict[str, Any] | None:
    """The ``shard.json`` of the finished shard ``[first, stop)`` computed with ``config``, else ``None``."""
    marker = shard_dir(shards_dir, first, stop) / "shard.json"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text(encoding="utf-8"))
    if done.get("config_hash") == config.config_hash() and done.get("format") == SHARD_FORMAT:
        return done
    return None


def compute_stats_shard(store: ActivationStore, variant: str, channels: tuple[int, int],
                        config: TimestepStatsConfig, shards_dir: str | os.PathLike[str],
                        log: LogFn | None = None) -> dict[str, Any]:
    """Compute the shard of channels ``[first, stop)`` into its folder under ``shards_dir`` (see the module
    docstring); return its ``shard.json``. A finished shard of the same config is returned as it is."""
    first, stop = (int(c) for c in channels)
    width = store.width(variant)
    if not 0 <= first < stop <= width:
        raise ValueError(f"channel range {first}-{stop} is outside 0..{width} of variant {variant!r}")
    folder = shard_dir(shards_dir, first, stop)
    done = finished_shard(shards_dir, first, stop, config)
    if done is not None:
        if log:
            log(f"timestep stats shard {first}-{stop} of {variant}: already finished, skipped")
        return done
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        k = min(config.top_k, stop - first)
        observed = store.timesteps()
        maximum = np.full((len(observed), stop - first), -np.inf, dtype=np.float32)
        ids: list[np.ndarray] = []
        with pq.ParquetWriter(staging / "topk.parquet", TOPK_SCHEMA, compression="zstd") as writer:
            for generation_ids, timesteps, activations in store.iter_dense(variant, config.half):
                if timesteps.tolist() != observed.tolist():
                    raise ValueError(f"a batch of {variant!r} has timesteps {timesteps.tolist()} != "
                                     f"{observed.tolist()}")
                part = np.ascontiguousarray(activations[:, :, first:stop])
                check_finite(part, variant, config.half, generation_ids, timesteps)
                table = topk_table(generation_ids, timesteps, part, k)
                offset = table.column("channel").to_numpy() + first
                writer.write_table(table.set_column(3, "channel", [offset.astype(np.int32)]))
                np.fmax(maximum, part.max(axis=0), out=maximum)
                ids.append(generation_ids)
                if log:
                    log(f"timestep stats shard {first}-{stop} of {variant}: {sum(map(len, ids))} generations read")
        np.save(staging / "maximum.npy", maximum)
        info = {"format": SHARD_FORMAT, "variant": variant, "first": first, "stop": stop, "width": width,
                "config_hash": config.config_hash(), "n_generations": int(sum(map(len, ids))),
                "generations_key": _generations_key(ids), "timesteps": [int(t) for t in observed]}
        atomic_write_json(staging / "shard.json", info)
        if folder.exists():  # an older shard (another config): replaced
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def merge_stats_shards(store: ActivationStore, variant: str, out_dir: str | os.PathLike[str],
                       config: TimestepStatsConfig, shards_dir: str | os.PathLike[str],
                       ranges: list[tuple[int, int]], log: LogFn | None = None, **stats_options: Any) -> StatsSummary:
    """Assemble the finished shards of ``ranges`` (covering every channel once) into the statistics folder
    ``out_dir``, equal to ``compute_timestep_stats(store, variant, out_dir, config)``."""
    width = store.width(variant)
    ordered = sorted((int(a), int(b)) for a, b in ranges)
    if not ordered or ordered[0][0] != 0 or ordered[-1][1] != width or any(
            a[1] != b[0] for a, b in zip(ordered[:-1], ordered[1:], strict=True)):
        raise ValueError(f"channel shards {ordered} do not cover 0..{width} of {variant!r} exactly once")
    infos = []
    for first, stop in ordered:
        marker = shard_dir(shards_dir, first, stop) / "shard.json"
        if not marker.is_file():
            raise ValueError(f"shard {first}-{stop} of {variant!r} is not finished ({marker} missing): run it first")
        infos.append(json.loads(marker.read_text(encoding="utf-8")))
    keys = {(i["config_hash"], i["n_generations"], i["generations_key"], tuple(i["timesteps"])) for i in infos}
    if len(keys) != 1 or next(iter(keys))[0] != config.config_hash():
        raise ValueError(f"the shards of {variant!r} in {shards_dir} were computed with other configs or other "
                         f"generations (the store grew between them?): remove {shards_dir} and run them again")

    stored = store.read_generations().height
    if stored != infos[0]["n_generations"]:
        raise ValueError(f"the shards of {variant!r} read {infos[0]['n_generations']} generations, the store now has "
                         f"{stored}: remove {shards_dir} and run the shards again")

    def merged(work: Path) -> tuple[list[Path], np.ndarray, int]:
        parts = [shard_dir(shards_dir, a, b) / "topk.parquet" for a, b in ordered]
        listed = "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts) + "]"
        destination = work / "topk_merged.parquet"
        con = duckdb.connect()
        try:
            con.execute("SET temp_directory = '" + str(work / "duckdb_spill").replace("'", "''") + "'")
            con.execute(f"""
                COPY (
                    SELECT generation_id, timestep, merged_rank AS rank, channel, activation FROM (
                        SELECT generation_id, timestep, channel, activation,
                               (row_number() OVER (PARTITION BY generation_id, timestep
                                                   ORDER BY activation DESC, channel) - 1)::INTEGER AS merged_rank
                        FROM read_parquet({listed})  -- (its own column `rank` is the shard's rank)
                        QUALIFY merged_rank < {int(config.top_k)}
                    )
                ) TO '{str(destination).replace("'", "''")}' (FORMAT parquet, COMPRESSION zstd)""")
        finally:
            con.close()
        maximum = np.concatenate([np.load(shard_dir(shards_dir, a, b) / "maximum.npy") for a, b in ordered], axis=1)
        if log:
            log(f"timestep stats {variant}: {len(ordered)} channel shards merged")
        return [destination], maximum, int(infos[0]["n_generations"])

    return compute_timestep_stats(store, variant, out_dir, config, log=log, merged=merged, **stats_options)
