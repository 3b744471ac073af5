"""Spatial heatmaps (issue 18 item 1) with known answers: a planted channel whose heat is known, the regenerated
per-position activations against the capture, the renderer's exact masks, the fitted-scene mask and the score."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from ddr_core.activation_store import ActivationStore
from ddr_core.activations import CaptureConfig, run_capture
from ddr_core.basis import RawChannels, TopKSaeBasis
from ddr_core.families import as_model
from ddr_core.heatmaps import (
    STAMP_FILE,
    HeatmapConfig,
    basis_unit_maps,
    fit_scene_mask,
    heat_share,
    peak_step,
    read_heatmaps,
    score_summary,
    upsample,
    write_channel_heatmaps,
    write_union,
)
from ddr_core.paths import DataLayout
from ddr_core.regenerate import read_generations, regenerate_positions
from ddr_core.sae import Sae, SaeConfig
from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER
from ddr_core.toy_world import BACKGROUND_RGB, render_scene, sample_scenes, shape_coverage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = list(TINY_PROMPTS[:2])
CAPTURE = {"num_images_per_prompt": 2, "batch_size": 4, "num_inference_steps": 5, "seed": 3}


@pytest.fixture(scope="module")
def capture(tiny_pipe, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("heat")
    root = data_root / "capture"
    result = run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, PROMPTS, root, data_root,
                         CaptureConfig(**CAPTURE))
    return data_root, root, result.summary


# --- the renderer's masks and the fitted scene --------------------------------------------------------------


def test_shape_coverage_is_the_mask_the_renderer_blends():
    for scene in sample_scenes(12, 5):
        coverage = shape_coverage(scene.shape, scene.radius, scene.center_x, scene.center_y, 32)
        background = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float64)
        again = background * (1 - coverage[..., None]) + np.asarray(scene.rgb, dtype=np.float64) * coverage[..., None]
        assert (np.round(again).astype(np.uint8) == render_scene(scene)).all()
        many = shape_coverage(scene.shape, scene.radius, np.array([scene.center_x, 9.0]),
                              np.array([scene.center_y, 9.0]), 32)
        assert many.shape == (2, 32, 32) and np.allclose(many[0], coverage)


def test_the_fitted_scene_recovers_a_renders_exact_mask():
    for scene in sample_scenes(9, 11):
        fit = fit_scene_mask(render_scene(scene), scene.prompt)
        truth = shape_coverage(scene.shape, scene.radius, scene.center_x, scene.center_y, 32) >= 0.5
        found = fit.coverage >= 0.5
        iou = (truth & found).sum() / (truth | found).sum()
        assert fit.shape == scene.shape, (scene, fit.shape)
        assert iou > 0.8 and fit.rmse < 0.08, (scene, iou, fit.rmse)
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        fit_scene_mask(render_scene(scene), "a photo of a cat")


# --- heat and score -----------------------------------------------------------------------------------------


def test_heat_share_known_answers():
    mask = np.zeros((8, 8))
    mask[2:6, 2:6] = 1.0
    share, chance = heat_share(np.ones((8, 8)), mask)
    assert chance == pytest.approx(0.25) and share == pytest.approx(0.25)  # uniform heat: exactly chance
    assert heat_share(mask * 3.0 - 1.0, mask)[0] == pytest.approx(1.0)  # negative heat off the shape is no heat
    assert heat_share(1.0 - mask, mask)[0] == pytest.approx(0.0)
    assert np.isnan(heat_share(-np.ones((8, 8)), mask)[0])
    assert peak_step(np.stack([np.zeros((2, 2)), np.full((2, 2), 2.0), np.ones((2, 2))])) == 1
    np.testing.assert_allclose(upsample(np.full((2, 2), 0.5), (8, 8)), 0.5)
    from ddr_core.heatmaps import ideal_detector_share

    left = np.zeros((8, 8))
    left[:, :4] = 1.0
    assert ideal_detector_share(left, (8, 8)) == pytest.approx(1.0)  # full resolution: a perfect detector is exact
    assert ideal_detector_share(left, (1, 1)) == pytest.approx(0.5)  # one position: no better than chance
    assert 0.5 < ideal_detector_share(left, (2, 2)) <= 1.0


def test_score_summary_over_channels():
    # channel 0: heat 0.9 on a shape covering 0.3; channel 1: 0.8 vs 0.2; channel 2: on the background (0.1 vs 0.3)
    table = pl.DataFrame({"channel": [0, 0, 1, 2], "heat_on_shape": [0.9, 0.9, 0.8, 0.1],
                          "chance": [0.3, 0.3, 0.2, 0.3], "mask_source": ["fitted world scene"] * 4})
    summary = score_summary(table)
    assert summary["scored_channels"] == 3 and summary["scored_examples"] == 4
    assert summary["excess"] == pytest.approx((0.6 + 0.6 + 0.6 - 0.2) / 4)
    assert summary["channels_more_on_shape"] == 2 and summary["channels_more_on_background"] == 1
    assert summary["p_shape"] == pytest.approx(2 / 8)  # exact sign flips of (0.6, 0.6, -0.2): 2 of 8 reach 1/3
    low, high = summary["excess_interval"]
    assert low <= summary["excess"] <= high
    empty = score_summary(table.with_columns(pl.lit(float("nan")).alias("heat_on_shape")))
    assert empty["scored_examples"] == 0 and empty["excess"] is None


# --- regeneration with per-position activations ------------------------------------------------------------


def test_an_interrupted_redraw_leaves_no_table_pointing_at_deleted_images(tmp_path):
    """A channel redrawn from other examples (new statistics) that dies after its old images were deleted, before
    its new table: the union (what another block's run writes, and the viewers read) holds no row whose images are
    gone, and the channel is not finished (a re-run redraws it)."""
    from ddr_core.heatmaps import STAMP_FILE, channel_dir, channel_is_finished
    from ddr_core.paths import DataLayout
    from tests.heatmap_data import write_heatmaps

    layout = DataLayout(tmp_path / "data", "default")
    out_dir = write_heatmaps(layout, "toy-raw", 0)
    (channel_dir(out_dir, 0) / STAMP_FILE).write_text('{"stamp": "old"}')
    assert read_heatmaps(out_dir)[0].height == 2
    with pytest.raises(KeyError):  # generation 11 was never regenerated: the redraw fails on its first example
        write_channel_heatmaps(out_dir, layout.data_root, 0, 0, None, {}, {}, {}, [(11, 1.0)], HeatmapConfig())
    table, summary = write_union(out_dir)
    missing = [p for p in (table["peak_image"].to_list() if table.height else [])
               if not (layout.data_root / p).is_file()]
    assert missing == [] and table.height == 0 and summary["examples"] == 0
    assert not channel_is_finished(out_dir, 0, "old")


def test_per_position_activations_average_to_the_captured_ones(tiny_pipe, capture):
    data_root, root, summary = capture
    model = as_model(tiny_pipe)
    generations = read_generations(root, [3, 0])
    channels = [0, 5, 17]
    recording = regenerate_positions(model, generations, model.hook_point(TINY_TARGET_LAYER),
                                     basis_unit_maps(RawChannels(None), channels), batch_size=1)
    assert recording.timesteps == summary["timesteps"]
    assert recording.maps.shape[:3] == (2, 5, 3)
    parts = list(ActivationStore(root).iter_dense("raw", "conditional"))
    ids = list(np.concatenate([p[0] for p in parts]))
    values = np.concatenate([p[2] for p in parts])  # (n, T, C)
    for row, generation_id in enumerate((3, 0)):
        means = recording.maps[row].mean(dim=(2, 3)).numpy()  # (steps, units)
        np.testing.assert_allclose(means, values[ids.index(generation_id)][:, channels], rtol=1e-2, atol=1e-2)


def test_sae_feature_maps_are_the_basis_unit_activations_per_position():
    torch.manual_seed(0)
    sae = Sae(SaeConfig(d_in=6, num_latents=10, k=3))
    basis = TopKSaeBasis(sae)
    tokens = torch.randn(2, 12, 6)
    maps = basis_unit_maps(basis, [1, 7], rows=5)(tokens)  # (2, 12, 2), through several basis calls
    assert maps.shape == (2, 12, 2)
    for j, unit in enumerate((1, 7)):
        mean = basis.unit_activations(tokens, torch.tensor([unit, unit]))
        torch.testing.assert_close(maps[:, :, j].mean(dim=1), mean, rtol=1e-5, atol=1e-6)
        assert (maps[:, :, j] >= 0).all()


def test_a_planted_channel_heat_is_found_where_it_was_planted(tiny_pipe, capture, tmp_path):
    """A hook overwrites channel 2 of the layer with a known pattern (the left half, growing with the step): the
    recorded maps are exactly it, its peak is the last step, and its heat lies wholly on a mask of the left half."""
    data_root, root, _ = capture
    model = as_model(tiny_pipe)
    point = model.hook_point(TINY_TARGET_LAYER)
    calls = {"n": 0}

    def plant(args, kwargs, output):
        tensor = point.read(args, kwargs, output).clone()
        h, w = tensor.shape[2:]
        pattern = torch.zeros(h, w)
        pattern[:, : w // 2] = 1.0 + calls["n"]
        tensor[:, 2] = pattern
        calls["n"] += 1
        return point.write(args, kwargs, output, tensor)

    handle = point.register(plant)
    try:
        recording = regenerate_positions(model, read_generations(root, [1]), point, basis_unit_maps(RawChannels(None), [2]))
    finally:
        handle.remove()
    maps = recording.maps[0, :, 0]
    steps, h, w = maps.shape
    for step in range(steps):
        expected = torch.zeros(h, w)
        expected[:, : w // 2] = 1.0 + step
        torch.testing.assert_close(maps[step], expected)
    assert peak_step(maps.numpy()) == steps - 1

    # written out: images (the animation has one frame per step), a table, and the share against a planted mask
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    from ddr_core.heatmaps import SceneFit

    half = np.zeros((64, 64))
    half[:, :32] = 1.0
    fit = SceneFit(coverage=half, rmse=0.0, shape="square", radius=1.0, center_x=0.0, center_y=0.0)
    out_dir = tmp_path / "outputs" / "heatmaps" / "v"
    frame = write_channel_heatmaps(out_dir, tmp_path, 2, 0, recording, {1: 0}, {1: image}, {1: fit},
                                   [(1, 4.5)], HeatmapConfig(frame_size=32))
    row = frame.row(0, named=True)
    assert row["peak_step"] == steps - 1 and row["dataset_activation"] == 4.5
    assert row["heat_on_shape"] == pytest.approx(1.0, abs=0.08)  # bilinear blur at the edge only
    assert row["chance"] == pytest.approx(0.5)
    with Image.open(tmp_path / row["steps_image"]) as animation:
        assert getattr(animation, "n_frames", 1) == steps
    with Image.open(tmp_path / row["peak_image"]) as peak:
        pixels = np.asarray(peak.convert("RGB"), dtype=np.int32)
        assert pixels[:, :14].min() > 0 and pixels[:, 20:].max() == 0  # heat on the left, the black image right
    table, summary = write_union(out_dir)
    assert table.height == 1 and summary["scored_examples"] == 1
    assert read_heatmaps(out_dir)[1] == json.loads((out_dir / "summary.json").read_text())


# --- the viewers: inspector (AppTest) and HTML export --------------------------------------------------------


@pytest.fixture()
def toy_views(tmp_path, monkeypatch):
    from tests.heatmap_data import write_heatmaps
    from tests.representation_data import VARIANT, make_indexed_toy

    toy = make_indexed_toy(tmp_path / "data", monkeypatch)
    write_heatmaps(toy.layout, VARIANT, 0, prompts=("a red circle on a black background", "**bold** [x](http://e.x)"))
    return toy


def test_the_inspector_shows_where_a_channel_fires(toy_views):
    pytest.importorskip("streamlit")
    from tests.test_inspector import _app, _markdown_sources, _run, _texts

    at = _app()
    where = next(tab for tab in at.tabs if tab.label == "Where it fires")
    texts = _texts(where.text)
    assert any(t.startswith("Toy world (1 channels, 2 examples): 0.9") for t in texts), texts
    assert "prompt: **bold** [x](http://e.x)" in texts  # plain text, not Markdown
    assert any("peak at step 3 (t=50)" in t and "heat on the shape 0.9" in t for t in texts)
    assert len(where.get("image")) == 4  # the peak overlay and the animation of each example
    assert not any("http://e.x" in source for _, source in _markdown_sources(at))
    _run(at.selectbox(key="channel").select(1))
    where = next(tab for tab in at.tabs if tab.label == "Where it fires")
    assert any("No heatmaps for this channel" in t for t in _texts(where.info))


def test_the_html_export_shows_where_a_channel_fires(toy_views, tmp_path):
    from ddr_core.html_export import export_html
    from tests.representation_data import VARIANT
    from tests.test_html_export import _check_self_contained, _parse

    out = export_html(toy_views.layout, VARIANT, tmp_path / "report").parent
    page = (out / "channels" / "channel_00000.html").read_text()
    assert "<h2>Where it fires</h2>" in page and "heat on the shape 0.9" in page
    assert "**bold** [x](http://e.x)" in page and "<a href=\"http://e.x" not in page
    heat_images = [src for src in _parse(out / "channels" / "channel_00000.html").images if "heatmaps/" in src]
    assert len(heat_images) == 4
    _check_self_contained(out)
    with Image.open(out / "channels" / heat_images[1]) as animation:
        assert animation.n_frames == 4
    assert "No heatmaps." in (out / "channels" / "channel_00001.html").read_text()


# --- the asset ---------------------------------------------------------------------------------------------------


def test_the_heatmaps_asset_on_the_tiny_graph(tiny_graph):
    """Materialized through Dagster on the tiny model's graph (raw channels and SAE features): a record per block with
    the run's data version, images and the table; images that are no recognisable world scene are not scored."""
    from ddr_assets.partitions import block_keys
    from ddr_core.paths import DataLayout
    from ddr_core.records import read_record
    from tests.tiny_graph import materialize, metadata, step_error

    data_root, instance, _ = tiny_graph
    layout = DataLayout(data_root, "default")
    sae_key = next(k for k in block_keys() if k.startswith("tiny-sae:"))
    first, last = (int(v) for v in sae_key.partition(":")[2].split("-"))
    examples = pl.read_parquet(layout.timestep_stats_dir("tiny-sae") / "dataset_examples.parquet")
    sae_channels = sorted({c for c in examples["channel"].to_list() if first <= c <= last})[:1]
    assert sae_channels, "the tiny SAE has no feature with dataset examples in its first block"
    for key, channels in (("tiny-raw:0-15", [0, 3]), (sae_key, sae_channels)):
        config = {"channels": channels, "examples_per_channel": 2, "frame_size": 32}
        result = materialize("heatmaps", key, data_root, instance, config)
        assert result.success, step_error(result)
        meta = metadata(result, "heatmaps")
        assert meta["channels_done"] + meta["channels_without_examples"] == len(channels)
        record = read_record(layout.records_dir, "heatmaps", key)
        event = result.get_asset_materialization_events()[0].materialization
        assert event.tags["dagster/data_version"] == record["data_version"]
        assert record["outputs"]["channels"] == channels
        variant = key.partition(":")[0]
        table, summary = read_heatmaps(layout.stage_dir("heatmaps", variant))
        assert set(table["channel"].to_list()) <= set(channels) and table.height == meta["examples"] > 0
        # the random tiny model draws no recognisable world scene: its images are not scored against a mask
        assert set(table["mask_source"].to_list()) <= {"unrecognisable", "not scored"}
        assert summary["scored_examples"] == 0
        for path in table["peak_image"].to_list() + table["steps_image"].to_list():
            assert (data_root / path).is_file()
        again = materialize("heatmaps", key, data_root, instance, config)
        assert again.get_asset_materialization_events()[0].materialization.tags["dagster/data_version"] == \
            record["data_version"]


def test_the_union_leaves_out_channels_drawn_from_other_inputs(tmp_path):
    """A channel another run drew from older statistics is not mixed into the table and its score: it is listed as
    stale (before: every channel folder on disk went into heatmaps.parquet and summary.json)."""
    from tests.heatmap_data import write_heatmaps

    layout = DataLayout(tmp_path, "default")
    old, new = {"timestep_stats/v": "1", "code": "a"}, {"timestep_stats/v": "2", "code": "a"}
    out_dir = write_heatmaps(layout, "raw", 3)
    (out_dir / "channel_00003" / STAMP_FILE).write_text(json.dumps({"stamp": "x", "inputs": old}))
    write_heatmaps(layout, "raw", 5)
    (out_dir / "channel_00005" / STAMP_FILE).write_text(json.dumps({"stamp": "y", "inputs": new}))
    table, summary = write_union(out_dir, new)
    assert table["channel"].unique().to_list() == [5] and summary["stale_channels"] == [3]
    assert summary["channels"] == 1 and read_heatmaps(out_dir)[0]["channel"].unique().to_list() == [5]
    table, summary = write_union(out_dir, old)
    assert table["channel"].unique().to_list() == [3] and summary["stale_channels"] == [5]
    everything, _ = write_union(out_dir)  # no inputs given: every folder (the viewers' tests' hand-made data)
    assert sorted(everything["channel"].unique().to_list()) == [3, 5]
