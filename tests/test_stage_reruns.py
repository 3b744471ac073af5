"""Re-runs of heatmaps, dose_response and cfg_contrast through Dagster on the tiny model's graph (issue 18): a
re-run (or a retry after preemption) with unchanged inputs regenerates nothing; a changed setting or a changed
upstream data version redoes the work. Each run's asset check is evaluated and passes on the stage's output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ddr_core.paths import DataLayout
from ddr_core.records import read_record, write_record
from tests.tiny_graph import materialize, metadata, step_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def root(tiny_graph, tmp_path) -> Path:
    """A copy of the tiny graph's data root (these tests rewrite records), without the heatmaps and dose-response
    grids other tests of the session may have made in it (a first run here starts from nothing)."""
    source, _, _ = tiny_graph
    shutil.copytree(source, tmp_path / "root")
    layout = DataLayout(tmp_path / "root", "default")
    for stage in ("heatmaps", "dose_response"):
        shutil.rmtree(layout.stage_dir(stage, "tiny-raw"), ignore_errors=True)
    return tmp_path / "root"


def _run(name: str, key: str, root: Path, config: dict | None = None) -> tuple[dict, object]:
    import dagster as dg

    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize(name, key, root, instance, config)
        assert result.success, step_error(result)
        checks = result.get_asset_check_evaluations()
        assert len(checks) == 1 and checks[0].passed, checks and checks[0].description
        return metadata(result, name), checks[0]


def _new_upstream_version(layout: DataLayout, asset: str, partition: str) -> None:
    """As if ``asset[partition]`` had been re-materialized with other data."""
    record = read_record(layout.records_dir, asset, partition)
    write_record(layout.records_dir, {**record, "data_version": record["data_version"] + "-changed"})


def _mtimes(folder: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob(pattern)}


def test_heatmaps_rerun_regenerates_nothing_and_changed_inputs_redo_it(root, monkeypatch):
    import ddr_core.regenerate as regenerate

    calls = []
    real = regenerate.regenerate_positions

    def counting(*args, **kwargs):
        calls.append(len(args[1]))  # the generations regenerated
        return real(*args, **kwargs)

    monkeypatch.setattr(regenerate, "regenerate_positions", counting)
    layout = DataLayout(root, "default")
    folder = layout.stage_dir("heatmaps", "tiny-raw")
    config = {"channels": [0, 3], "examples_per_channel": 2, "frame_size": 32}
    first, _ = _run("heatmaps", "tiny-raw:0-15", root, config)
    assert first["channels_done"] >= 1 and len(calls) == 1
    written = _mtimes(folder, "g*.png")
    assert len(written) == 2 * first["examples"]

    calls.clear()
    again, _ = _run("heatmaps", "tiny-raw:0-15", root, config)
    assert calls == [] and again["channels_done"] == 0 and again["channels_resumed"] == first["channels_done"]
    assert _mtimes(folder, "g*.png") == written  # not one image rewritten

    calls.clear()
    bigger, _ = _run("heatmaps", "tiny-raw:0-15", root, {**config, "frame_size": 48})  # a changed setting
    assert len(calls) == 1 and bigger["channels_done"] == first["channels_done"] and bigger["channels_resumed"] == 0
    redrawn = _mtimes(folder, "g*.png")
    assert set(redrawn) == set(written) and all(redrawn[p] != written[p] for p in written)

    calls.clear()
    _new_upstream_version(layout, "timestep_stats", "tiny-raw")  # other statistics: other top examples, maybe
    changed, _ = _run("heatmaps", "tiny-raw:0-15", root, {**config, "frame_size": 48})
    assert len(calls) == 1 and changed["channels_done"] == first["channels_done"]


def test_dose_response_rerun_generates_nothing_and_changed_statistics_redo_it(root):
    layout = DataLayout(root, "default")
    folder = layout.stage_dir("dose_response", "tiny-raw")
    config = {"channels": [0, 1], "seeds": [11, 12], "strength_multiples": [1.0], "num_inference_steps": 8,
              "window_half_width": 150}
    first, check = _run("dose_response", "tiny-raw:0-15", root, config)
    assert first["channels_done"] >= 1 and first["generations"] == 8 * first["channels_done"]
    written = _mtimes(folder, "channel_*/*.png")
    again, _ = _run("dose_response", "tiny-raw:0-15", root, config)
    assert again["channels_done"] == 0 and again["generations"] == 0
    assert again["channels_resumed"] == first["channels_done"] and _mtimes(folder, "channel_*/*.png") == written
    _new_upstream_version(layout, "timestep_stats", "tiny-raw")
    changed, _ = _run("dose_response", "tiny-raw:0-15", root, config)
    assert changed["channels_done"] == first["channels_done"] and changed["channels_resumed"] == 0
    # newer statistics again, one channel redone: the other, made from the older ones, is not pooled with it
    done = json.loads((folder / "summary.json").read_text())["channels"]
    _new_upstream_version(layout, "timestep_stats", "tiny-raw")
    _run("dose_response", "tiny-raw:0-15", root, {**config, "channels": done[:1]})
    pooled = json.loads((folder / "summary.json").read_text())
    assert pooled["channels"] == done[:1] and pooled["stale_channels"] == done[1:]


def test_cfg_contrast_rerun_computes_nothing_and_changed_inputs_redo_it(root):
    from ddr_core.cfg_contrast import CHANNELS_FILE

    layout = DataLayout(root, "default")
    table = layout.stage_dir("cfg_contrast", "tiny-raw") / CHANNELS_FILE
    _run("cfg_contrast", "tiny-raw", root)  # whatever the session's other tests left: now the default settings
    kept = table.stat().st_mtime_ns
    first, _ = _run("cfg_contrast", "tiny-raw", root)
    assert first["reused"] is True and table.stat().st_mtime_ns == kept
    changed_setting, _ = _run("cfg_contrast", "tiny-raw", root, {"alpha": 0.1})
    assert changed_setting["reused"] is False and table.stat().st_mtime_ns != kept
    again, _ = _run("cfg_contrast", "tiny-raw", root, {"alpha": 0.1})
    assert again["reused"] is True
    _new_upstream_version(layout, "activations", "tiny")  # another capture
    changed_capture, _ = _run("cfg_contrast", "tiny-raw", root, {"alpha": 0.1})
    assert changed_capture["reused"] is False
