"""timestep_stats split by channel range (ddr_core.statistics_shards): shards + merge equal one run.

On the loopback cluster (each shard one SLURM job through the compute resource):
tests/test_slurm_cluster.py ``test_timestep_stats_sharded_as_slurm_jobs_equals_one_run``.
"""

import json

import numpy as np
import polars as pl
import pytest

from ddr_core.statistics import STATS_TABLES, TimestepStatsConfig, compute_timestep_stats
from ddr_core.statistics_shards import channel_ranges, compute_stats_shard, merge_stats_shards, shard_dir
from tests.test_statistics import make_store

TIMESTEPS = [900, 700, 500, 300, 100]


def assert_same_statistics(a, b) -> None:
    """Every table bit for bit (row order included) and the summary apart from where it lives."""
    for table in STATS_TABLES:
        left, right = pl.read_parquet(a / f"{table}.parquet"), pl.read_parquet(b / f"{table}.parquet")
        assert left.schema == right.schema and left.equals(right), table
    summaries = [json.loads((d / "summary.json").read_text()) for d in (a, b)]
    for summary in summaries:
        summary.pop("out_dir")
        summary.pop("files")  # sizes: the same rows can compress to other sizes
    assert summaries[0] == summaries[1]


@pytest.mark.parametrize("shards", [2, 3, 11])
def test_sharded_statistics_equal_one_run_ties_included(tmp_path, shards):
    """Coarse values (many exact ties across shard borders: ranks must break them to the lower channel, as
    one run does) and a top_k larger than some shards' width."""
    rng = np.random.default_rng(1)
    cond = rng.integers(0, 4, size=(9, len(TIMESTEPS), 11)).astype(np.float32)
    store = make_store(tmp_path / "capture", cond, TIMESTEPS, per_batch=4)
    config = TimestepStatsConfig(top_k=4, peak_separation=50)
    single = compute_timestep_stats(store, "raw", tmp_path / "single", config)
    ranges = channel_ranges(11, shards)
    for first, stop in ranges:
        compute_stats_shard(store, "raw", (first, stop), config, tmp_path / "shards")
    merged = merge_stats_shards(store, "raw", tmp_path / "merged", config, tmp_path / "shards", ranges)
    assert_same_statistics(tmp_path / "single", tmp_path / "merged")
    assert merged.active_channel_count == single.active_channel_count and merged.preview == single.preview


def test_a_finished_shard_is_not_recomputed_and_gaps_or_stale_shards_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    store = make_store(tmp_path / "capture", rng.normal(size=(4, len(TIMESTEPS), 6)).astype(np.float32),
                       TIMESTEPS)
    config = TimestepStatsConfig(top_k=2, peak_separation=50)
    ranges = channel_ranges(6, 2)
    for first, stop in ranges:
        compute_stats_shard(store, "raw", (first, stop), config, tmp_path / "shards")
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*") if p.is_file()}
    compute_stats_shard(store, "raw", ranges[0], config, tmp_path / "shards")  # a rerun (resume) skips it
    assert {p: p.stat().st_mtime_ns for p in written} == written
    with pytest.raises(ValueError, match="do not cover"):
        merge_stats_shards(store, "raw", tmp_path / "out", config, tmp_path / "shards", ranges[:1])
    with pytest.raises(ValueError, match="other configs"):
        merge_stats_shards(store, "raw", tmp_path / "out", TimestepStatsConfig(top_k=3, peak_separation=50),
                           tmp_path / "shards", ranges)
    (shard_dir(tmp_path / "shards", *ranges[1]) / "shard.json").unlink()
    with pytest.raises(ValueError, match="not finished"):
        merge_stats_shards(store, "raw", tmp_path / "out", config, tmp_path / "shards", ranges)
    with pytest.raises(ValueError, match="channel shards must be"):
        channel_ranges(6, 7)
