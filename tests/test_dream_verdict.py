"""Dreams that cannot or did not raise their channel (issue 14 item 3): timesteps without signal are skipped and
reported; a dream is shown as a dream only when raised above its start's noise (one definition,
:func:`ddr_core.dream_verdict.with_raised`), everywhere: quality table, shards, index, HTML export, asset check,
visual benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch

from ddr_core.dream_verdict import unshown_dream_lines, verdict_text, with_raised
from ddr_core.dreams import DreamConfig, run_dreams, split_by_signal
from ddr_core.families.sd import unet_signal_fraction
from ddr_core.tiny_model import TINY_TARGET_LAYER

FAST = {"num_steps": 2, "snapshot_every": 0, "batch_size": 4}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- signal fraction and skipped timesteps ---------------------------------------------------------


def test_signal_fraction_of_a_synthetic_schedule_is_sqrt_alpha_bar():
    scheduler = SimpleNamespace(alphas_cumprod=torch.tensor([1.0, 0.25, 0.0025, 0.0]))
    signal = unet_signal_fraction(scheduler, [0, 1, 2, 3])
    assert signal.dtype == torch.float64
    assert signal.tolist() == pytest.approx([1.0, 0.5, 0.05, 0.0])
    with pytest.raises(ValueError, match=r"outside the scheduler's 0..3"):
        unet_signal_fraction(scheduler, [4])
    with pytest.raises(ValueError, match="has no alphas_cumprod"):
        unet_signal_fraction(SimpleNamespace(), [0])


def test_the_toy_world_s_zero_terminal_snr_schedule_loses_its_signal_at_the_end():
    """The toy model's scheduler config: sqrt(alpha_bar) is 0 at 999 and 0.019 at 959 (below the default
    min_signal 0.025: skipped), 0.042 at 919 (kept)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              rescale_betas_zero_snr=True, prediction_type="v_prediction",
                              timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    signal = unet_signal_fraction(scheduler, [0, 919, 959, 979, 999]).tolist()
    assert signal == pytest.approx([0.99957, 0.04225, 0.01937, 0.00926, 0.0], abs=2e-5)
    model = SimpleNamespace(signal_fraction=lambda t: unet_signal_fraction(scheduler, t))
    kept, skipped = split_by_signal(model, [0, 919, 959, 979, 999], DreamConfig())
    assert kept == [0, 919] and [s["timestep"] for s in skipped] == [959, 979, 999]
    assert skipped[0]["signal"] == pytest.approx(0.01937, abs=2e-5)
    assert "no signal at t=959" in skipped[0]["reason"] and "min_signal 0.025" in skipped[0]["reason"]


def test_split_by_signal_keeps_everything_without_schedule_noise_or_threshold():
    model = SimpleNamespace(signal_fraction=lambda t: torch.tensor([1.0, 0.5, 0.05, 0.0], dtype=torch.float64))
    config = DreamConfig(min_signal=0.06)
    kept, skipped = split_by_signal(model, [0, 1, 2, 3], config)
    assert kept == [0, 1] and [(s["timestep"], s["signal"]) for s in skipped] == [(2, 0.05), (3, 0.0)]
    no_noise = config.model_copy(update={"see_through_schedule_noise": False})
    assert split_by_signal(model, [0, 1, 2, 3], no_noise) == ([0, 1, 2, 3], [])
    assert split_by_signal(model, [0, 1, 2, 3], config.model_copy(update={"min_signal": 0.0})) == ([0, 1, 2, 3], [])


def test_the_families_signal_fraction_is_the_clean_share_of_add_noise(tiny_pipe):
    from ddr_core.families import as_model

    model = as_model(tiny_pipe)
    timesteps = torch.tensor([0, 500, 999])
    clean = torch.ones(3, 4, 2, 2)
    noised = model.add_noise(clean, torch.zeros_like(clean), timesteps)
    assert noised[:, 0, 0, 0].double().tolist() == pytest.approx(model.signal_fraction(timesteps).tolist(), rel=1e-5)


def test_skipped_timesteps_are_reported_in_dream_json_and_the_run_result(tiny_pipe, tmp_path):
    from ddr_core.families import as_model

    signal = as_model(tiny_pipe).signal_fraction([0, 999]).tolist()
    assert signal[1] < 0.5 < signal[0]
    config = DreamConfig(timesteps=[0, 999], use_prior=False, n_results=1, min_signal=0.5, **FAST)
    result = run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, None, None, [3], tmp_path / "out", config)
    dream = json.loads((tmp_path / "out" / "channel_00003" / "dream.json").read_text())
    assert dream["timesteps"] == [0] and list(dream["results"]) == ["0"]
    assert [(s["timestep"], s["signal"]) for s in dream["skipped_timesteps"]] == [(999, round(signal[1], 6))]
    assert result.skipped_timesteps == {3: dream["skipped_timesteps"]}
    assert not (tmp_path / "out" / "channel_00003" / "t_0999").exists()

    # every timestep without signal: the channel is recorded done, with the reason and the skipped timesteps
    only_late = config.model_copy(update={"timesteps": [999]})
    result = run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, None, None, [4], tmp_path / "out", only_late)
    dream = json.loads((tmp_path / "out" / "channel_00004" / "dream.json").read_text())
    assert result.channels_without_timesteps == [4] and dream["timesteps"] == []
    assert "no timestep with signal" in dream["skipped"] and dream["skipped_timesteps"][0]["timestep"] == 999
    from ddr_core.visual_benchmark import METHODS, method_images, skipped_dream_timesteps

    _, problems, _ = method_images(METHODS[1], tmp_path / "out", [4])  # the benchmark's coverage reason
    assert problems[4].startswith("no dream: no timestep with signal")
    assert skipped_dream_timesteps(tmp_path / "out", [3, 4]) == [(3, 999), (4, 999)]


# --- the raised verdict --------------------------------------------------------------------------


def _quality(rows: list[dict]) -> pl.DataFrame:
    base = {"top_example_activation": None, "example_timestep": None, "ratio": None, "failed": False}
    return pl.DataFrame([{**base, **row} for row in rows], schema_overrides={
        "channel": pl.Int32, "timestep": pl.Int32, "seed": pl.Int64, "dream_activation": pl.Float64,
        "prior_activation": pl.Float64, "top_example_activation": pl.Float64, "example_timestep": pl.Int32,
        "ratio": pl.Float64, "failed": pl.Boolean})


def test_raised_is_a_gain_above_the_seed_to_seed_noise_of_the_start():
    """Seeds start at [1.0, 2.0]: sd (n-1) = 0.7071. Gains 0.8 (raised) and 0.5 (not raised)."""
    table = with_raised(_quality([
        {"channel": 0, "timestep": 10, "seed": 1, "prior_activation": 1.0, "dream_activation": 1.8},
        {"channel": 0, "timestep": 10, "seed": 2, "prior_activation": 2.0, "dream_activation": 2.5},
    ]))
    assert table["noise_sd"].to_list() == pytest.approx([math.sqrt(0.5)] * 2)
    assert table["gain"].to_list() == pytest.approx([0.8, 0.5])
    assert table["raised"].to_list() == [True, False] and table["noise_samples"].to_list() == [2, 2]
    assert verdict_text(table.row(1, named=True)) == "not raised (gain 0.5 vs noise 0.707)"


def test_the_noise_pools_seeds_and_schedule_noise_draws():
    """Same starts [1.0, 2.0], each the mean of 4 draws with draw sd 1.0: the 8 single looks have the pooled
    variance (3 * 1 + 3 * 1 + 4 * 0.25 + 4 * 0.25) / 7 = 8/7, sd 1.069: a gain of 0.8 is no longer raised."""
    table = with_raised(_quality([
        {"channel": 0, "timestep": 10, "seed": 1, "prior_activation": 1.0, "dream_activation": 1.8,
         "prior_draw_sd": 1.0, "noise_draws": 4},
        {"channel": 0, "timestep": 10, "seed": 2, "prior_activation": 2.0, "dream_activation": 3.2,
         "prior_draw_sd": 1.0, "noise_draws": 4},
    ]))
    assert table["noise_sd"].to_list() == pytest.approx([math.sqrt(8 / 7)] * 2)
    assert table["noise_samples"].to_list() == [8, 8]
    assert table["raised"].to_list() == [False, True]


def test_no_gain_failed_and_single_seed_cases():
    table = with_raised(_quality([
        # an SAE feature at exactly 0 that stays there (ReLU: no gradient): noise 0, gain 0: not raised
        {"channel": 0, "timestep": 999, "seed": 1, "prior_activation": 0.0, "dream_activation": 0.0},
        {"channel": 0, "timestep": 999, "seed": 2, "prior_activation": 0.0, "dream_activation": 0.0},
        # failed: never raised, whatever its numbers
        {"channel": 1, "timestep": 5, "seed": 1, "prior_activation": 0.0, "dream_activation": 9.0, "failed": True},
        {"channel": 1, "timestep": 5, "seed": 2, "prior_activation": 1.0, "dream_activation": 9.0},
        # one seed: the table's median noise (of 0.0 and 0.7071: 0.3536)
        {"channel": 2, "timestep": 5, "seed": 1, "prior_activation": 1.0, "dream_activation": 1.3},
        {"channel": 3, "timestep": 5, "seed": 1, "prior_activation": 1.0, "dream_activation": None},
    ]))
    assert table["raised"].to_list() == [False, False, False, True, False, False]
    assert table["noise_sd"].to_list()[4] == pytest.approx(math.sqrt(0.5) / 2)
    assert verdict_text(table.row(2, named=True)) == "failed"
    assert verdict_text(table.row(5, named=True)) == "not measured"


def test_the_visual_benchmark_uses_the_same_verdict():
    from ddr_core.visual_benchmark import mark_raised

    quality = _quality([
        {"channel": 0, "timestep": 10, "seed": 1, "prior_activation": 1.0, "dream_activation": 1.8,
         "prior_draw_sd": 1.0, "noise_draws": 4},
        {"channel": 0, "timestep": 10, "seed": 2, "prior_activation": 2.0, "dream_activation": 3.2,
         "prior_draw_sd": 1.0, "noise_draws": 4},
    ])
    images = pl.DataFrame({"channel": [0, 0], "timestep": [10, 10], "seed": [1, 2], "image": ["a", "b"]},
                          schema={"channel": pl.Int32, "timestep": pl.Int64, "seed": pl.Int64, "image": pl.String})
    marked = mark_raised(images, quality, 1.0)
    assert marked["raised"].to_list() == with_raised(quality)["raised"].to_list() == [False, True]
    assert marked["noise_sd"].to_list() == pytest.approx([math.sqrt(8 / 7)] * 2)


def test_the_asset_check_fails_on_a_variant_where_most_dreams_are_not_raised():
    from ddr_assets.dreams import quality_check

    rows = []
    for variant, finals in (("good", [3.0, 5.0, 5.0, 6.0]), ("bad", [1.01, 2.0, 1.5, 5.0])):
        for seed, final in enumerate(finals):  # starts 1.0 and 3.0 alternate: noise sd 1.155
            rows.append({"channel": 0, "timestep": 10, "seed": seed, "prior_activation": [1.0, 3.0][seed % 2],
                         "dream_activation": final, "variant": variant})
    check = quality_check(_quality(rows).with_columns(pl.col("variant").cast(pl.String)))
    assert not check.passed
    assert "only 25% of dreams raised the activation above their start's noise in bad (1 of 4" in check.description
    assert " good " not in check.description
    assert check.metadata["raised_share_by_variant"].value == {"good": 1.0, "bad": 0.25}
    assert check.metadata["not_raised_dreams"].value == 3


# --- never shown as a dream ----------------------------------------------------------------------


def _unraise_one_and_skip_one(layout) -> str:
    """In the toy data root: make the noise run's dream (501, seed 11) of channel 0 a no-op (gain 0.001) and
    record timestep 999 as skipped; returns the no-op's image path."""
    from tests.representation_data import VARIANT

    dreams = layout.stage_dir("dreams", VARIANT)
    path = dreams / "quality.parquet"
    quality = pl.read_parquet(path)
    quality = quality.with_columns(
        pl.when((pl.col("timestep") == 501) & (pl.col("seed") == 11)).then(pl.col("prior_activation") + 0.001)
        .otherwise(pl.col("dream_activation")).alias("dream_activation"))
    quality.write_parquet(path)
    record = dreams / "channel_00000" / "dream.json"
    dream = json.loads(record.read_text())
    dream["skipped_timesteps"] = [{"timestep": 999, "signal": 0.0, "reason": "no signal at t=999: <b>0</b>"}]
    record.write_text(json.dumps(dream))
    return dream["results"]["501"]["images"][0]


def test_a_not_raised_dream_is_never_a_dream_in_the_shard_index_or_html_export(tmp_path: Path):
    import ddr_core.representation as rep
    from ddr_core.html_export import export_html
    from tests.representation_data import VARIANT, make_toy_data_root

    toy = make_toy_data_root(tmp_path / "data")
    image = _unraise_one_and_skip_one(toy.layout)
    rep.build_shards(toy.layout, VARIANT)
    shard = rep.load_shard(toy.layout, VARIANT, 0)
    noise = shard["dreams"]["noise"]
    assert (501, 11) not in [(r["timestep"], r["seed"]) for r in noise["results"]]
    assert all(r["image"] != image for r in noise["results"])
    unshown = {(r["timestep"], r["seed"]): r for r in noise["not_raised"]}
    assert unshown[(501, 11)]["verdict"] == "not raised (gain 0.001 vs noise 0.00778)"
    assert unshown[(501, 11)]["gain"] == pytest.approx(0.001) and "image" not in unshown[(501, 11)]
    assert noise["skipped_timesteps"] == [{"timestep": 999, "signal": 0.0, "reason": "no signal at t=999: <b>0</b>"}]
    assert unshown_dream_lines(noise) == ["t=999: skipped: no signal at t=999: <b>0</b>",
                                          "t=501, seed 11: not raised (gain 0.001 vs noise 0.00778)",
                                          "t=0, seed 22: failed: non-finite loss"]
    from ddr_core.visual_benchmark import skipped_dream_timesteps

    assert skipped_dream_timesteps(toy.layout.stage_dir("dreams", VARIANT), [0, 1, 2]) == [(0, 999)]
    index = rep.make_index_table(toy.layout, VARIANT).row(0, named=True)
    assert index["n_dreams"] == 2 and index["n_not_raised_dreams"] == 2

    out = tmp_path / "html"
    export_html(toy.layout, VARIANT, out)
    page = (out / "channels" / "channel_00000.html").read_text()
    assert image not in page and "seed_11_step" not in page.split("with schedule noise")[1].split("without")[0]
    assert "t=501, seed 11: not raised (gain 0.001 vs noise 0.00778)" in page
    assert "t=999: skipped: no signal at t=999: &lt;b&gt;0&lt;/b&gt;" in page  # plain text, escaped
