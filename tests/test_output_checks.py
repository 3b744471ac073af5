"""The asset checks of heatmaps, dose_response and cfg_contrast (issue 18): each passes on whole, coherent output
written by the stage's own writer and fails, naming what is wrong, on output broken one way at a time."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ddr_assets.output_checks import (
    CFG_CONTRAST_CHECK,
    DOSE_RESPONSE_CHECK,
    HEATMAPS_CHECK,
    cfg_contrast_check,
    combine_checks,
    dose_response_check,
    heatmaps_check,
)
from ddr_core.paths import DataLayout

VARIANT = "toy-raw"


# --- heatmaps -----------------------------------------------------------------------------------------------------
@pytest.fixture()
def heat(tmp_path):
    from ddr_core.heatmaps import read_heatmaps
    from tests.heatmap_data import write_heatmaps

    layout = DataLayout(tmp_path, "default")
    out = write_heatmaps(layout, VARIANT, 3)
    table, _ = read_heatmaps(out)
    return layout, table


def test_heatmaps_check_passes_on_the_writers_output(heat):
    layout, table = heat
    check = heatmaps_check(table, [3, 5], [5], layout.data_root)  # 5: no dataset examples, the stated reason
    assert check.passed and check.check_name == HEATMAPS_CHECK, check.description
    assert check.metadata["scored_examples"].value == 2


def test_heatmaps_check_fails_on_a_channel_without_overlay_or_reason(heat):
    layout, table = heat
    check = heatmaps_check(table, [3, 5], [], layout.data_root)
    assert not check.passed and "channel(s) 5 have no heatmap and no stated reason" in check.description


def test_heatmaps_check_fails_on_a_missing_overlay_image(heat):
    layout, table = heat
    (layout.data_root / table["peak_image"][0]).unlink()
    check = heatmaps_check(table, [3], [], layout.data_root)
    assert not check.passed and "overlay image(s) missing for channel/example 3/g7" in check.description


@pytest.mark.parametrize("column, value", [("heat_on_shape", 1.5), ("chance", -0.1), ("heat_on_shape", float("nan")),
                                           ("ideal_detector", float("inf"))])
def test_heatmaps_check_fails_on_a_score_outside_the_unit_interval(heat, column, value):
    layout, table = heat
    broken = table.with_columns(pl.when(pl.col("generation_id") == 9).then(pl.lit(value))
                                .otherwise(pl.col(column)).alias(column))
    check = heatmaps_check(broken, [3], [], layout.data_root)
    assert not check.passed and f"3/g9 {column}=" in check.description


def test_heatmaps_check_fails_on_an_unscored_example_without_a_reason(heat):
    layout, table = heat
    broken = table.with_columns(pl.lit("who knows").alias("mask_source"))
    check = heatmaps_check(broken, [3], [], layout.data_root)
    assert not check.passed and "mask_source who knows" in check.description


# --- dose_response ------------------------------------------------------------------------------------------------
@pytest.fixture()
def dose(tmp_path):
    from ddr_core.dose_response import read_dose_response, read_grid
    from tests.dose_data import write_dose_grid

    layout = DataLayout(tmp_path, "default")
    for channel in (0, 1):
        write_dose_grid(layout, VARIANT, channel)
    out = layout.stage_dir("dose_response", VARIANT)
    return layout, read_grid(out), read_dose_response(out)[0]


def _dose_check(layout, grid, effects, skipped=None):
    return dose_response_check(grid, [0, 1, 2], skipped if skipped is not None else {2: "no activity peak"},
                               [1, 2], [1.0, 2.0], effects, layout.data_root)


def test_dose_check_passes_on_the_written_grid(dose):
    layout, grid, effects = dose
    assert effects.height and effects["low"].is_not_nan().all()  # two channels: real intervals
    check = _dose_check(layout, grid, effects)
    assert check.passed and check.check_name == DOSE_RESPONSE_CHECK, check.description


def test_dose_check_fails_on_an_incomplete_grid(dose):
    layout, grid, effects = dose
    broken = grid.filter(~((pl.col("channel") == 1) & (pl.col("window") == "outside") & (pl.col("seed") == 2)))
    check = _dose_check(layout, broken, effects)
    assert not check.passed and "grid incomplete for channel(s) 1 (12 of 14 cells)" in check.description
    unexplained = _dose_check(layout, grid, effects, skipped={})  # channel 2: neither done nor skipped
    assert not unexplained.passed and "2 (0 of 14 cells)" in unexplained.description


@pytest.mark.parametrize("value", [None, float("nan")])
def test_dose_check_fails_without_the_remeasured_activation(dose, value):
    layout, grid, effects = dose
    broken = grid.with_columns(pl.when(pl.col("channel") == 0).then(pl.lit(value, dtype=pl.Float64))
                               .otherwise(pl.col("activation")).alias("activation"))
    check = _dose_check(layout, broken, effects)
    assert not check.passed and "re-measured activation missing or not finite in channel(s) 0" in check.description


def test_dose_check_fails_on_a_missing_image(dose):
    layout, grid, effects = dose
    (layout.data_root / grid["image"][0]).unlink()
    check = _dose_check(layout, grid, effects)
    assert not check.passed and "generation image(s) missing: 0/nonex0/seed1" in check.description


def test_dose_check_fails_on_a_disordered_interval(dose):
    layout, grid, effects = dose
    swapped = effects.with_columns((pl.col("value") + 0.1).alias("low"), (pl.col("value") - 0.1).alias("high"))
    check = _dose_check(layout, grid, swapped)
    assert not check.passed and "not ordered low <= value <= high" in check.description
    outside = effects.with_columns((pl.col("high") + 1.0).alias("value"))
    assert not _dose_check(layout, grid, outside).passed


def test_combined_checks_fail_when_one_variant_fails(dose):
    layout, grid, effects = dose
    good, bad = _dose_check(layout, grid, effects), _dose_check(layout, grid.head(3), effects)
    both = combine_checks(DOSE_RESPONSE_CHECK, [good, bad])
    assert not both.passed and both.description == bad.description
    assert combine_checks(DOSE_RESPONSE_CHECK, [good, good]).passed


# --- cfg_contrast -------------------------------------------------------------------------------------------------
@pytest.fixture()
def contrast(tmp_path):
    from ddr_core.cfg_contrast import CHANNELS_FILE, CfgContrastConfig, compute_cfg_contrast
    from tests.test_cfg_contrast import halves, make_store

    cond, uncond = halves()
    summary = compute_cfg_contrast(make_store(tmp_path / "store", cond, uncond, 4), "raw", tmp_path / "out",
                                   CfgContrastConfig())
    table = pl.read_parquet(tmp_path / "out" / CHANNELS_FILE)
    assert set(table["verdict"].to_list()) == {"text-driven", "no evidence", "text-suppressed"}
    return table, summary.alpha


def test_cfg_check_passes_on_the_stage_output(contrast):
    table, alpha = contrast
    check = cfg_contrast_check(table, alpha, 2)
    assert check.passed and check.check_name == CFG_CONTRAST_CHECK, check.description
    assert cfg_contrast_check(None, alpha, 1).passed  # one half: nothing to compare, said so


def test_cfg_check_fails_on_a_q_value_outside_the_unit_interval(contrast):
    table, alpha = contrast
    broken = table.with_columns(pl.when(pl.col("channel") == 1).then(1.5).otherwise(pl.col("q_value")).alias("q_value"))
    check = cfg_contrast_check(broken, alpha, 2)
    assert not check.passed and "q-value(s) outside [0, 1] for channel(s) 1" in check.description


@pytest.mark.parametrize("channel, verdict", [(0, "no evidence"), (0, "text-suppressed"), (1, "text-driven")])
def test_cfg_check_fails_on_a_verdict_its_q_and_sign_do_not_give(contrast, channel, verdict):
    table, alpha = contrast
    broken = table.with_columns(pl.when(pl.col("channel") == channel).then(pl.lit(verdict))
                                .otherwise(pl.col("verdict")).alias("verdict"))
    check = cfg_contrast_check(broken, alpha, 2)
    assert not check.passed and f"channel(s) {channel} ({verdict}" in check.description


def test_cfg_check_fails_on_a_disordered_interval_or_missing_table(contrast):
    table, alpha = contrast
    broken = table.with_columns(pl.col("ci_high").alias("ci_low"), pl.col("ci_low").alias("ci_high"))
    assert "interval not ordered" in cfg_contrast_check(broken, alpha, 2).description
    assert not cfg_contrast_check(None, alpha, 2).passed
    nan_q = table.with_columns(pl.lit(np.nan).alias("q_value"), pl.lit("no evidence").alias("verdict"))
    assert cfg_contrast_check(nan_q, alpha, 2).passed  # one prompt: no test, no verdict (what the stage writes)
