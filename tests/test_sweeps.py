"""Dream hyperparameter sweeps on the tiny model: grid, validation, the comparison table, resume, the asset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from ddr_core.config import ProjectConfig
from ddr_core.paths import DataLayout
from ddr_core.sweeps import (
    MEASURED_COLUMNS,
    SweepConfig,
    SweepSettingsMismatch,
    contact_sheet_path,
    expand_grid,
    run_sweep,
    sweep_dir,
)
from tests.markdown_check import rendered_text

BASE = {"num_steps": 3, "use_prior": False, "n_results": 1, "seeds": [7], "timesteps": [0, "activity_peaks"],
        "snapshot_every": 0, "quality_noise_draws": 1, "batch_size": 8}
GRID = {"learning_rate": [0.01, 0.2]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_stats(stats_dir: Path) -> None:
    """Hand-made timestep statistics: channel 0 peaks at 700, channel 2 at 41 (as in test_dreams)."""
    stats_dir.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({
        "channel": [0, 2], "peak_rank": [0, 0], "timestep": [700, 41], "height": [0.5, 0.3],
        "plateau_start": [700, 41], "plateau_end": [700, 41], "observed_timestep": [701, 41],
    }, schema_overrides={"channel": pl.Int32, "peak_rank": pl.Int32, "timestep": pl.Int32}).write_parquet(
        stats_dir / "activity_peaks.parquet")
    pl.DataFrame({"channel": [0], "timestep": [5], "frequency": [0.1]}).write_parquet(
        stats_dir / "active_timesteps.parquet")
    pl.DataFrame({
        "channel": [0, 0, 2], "timestep": [701, 1, 41], "rank": [0, 0, 0], "generation_id": [1, 2, 3],
        "activation": [2.0, 4.0, 0.5], "prompt": ["p"] * 3, "image_path": ["x.png"] * 3,
    }).write_parquet(stats_dir / "dataset_examples.parquet")


def _project() -> ProjectConfig:
    return ProjectConfig.model_validate({
        "models": {"tiny": {"source": {"builtin": "tiny"}}},
        "prompt_datasets": {"tiny-prompts": {"source": {"builtin": "tiny-prompts"}}},
        "variants": {"tiny-raw": {"model": "tiny", "basis": "raw", "prompts": "tiny-prompts", "width": 64}},
    })


@pytest.fixture(scope="module")
def data_layout(tiny_model_dir, tmp_path_factory) -> DataLayout:
    layout = DataLayout(tmp_path_factory.mktemp("sweep_data"))
    shutil.copytree(tiny_model_dir, layout.model_dir("tiny"))
    _write_stats(layout.timestep_stats_dir("tiny-raw"))
    return layout


@pytest.fixture(scope="module")
def sweep(data_layout):
    config = SweepConfig(variant="tiny-raw", channels=[0, 2], grid=GRID, base=BASE, name="lr")
    messages: list[str] = []
    result = run_sweep(_project(), data_layout, config, "cpu", log=messages.append)
    return config, result, messages


# --- grid and validation --------------------------------------------------------------------------


def test_expand_grid_is_the_cartesian_product_in_stable_order():
    grid = {"learning_rate": [0.1, 0.2], "total_variation_weight": [0.0, 0.5, 1.0]}
    settings = expand_grid(grid)
    assert len(settings) == 6
    assert settings[0] == {"learning_rate": 0.1, "total_variation_weight": 0.0}
    assert settings[1] == {"learning_rate": 0.1, "total_variation_weight": 0.5}
    assert settings[3] == {"learning_rate": 0.2, "total_variation_weight": 0.0}
    assert expand_grid(grid) == settings
    assert expand_grid({}) == [{}]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": {"learning_rte": [0.1]}}, "'learning_rte' is not a DreamConfig field; known fields: "),
        ({"grid": {"learning_rate": []}}, "needs a non-empty list"),
        ({"grid": {}}, "grid"),
        ({"channels": []}, "channels"),
        ({"channels": [1, 1]}, "distinct"),
        ({"name": "../up"}, "safe folder name"),
        ({"base": {"tv": 1}}, "not DreamConfig fields"),
        ({"grid": {"learning_rate": [0.1, 0.0]}}, "setting 1"),
        ({"base": {"learning_rate": 0.1}}, "appear in both grid and base"),
        ({"extra": 1}, "extra"),
    ],
)
def test_config_validation_names_the_problem(kwargs, message):
    values = {"variant": "tiny-raw", "channels": [0], "grid": GRID, **kwargs}
    with pytest.raises(ValidationError) as error:
        SweepConfig(**values)
    assert message in str(error.value)
    if "known fields" in message:
        assert "learning_rate" in str(error.value) and "total_variation_weight" in str(error.value)


def test_settings_apply_overrides_base_then_grid():
    config = SweepConfig(variant="v", channels=[0], grid={"total_variation_weight": [0.0, 1.0]},
                         base={"num_steps": 7})
    settings = config.settings({"num_steps": 99, "range_penalty_weight": 0.25})
    assert [s.total_variation_weight for s in settings] == [0.0, 1.0]
    assert all(s.num_steps == 7 and s.range_penalty_weight == 0.25 for s in settings)


# --- the sweep end to end -------------------------------------------------------------------------


def test_sweep_writes_the_comparison_table(sweep, data_layout):
    _, result, _ = sweep
    root = sweep_dir(data_layout, "lr", "tiny-raw")
    assert result.root == root and result.settings_run == [0, 1] and result.settings_skipped == []
    table = pl.read_parquet(root / "comparison.parquet")
    assert table.columns == ["setting", "learning_rate", "channel", "timestep", "seed", *MEASURED_COLUMNS]
    # channel 0: timesteps 0 and 700; channel 2: 0 and 41; one seed; two settings
    assert table.height == 2 * (2 + 2)
    assert sorted(set(table.select("channel", "timestep").iter_rows())) == [(0, 0), (0, 700), (2, 0), (2, 41)]
    assert table.filter(pl.col("setting") == 1)["learning_rate"].unique().to_list() == [0.2]
    assert table["seed"].unique().to_list() == [7] and table["steps_run"].unique().to_list() == [3]
    assert table["final_activation"].null_count() == 0 and table["dream_activation"].null_count() == 0
    assert not table["failed"].any()
    row = table.filter((pl.col("channel") == 0) & (pl.col("timestep") == 700) & (pl.col("setting") == 0)).row(
        0, named=True)
    assert row["top_example_activation"] == 2.0
    assert row["ratio"] == pytest.approx(row["dream_activation"] / 2.0)
    # the final stats are the last row of the setting's stats.parquet
    stats = pl.read_parquet(root / "setting_000" / "channel_00000" / "t_0700" / "stats.parquet")
    last = stats.filter(pl.col("step") == 2).row(0, named=True)
    assert row["final_activation"] == last["activation"] and row["final_tv"] == last["tv"]
    assert row["final_loss"] == last["loss"]
    # a larger learning rate moves the latent further: the settings really differ
    first, second = (torch.tensor(table.filter(pl.col("setting") == s)["final_tv"].to_list()) for s in (0, 1))
    assert not torch.allclose(first, second)


def test_settings_file_and_duckdb(sweep, data_layout):
    _, result, _ = sweep
    root = result.root
    settings = json.loads((root / "settings.json").read_text())
    assert settings["swept"] == ["learning_rate"] and len(settings["settings"]) == 2
    assert settings["settings"][1]["params"] == {"learning_rate": 0.2}
    assert settings["settings"][1]["config"]["num_steps"] == 3
    con = duckdb.connect(str(result.database_path), read_only=True)
    try:
        rows = con.execute("select setting, count(*), avg(ratio) from comparison group by setting "
                           "order by setting").fetchall()
        assert [r[:2] for r in rows] == [(0, 4), (1, 4)]
        labels = con.execute("select setting, learning_rate, label from settings order by setting").fetchall()
        assert labels == [(0, 0.01, "learning_rate=0.01"), (1, 0.2, "learning_rate=0.2")]
        joined = con.execute("select count(*) from comparison join settings using (setting)").fetchone()[0]
        assert joined == 8
    finally:
        con.close()
    summary = result.summary()
    assert summary.height == 2 and set(summary["setting"].to_list()) == {0, 1}
    assert summary["mean_ratio"].to_list() == sorted(summary["mean_ratio"].to_list(), reverse=True)


def test_contact_sheets_have_a_row_per_setting(sweep):
    config, result, _ = sweep
    assert set(result.contact_sheets) == {0, 2}
    cell = config.sheet_cell_size
    for channel in (0, 2):
        path = contact_sheet_path(result.root, channel)
        with Image.open(path) as sheet:
            assert sheet.size == (max(int(cell * 1.5), 220) + 2 * cell, 28 + 2 * cell)
            # the first image cell holds a dream, not the grey placeholder
            pixels = sheet.convert("RGB").crop((max(int(cell * 1.5), 220), 28, max(int(cell * 1.5), 220) + cell,
                                                28 + cell // 2))
            assert len(set(pixels.getdata())) > 4


def test_dreams_folder_is_untouched_and_rerun_resumes(sweep, data_layout):
    config, result, _ = sweep
    assert not (data_layout.outputs_dir / "dreams").exists()
    channel_files = sorted(result.root.glob("setting_*/channel_*/**/*"))
    before = {p: p.stat().st_mtime_ns for p in channel_files}
    messages: list[str] = []
    again = run_sweep(_project(), data_layout, config, "cpu", log=messages.append)
    assert again.settings_run == [] and again.settings_skipped == [0, 1] and again.element_steps == 0
    assert {p: p.stat().st_mtime_ns for p in channel_files} == before
    assert sum("already done" in m for m in messages) == 2
    assert again.comparison.equals(result.comparison)


def test_other_settings_under_the_same_name_are_refused(sweep, data_layout):
    config, _, _ = sweep
    other = config.model_copy(update={"grid": {"learning_rate": [0.03]}})
    with pytest.raises(SweepSettingsMismatch, match="give this sweep another name"):
        run_sweep(_project(), data_layout, other, "cpu")
    with pytest.raises(ValueError, match="outside variant"):
        run_sweep(_project(), data_layout, config.model_copy(update={"channels": [64]}), "cpu")


# --- the asset ------------------------------------------------------------------------------------


def test_dream_sweeps_asset(tiny_model_dir, tmp_path):
    from ddr_assets import ALL_ASSETS
    from ddr_core.records import make_record, write_record
    from ddr_resources.resources import ComputeResource, DdrStorage

    storage = DdrStorage(data_root=str(tmp_path))
    layout = storage.layout
    shutil.copytree(tiny_model_dir, layout.model_dir("tiny"))
    _write_stats(layout.timestep_stats_dir("tiny-raw"))
    asset = next(a for a in ALL_ASSETS if a.key == dg.AssetKey("dream_sweeps"))
    run_config = {"variant": "tiny-raw", "channels": [2], "name": "tv",
                  "grid": {"total_variation_weight": [0.0, 1.0]}, "base": {**BASE, "timesteps": ["activity_peaks"]}}

    def materialize():
        return dg.materialize([asset], resources={"storage": storage, "compute": ComputeResource(device="cpu")},
                              run_config={"ops": {"dream_sweeps": {"config": run_config}}}, raise_on_error=False)

    missing = materialize()
    assert not missing.success
    failure = next(e for e in missing.all_events if e.event_type_value == "STEP_FAILURE")
    assert "materialize timestep_stats[tiny-raw] first" in str(failure.event_specific_data.error)

    write_record(layout.records_dir, make_record("timestep_stats", "tiny-raw", "1", {}, {}, data_version="abc"))
    result = materialize()
    assert result.success
    metadata = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}
    assert metadata["settings"] == 2 and metadata["settings_run"] == 2
    assert "total_variation_weight=0.0" in rendered_text(metadata["summary"])
    assert "data:image/png;base64" in metadata["contact_sheets"]
    root = sweep_dir(layout, "tv", "tiny-raw")
    assert pl.read_parquet(root / "comparison.parquet").height == 2  # channel 2 at its one peak, 2 settings
    assert (layout.records_dir / "dream_sweeps" / "tiny-raw:tv.json").is_file()
