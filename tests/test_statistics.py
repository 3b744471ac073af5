import json
import os
import shutil

import duckdb
import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from ddr_core.activation_store import ActivationStore, VariantBatch
from ddr_core.statistics import (
    TimestepStatsConfig,
    compute_timestep_stats,
    connect_stats,
    find_activity_peaks,
    interpolate_profile,
    nearest_observed_timestep,
    write_stats_database,
)


def make_store(root, conditional, timesteps, unconditional=None, per_batch=2):
    """Store ``(G, T, F)`` activations in batches of ``per_batch`` generations and finalize it."""
    store = ActivationStore(root)
    n = conditional.shape[0]
    for batch_index, start in enumerate(range(0, n, per_batch)):
        ids = range(start, min(start + per_batch, n))
        rows = [
            {"generation_id": g, "prompt_index": g, "prompt": f"prompt {g}", "image_index": 0,
             "seed": g, "image_path": f"images/{g:04d}.png"}
            for g in ids
        ]
        uncond = None if unconditional is None else unconditional[start:start + per_batch]
        store.write_batch(batch_index, rows, timesteps,
                          {"raw": VariantBatch(conditional[start:start + per_batch], uncond)})
    store.finalize()
    return store


TIMESTEPS = [900, 500, 100]


@pytest.fixture
def simple_store(tmp_path):
    """4 generations, 4 channels, 3 timesteps. With top_k=1:
    t=900: channel 0 wins in every generation; t=500: channel 1 in generations 0-1 (activations 10, 12),
    channel 2 in generations 2-3 (11, 10); t=100: channel 3 everywhere.
    The unconditional half is huge on channel 3 everywhere and must not leak in."""
    background = -np.arange(4, dtype=np.float32)  # ties never decide the top-1
    cond = np.broadcast_to(background, (4, 3, 4)).copy()
    cond[:, 0, 0] = 10
    cond[0, 1, 1], cond[1, 1, 1] = 10, 12
    cond[2, 1, 2], cond[3, 1, 2] = 11, 10
    cond[:, 2, 3] = 10
    uncond = np.zeros_like(cond)
    uncond[:, :, 3] = 1000
    return make_store(tmp_path / "capture", cond, TIMESTEPS, unconditional=uncond)


def read(out, name):
    return pl.read_parquet(out / f"{name}.parquet")


def test_config_validation_names_fields():
    with pytest.raises(ValidationError, match="top_k"):
        TimestepStatsConfig(top_k=0)
    with pytest.raises(ValidationError, match="peak_separation"):
        TimestepStatsConfig(peak_separation=0)
    with pytest.raises(ValidationError, match="topk"):
        TimestepStatsConfig(topk=3)
    config = TimestepStatsConfig(top_k=7)
    assert config.resolved_n_examples == 7 and TimestepStatsConfig(n_examples=2).resolved_n_examples == 2
    assert config.config_hash() != TimestepStatsConfig(top_k=8).config_hash()


def test_interpolation_matches_np_interp_and_holds_edges():
    profile = interpolate_profile(np.array([900, 500, 100]), np.array([1.0, 0.0, 0.5]), 1000)
    assert profile.shape == (1000,)
    assert profile[100] == 0.5 and profile[0] == 0.5 and profile[999] == 1.0 and profile[950] == 1.0
    assert profile[300] == pytest.approx(0.25) and profile[700] == pytest.approx(0.5)
    assert profile[500] == 0.0


def test_find_activity_peaks_separation_threshold_plateau_edges():
    x = np.arange(1000, dtype=np.float64)
    bump = lambda centre, height, half_width=20: np.clip(height * (1 - np.abs(x - centre) / half_width), 0, None)  # noqa: E731
    profile = bump(200, 1.0) + bump(260, 0.5) + bump(600, 0.8)
    assert [p[0] for p in find_activity_peaks(profile, 0.0, 100, 3)] == [200, 600]
    assert [p[0] for p in find_activity_peaks(profile, 0.0, 50, 3)] == [200, 600, 260]
    assert [p[0] for p in find_activity_peaks(profile, 0.0, 50, 2)] == [200, 600]
    assert [p[0] for p in find_activity_peaks(profile, 0.9, 50, 3)] == [200]
    plateau = np.zeros(1000)
    plateau[400:421] = 0.3
    assert find_activity_peaks(plateau, 0.0, 100, 3) == [(410, 0.3, 400, 420)]
    edge = np.linspace(1.0, 0.0, 1000)
    assert [p[0] for p in find_activity_peaks(edge, 0.0, 100, 3)] == [0]
    assert find_activity_peaks(np.zeros(1000), 0.0, 100, 3) == []
    assert nearest_observed_timestep(np.array([100, 500, 900]), 300) == 500  # tie -> larger
    assert nearest_observed_timestep(np.array([100, 500, 900]), 949) == 900


def test_frequencies_max_and_conditional_half_only(simple_store, tmp_path):
    out = tmp_path / "stats"
    summary = compute_timestep_stats(simple_store, "raw", out, TimestepStatsConfig(top_k=1))
    frequency = {(r["channel"], r["timestep"]): r["frequency"] for r in read(out, "frequency").to_dicts()}
    assert frequency == {(0, 900): 1.0, (1, 500): 0.5, (2, 500): 0.5, (3, 100): 1.0}
    maximum = {(r["channel"], r["timestep"]): r["max_activation"] for r in read(out, "max_activation").to_dicts()}
    assert len(maximum) == 4 * 3
    assert maximum[(3, 100)] == 10 and maximum[(3, 900)] == -3  # not the unconditional 1000
    assert maximum[(1, 500)] == 12
    topk = read(out, "topk")
    assert topk.height == 4 * 3 and topk["rank"].unique().to_list() == [0]
    assert summary.n_generations == 4 and summary.width == 4 and summary.active_channel_count == 4
    assert summary.timesteps == TIMESTEPS


def test_unconditional_half_is_available_on_request(simple_store, tmp_path):
    out = tmp_path / "uncond"
    compute_timestep_stats(simple_store, "raw", out, TimestepStatsConfig(top_k=1, half="unconditional"))
    assert read(out, "frequency").select("channel").unique()["channel"].to_list() == [3]


def test_active_timesteps_peaks_and_channels(simple_store, tmp_path):
    out = tmp_path / "stats"
    compute_timestep_stats(simple_store, "raw", out, TimestepStatsConfig(top_k=1))
    active = read(out, "active_timesteps")
    by_channel = {c: sorted(active.filter(pl.col("channel") == c)["timestep"].to_list()) for c in range(4)}
    assert by_channel[0] == list(range(501, 1000))  # rises from 500 to 900, then held to 999
    assert by_channel[1] == list(range(101, 900))  # triangle 100 -> 500 -> 900
    assert by_channel[3] == list(range(0, 500))
    value = active.filter((pl.col("channel") == 1) & (pl.col("timestep") == 300))["frequency"].item()
    assert value == pytest.approx(0.25)

    peaks = read(out, "activity_peaks").sort("channel", "peak_rank")
    rows = [(r["channel"], r["peak_rank"], r["timestep"], r["height"], r["observed_timestep"]) for r in peaks.to_dicts()]
    assert rows == [(0, 0, 949, 1.0, 900), (1, 0, 500, 0.5, 500), (2, 0, 500, 0.5, 500), (3, 0, 50, 1.0, 100)]
    plateau = peaks.filter(pl.col("channel") == 0).row(0, named=True)
    assert (plateau["plateau_start"], plateau["plateau_end"]) == (900, 999)

    channels = read(out, "channels").sort("channel")
    assert channels["n_active_timesteps"].to_list() == [499, 799, 799, 500]
    assert channels["first_active_timestep"].to_list() == [501, 101, 101, 0]
    assert channels["last_active_timestep"].to_list() == [999, 899, 899, 499]
    assert channels["total_frequency"].to_list() == [1.0, 0.5, 0.5, 1.0]
    assert channels["max_activation"].to_list() == [10.0, 12.0, 11.0, 10.0]
    assert channels["is_active"].all()


def test_dataset_examples_ordering_and_limit(simple_store, tmp_path):
    out = tmp_path / "stats"
    compute_timestep_stats(simple_store, "raw", out, TimestepStatsConfig(top_k=1, n_examples=10))
    examples = read(out, "dataset_examples")
    channel_1 = examples.filter((pl.col("channel") == 1) & (pl.col("timestep") == 500)).sort("rank")
    assert channel_1["generation_id"].to_list() == [1, 0]  # activations 12 > 10
    assert channel_1["prompt"].to_list() == ["prompt 1", "prompt 0"]
    assert channel_1["image_path"].to_list() == ["images/0001.png", "images/0000.png"]
    channel_0 = examples.filter(pl.col("channel") == 0).sort("rank")
    assert channel_0["generation_id"].to_list() == [0, 1, 2, 3]  # equal activations -> by generation id

    out_limited = tmp_path / "limited"
    compute_timestep_stats(simple_store, "raw", out_limited, TimestepStatsConfig(top_k=1))  # n_examples = top_k
    limited = read(out_limited, "dataset_examples")
    assert limited.group_by("channel", "timestep").len()["len"].max() == 1
    assert limited.filter(pl.col("channel") == 1)["generation_id"].to_list() == [1]
    assert limited.filter(pl.col("channel") == 2)["generation_id"].to_list() == [2]


def test_top_k_larger_than_width_is_a_clear_error(simple_store, tmp_path):
    with pytest.raises(ValueError, match=r"top_k=5 exceeds the width 4"):
        compute_timestep_stats(simple_store, "raw", tmp_path / "stats", TimestepStatsConfig(top_k=5))


def test_recompute_with_other_top_k_from_same_store(simple_store, tmp_path):
    out = tmp_path / "stats"
    first = compute_timestep_stats(simple_store, "raw", out, TimestepStatsConfig(top_k=1))
    second = compute_timestep_stats(simple_store, "raw", out, TimestepStatsConfig(top_k=2))
    assert first.config_hash != second.config_hash
    frequency = {(r["channel"], r["timestep"]): r["frequency"] for r in read(out, "frequency").to_dicts()}
    # t=900: channel 0 then channel 1 (background -1 beats -2, -3) in every generation.
    assert frequency[(0, 900)] == 1.0 and frequency[(1, 900)] == 1.0
    # t=500: gens 0-1 -> {1, 0}; gens 2-3 -> {2, 0}.
    assert frequency[(0, 500)] == 1.0 and frequency[(1, 500)] == 0.5 and frequency[(2, 500)] == 0.5
    assert read(out, "topk").height == 4 * 3 * 2
    assert json.loads((out / "summary.json").read_text())["config"]["top_k"] == 2


def test_several_peaks_separation_threshold_and_count(tmp_path):
    timesteps = [950, 850, 750, 650, 550, 450, 350, 250, 150, 50]
    winners_of_channel_0 = {950: 4, 750: 3, 550: 2, 350: 1}  # generations where channel 0 is top-1
    cond = np.zeros((4, len(timesteps), 3), dtype=np.float32)
    cond[:, :, 1] = 1.0
    for t, count in winners_of_channel_0.items():
        cond[:count, timesteps.index(t), 0] = 5.0
    store = make_store(tmp_path / "cap", cond, timesteps)

    def peaks(**overrides):
        out = tmp_path / f"stats_{len(list(tmp_path.iterdir()))}"
        compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=1, **overrides))
        table = read(out, "activity_peaks").filter(pl.col("channel") == 0).sort("peak_rank")
        return list(zip(table["timestep"].to_list(), table["height"].to_list(), strict=True))

    assert peaks() == [(974, 1.0), (750, 0.75), (550, 0.5)]
    assert peaks(top_peak_count=5) == [(974, 1.0), (750, 0.75), (550, 0.5), (350, 0.25)]
    assert peaks(peak_threshold=0.6) == [(974, 1.0), (750, 0.75)]
    assert peaks(peak_separation=250) == [(974, 1.0), (550, 0.5)]


def test_stats_duckdb_views_and_connect_from_copy(simple_store, tmp_path, monkeypatch):
    out = tmp_path / "stats"
    summary = compute_timestep_stats(simple_store, "raw", out, TimestepStatsConfig(top_k=1))
    monkeypatch.chdir(tmp_path)  # another working directory
    con = duckdb.connect(str(out / "stats.duckdb"), read_only=True)
    assert con.execute("select count(*) from activity_peaks").fetchone()[0] == 4
    assert con.execute("select top_k, config_hash from config").fetchone() == (1, summary.config_hash)
    tables = {r[0] for r in con.execute("select view_name from duckdb_views() where not internal").fetchall()}
    assert {"topk", "frequency", "max_activation", "active_timesteps", "activity_peaks",
            "dataset_examples", "channels"} <= tables
    con.close()

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    os.chdir("/")
    moved = connect_stats(copy)
    assert moved.execute("select count(*) from frequency").fetchone()[0] == 4
    assert moved.execute("select top_k from config").fetchone()[0] == 1
    write_stats_database(copy, TimestepStatsConfig(top_k=1))
    rebuilt = duckdb.connect(str(copy / "stats.duckdb"), read_only=True)
    assert rebuilt.execute("select count(*) from channels where is_active").fetchone()[0] == 4


def test_summary_and_preview(simple_store, tmp_path):
    out = tmp_path / "stats"
    summary = compute_timestep_stats(simple_store, "raw", out, TimestepStatsConfig(top_k=1))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["active_channel_count"] == 4 and on_disk["config_hash"] == summary.config_hash
    assert [row["channel"] for row in summary.preview] == [0, 3, 1, 2]  # total frequency, then channel
    assert "topk.parquet" in summary.files and "stats.duckdb" in summary.files
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no work folders left


def test_more_batches_same_answer(tmp_path):
    rng = np.random.default_rng(0)
    cond = rng.normal(size=(6, 5, 8)).astype(np.float16).astype(np.float32)
    results = []
    for per_batch in (1, 6):
        store = make_store(tmp_path / f"cap{per_batch}", cond, [900, 700, 500, 300, 100], per_batch=per_batch)
        out = tmp_path / f"stats{per_batch}"
        compute_timestep_stats(store, "raw", out, TimestepStatsConfig(top_k=3))
        results.append([read(out, n).sort(pl.all()) for n in ("frequency", "dataset_examples", "activity_peaks")])
    for a, b in zip(*results, strict=True):
        assert a.equals(b)
    # frequency agrees with a brute-force count.
    frequency = read(tmp_path / "stats1", "frequency")
    top3 = np.argsort(-cond, axis=2, kind="stable")[:, :, :3]
    for row in frequency.to_dicts():
        t_index = [900, 700, 500, 300, 100].index(row["timestep"])
        assert row["frequency"] == pytest.approx((top3[:, t_index] == row["channel"]).any(axis=1).mean())
