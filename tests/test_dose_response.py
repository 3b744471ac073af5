"""Dose-response of steering and timestep windows (ddr_core.steering, ddr_core.dose_response), with known answers.

The synthetic family below is a "denoiser" that passes the latent through one identity layer per step: steering
channel ``c`` with strength ``s`` at ``n`` of the steps adds exactly ``s * n`` to that latent channel, and
re-measuring the final latent at timestep ``t`` (noised ``x_t = a_t x0 + b_t noise``, the same noise for every
cell of a seed) reads ``a_t`` times that. So the effect of every cell over the unsteered one is known in closed
form: ``a_peak * s * n_steps_in_window``; it grows linearly (monotonically) with the strength, and it is exactly
0 for a window that holds no scheduler step (steering outside a window is a no-op).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ddr_core.dose_response import (
    DoseResponseConfig,
    cell_means,
    dose_effects,
    grid_cells,
    paired_differences,
    read_grid,
    run_dose_response,
    write_dose_sheet,
)
from ddr_core.families.base import Conditioning, ModelFamily
from ddr_core.hooks import TimestepTracker
from ddr_core.steering import (
    TimestepWindow,
    activity_window,
    outside_window,
    restrict_to_window,
    steering_schedule,
    top_peaks,
)
from tests.test_priors import hand_made_stats

STEPS = 10
SCHEDULE = [950 - 100 * i for i in range(STEPS)]  # 950, 850, ..., 50


class _Denoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, sample: torch.Tensor, timestep: Any, **_: Any) -> torch.Tensor:
        return self.layer(sample)


class IdentityFamily(ModelFamily):
    """Latents of 16 channels at 2x2; each step is ``latents = layer(latents)`` (identity); decode: channels 0-2."""

    name = "identity-test"
    pipeline_classes = ()

    def __init__(self) -> None:
        super().__init__(None)
        self._denoiser = _Denoiser()

    @classmethod
    def check_folder(cls, model_dir):  # pragma: no cover - never loaded from disk
        raise NotImplementedError

    @classmethod
    def load(cls, model_dir, device="cpu", dtype=torch.float32):  # pragma: no cover
        raise NotImplementedError

    @property
    def denoiser(self) -> nn.Module:
        return self._denoiser

    def layer_width(self, layer_name: str) -> int:
        return 16

    vae_scale_factor = 8
    latent_channels = 16
    default_size = (16, 16)
    num_train_timesteps = 1000
    tokenizer = None

    @staticmethod
    def signal(timesteps: torch.Tensor | int) -> torch.Tensor:
        return 1.0 - torch.as_tensor(timesteps, dtype=torch.float32) / 1000.0

    def add_noise(self, clean, noise, timesteps):
        a = self.signal(timesteps).view(-1, 1, 1, 1)
        return a * clean + (1 - a) * noise

    def signal_fraction(self, timesteps):
        return self.signal(torch.as_tensor(timesteps)).double()

    def decode(self, latents, batch_size=8):
        from PIL import Image

        pixels = (torch.sigmoid(latents[:, :3].float()) * 255).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).numpy()).resize((16, 16), Image.NEAREST) for p in pixels]

    def scheduler_timesteps(self, num_inference_steps, height=None, width=None):
        return [1000 - 50 - (1000 // num_inference_steps) * i for i in range(num_inference_steps)]

    def track_timesteps(self):
        return TimestepTracker(self._denoiser)

    def encode_prompt(self, prompt):
        return Conditioning({"prompt_embeds": torch.zeros(1, 1)})

    def generate(self, *, latents, height, width, num_inference_steps, guidance_scale, prompts=None,
                 conditioning=None, output_type="pil"):
        for t in self.scheduler_timesteps(num_inference_steps):
            latents = self._denoiser(latents, torch.tensor(t))
        return latents if output_type == "latent" else self.decode(latents)

    def forward_to_layer(self, layer, sample, timesteps, conditioning):
        return self._denoiser.layer(sample)


@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> Path:
    """channel 5 peaks at t=501 (max activation 2.0), channel 7 at the edge t=0..1, channel 9 has no peak."""
    return hand_made_stats(tmp_path_factory.mktemp("dose_stats"), 16)


def test_family_schedule_is_the_documented_one():
    assert IdentityFamily().scheduler_timesteps(STEPS) == SCHEDULE


# --- windows (ddr_core.steering) -----------------------------------------------------------------


def test_windows_known_answers():
    inside = activity_window(501, 1000, 100)
    assert (inside.low, inside.high, inside.width) == (401, 601, 201)
    assert activity_window(30, 1000, 100) == TimestepWindow(0, 130)
    assert outside_window(inside, 1000) == TimestepWindow(0, 200)  # center 501 >= 499.5: the low end
    assert outside_window(TimestepWindow(0, 130), 1000) == TimestepWindow(869, 999)
    assert outside_window(TimestepWindow(850, 999), 1000) == TimestepWindow(0, 149)
    with pytest.raises(ValueError, match="more than half"):
        outside_window(TimestepWindow(0, 600), 1000)
    with pytest.raises(ValueError, match="low <= high"):
        TimestepWindow(5, 4)
    schedule = torch.ones(2, 1000)
    out = restrict_to_window(schedule, [TimestepWindow(10, 19), None])
    assert out[0].sum() == 10 and out[0, 10] == 1 and out[0, 9] == 0 and out[1].sum() == 1000


def test_top_peaks_and_activity_window_mode(stats):
    peaks = top_peaks(stats, [5, 7, 9])
    assert peaks[5] == 501 and peaks[7] <= 250 and 9 not in peaks
    table = steering_schedule(stats, [5, 9], "activity_window", 2.0, window_half_width=100)
    assert torch.nonzero(table[0]).flatten().tolist() == list(range(401, 602))  # max activation > 0 there
    assert table[0, 501] == pytest.approx(2.0 * 2.0)
    assert table[1].abs().sum() == 0  # no peak: never steered
    everywhere = steering_schedule(stats, [5], "all_timesteps", 2.0)
    assert torch.equal(table[0], restrict_to_window(everywhere, [activity_window(501, 1000, 100)])[0])


# --- the grid on the synthetic family ----------------------------------------------------------------


def _run(stats: Path, tmp_path: Path, **overrides):
    config = DoseResponseConfig(**{"seeds": [3, 4, 5], "strength_multiples": [0.5, 1.0, 2.0],
                                   "num_inference_steps": STEPS, "batch_size": 5, "window_half_width": 100,
                                   "measure_draws": 2, **overrides})
    out = tmp_path / "dose_response" / "v"
    result = run_dose_response(IdentityFamily(), None, "layer", stats, [5, 9], out, config, tmp_path, 0.25)
    return result, read_grid(out), out


def test_grid_activation_effect_is_known_and_monotonic(stats, tmp_path):
    result, grid, out = _run(stats, tmp_path)
    assert result.done == [5] and result.skipped == {9: "no activity peak in the timestep statistics"}
    assert grid.height == len(grid_cells([0.5, 1.0, 2.0])) * 3
    a_peak = 1 - 501 / 1000
    unit = 0.25 * 2.0  # scale x max_activation(channel 5, peak 501)
    steps = {"inside": 2, "outside": 2, "all": STEPS}  # 401..601 holds 550, 450; 0..200 holds 150, 50
    for window in ("inside", "outside", "all"):
        rows = grid.filter(pl.col("window") == window)
        assert set(rows["steered_steps"].to_list()) == {steps[window]}
        for multiple in (0.5, 1.0, 2.0):
            diffs = paired_differences(grid, "activation", window, "none", multiple)["diff"].to_numpy()
            np.testing.assert_allclose(diffs, a_peak * multiple * unit * steps[window], rtol=1e-5)
    means = cell_means(grid).filter(pl.col("window") == "inside").sort("multiple")["activation_rel"].to_list()
    assert means == sorted(means) and means[0] < means[-1]  # monotone in the strength
    assert (out / "channel_00005" / "dose_response.json").is_file()
    assert (out / "channel_00005" / "inside_x2_seed3.png").is_file()
    sheet = write_dose_sheet(tmp_path / "sheet.png", tmp_path, grid, title="t")
    assert sheet.stat().st_size > 0
    again, _, _ = _run(stats, tmp_path)
    assert again.resumed == [5] and again.done == []


def test_a_window_without_scheduler_steps_is_a_no_op(stats, tmp_path):
    # half width 20 around 501: 481..521 holds no step of 950, 850, ..., 50; the outside window 0..40 none either
    _, grid, _ = _run(stats, tmp_path, window_half_width=20)
    for window in ("inside", "outside"):
        assert set(grid.filter(pl.col("window") == window)["steered_steps"].to_list()) == {0}
        for multiple in (0.5, 1.0, 2.0):
            diffs = paired_differences(grid, "activation", window, "none", multiple)["diff"].to_list()
            assert diffs == [0.0, 0.0, 0.0]
    from PIL import Image

    none = np.asarray(Image.open(tmp_path / grid.filter(pl.col("window") == "none")["image"][0]))
    inside = np.asarray(Image.open(tmp_path / grid.filter((pl.col("window") == "inside")
                                                          & (pl.col("multiple") == 2.0))["image"][0]))
    assert np.array_equal(none, inside)


def test_config_validation_names_fields():
    with pytest.raises(ValidationError, match="strength_multiples"):
        DoseResponseConfig(strength_multiples=[0.0, 1.0])
    with pytest.raises(ValidationError, match="seeds"):
        DoseResponseConfig(seeds=[1, 1])
    with pytest.raises(ValidationError, match="window_half_width"):
        DoseResponseConfig(window_half_width=400)


# --- the effect statistics: synthetic grids with known answers ------------------------------------


def _synthetic_grid(inside: float, outside: float, channels: int = 6, seeds: int = 3) -> pl.DataFrame:
    rows = []
    for c in range(channels):
        for s in range(seeds):
            for window, value in (("none", 0.1), ("inside", inside), ("outside", outside), ("all", inside)):
                rows.append({"channel": c, "seed": s, "window": window, "multiple": 0.0 if window == "none" else 1.0,
                             "concept_prob": value, "activation_rel": value, "steered_steps": 1,
                             "concept_hit": None})
    return pl.DataFrame(rows)


def test_effects_known_answer():
    effects = dose_effects(_synthetic_grid(0.9, 0.1), resamples=200, permutations=10000)
    row = effects.filter((pl.col("metric") == "concept_prob") & (pl.col("contrast") == "inside-outside")).row(
        0, named=True)
    assert row["value"] == pytest.approx(0.8) and row["low"] == pytest.approx(0.8) and row["high"] == pytest.approx(0.8)
    assert row["p_value"] == pytest.approx(2 ** -6)  # exact sign-flip test: 6 channels all positive
    assert row["n_channels"] == 6 and row["n_pairs"] == 18 and row["channels_positive"] == 6
    outside = effects.filter((pl.col("metric") == "concept_prob") & (pl.col("contrast") == "outside-none")).row(
        0, named=True)
    assert outside["value"] == pytest.approx(0.0) and outside["p_value"] == pytest.approx(1.0)


def test_effects_null_is_not_significant():
    rng = np.random.default_rng(0)
    grid = _synthetic_grid(0.5, 0.5, channels=10)
    noisy = grid.with_columns(pl.Series("concept_prob", rng.uniform(0, 1, grid.height)))
    row = dose_effects(noisy, resamples=500).filter(
        (pl.col("metric") == "concept_prob") & (pl.col("contrast") == "inside-outside")).row(0, named=True)
    assert row["low"] < 0 < row["high"] and row["p_value"] > 0.05


# --- the asset on the tiny model's graph ---------------------------------------------------------------


def test_asset_on_the_tiny_graph(tiny_graph, tmp_path):
    """``dose_response`` materializes a block's chosen channels (tiny model: no concepts, activation only),
    records its lineage and pools the variant's effects into its metadata and summary."""
    import shutil

    import dagster as dg

    from ddr_core.dose_response import read_dose_response
    from ddr_core.paths import DataLayout
    from ddr_core.records import read_record
    from tests.tiny_graph import materialize, metadata, step_error

    source, _, _ = tiny_graph
    data_root = tmp_path / "root"
    shutil.copytree(source, data_root)
    config = {"channels": [0, 1], "seeds": [11, 12], "strength_multiples": [1.0], "num_inference_steps": 8,
              "window_half_width": 150}
    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize("dose_response", "tiny-raw:0-15", data_root, instance, config)
        assert result.success, step_error(result)
        meta = metadata(result, "dose_response")
    layout = DataLayout(data_root)
    # a channel without an activity peak is skipped; each done one: 4 cells (unsteered, 3 windows x 1) x 2 seeds
    assert meta["channels_done"] >= 1 and meta["channels_done"] + meta["channels_skipped"] == 2
    assert meta["generations"] == 8 * meta["channels_done"]
    assert "inside\\-outside" in meta["effects_tiny-raw"]  # Markdown, the data escaped
    record = read_record(layout.records_dir, "dose_response", "tiny-raw:0-15")
    assert "timestep_stats/tiny-raw" in record["upstream"] and record["outputs"]["channels"] == [0, 1]
    effects, cells, summary = read_dose_response(layout.stage_dir("dose_response", "tiny-raw"))
    assert len(summary["channels"]) == meta["channels_done"] and summary["channels_with_concept"] == []
    assert set(effects["metric"].to_list()) == {"activation_rel"} and cells.height == 4
    assert (layout.stage_dir("dose_response", "tiny-raw") / "contact_sheet.png").is_file()


def test_priors_accept_the_activity_window_mode(stats):
    from ddr_core.priors import PriorsConfig
    from ddr_core.priors import steering_schedule as priors_schedule

    assert PriorsConfig(timesteps="activity_window").timesteps == "activity_window"
    assert priors_schedule is steering_schedule  # one schedule, in ddr_core.steering
    with pytest.raises(ValueError, match="unknown timesteps mode"):
        steering_schedule(stats, [5], "peaks", 1.0)


def test_view_windows_match_the_stage():
    from ddr_core import dose_response, dose_response_view

    assert dose_response_view.WINDOWS == dose_response.WINDOWS


def test_demo_lines_report_the_contrasts(tmp_path):
    from ddr_core.dose_response_view import dose_response_lines
    from ddr_core.paths import DataLayout
    from tests.dose_data import write_dose_grid

    layout = DataLayout(tmp_path)
    assert dose_response_lines(layout, ["v"]) == []
    write_dose_grid(layout, "v", 3)
    lines = dose_response_lines(layout, ["v", "other"])
    assert lines[1] == "  dose-response v: concept probability, 1 channel(s)"
    assert lines[2] == "    inside-outside: x1 +0.700 [-, -] p 0.5000; x2 +0.700 [-, -] p 0.5000"
    assert lines[3].startswith("    inside-none: x1 +0.700")


def test_the_demo_runs_it_after_the_concepts_and_before_the_report():
    from dagster_project.demo import demo_plan

    names = [name for name, _ in demo_plan(["toy-raw"])]
    assert names.index("feature_concepts") < names.index("dose_response") < names.index("html_export")


def test_a_rerun_with_other_settings_redoes_the_channel_and_drops_its_old_cells(stats, tmp_path):
    _, first, out = _run(stats, tmp_path)
    assert (out / "channel_00005" / "inside_x0.5_seed3.png").is_file()
    result, grid, _ = _run(stats, tmp_path, strength_multiples=[3.0])
    assert result.done == [5] and sorted(set(grid["multiple"].to_list())) == [0.0, 3.0]
    assert not (out / "channel_00005" / "inside_x0.5_seed3.png").exists()
    assert len(list((out / "channel_00005").glob("*.png"))) == grid.height


def test_the_ranks_merge_pools_every_ranks_channels(tmp_path):
    """Two ranks each summarise what they saw; rank 0's merge summarises the union once more."""
    import json

    from ddr_core.dose_response import SUMMARY_FILE
    from ddr_core.paths import DataLayout
    from ddr_core.stages import STAGES, StageRequest
    from tests.dose_data import write_dose_grid

    layout = DataLayout(tmp_path)
    write_dose_grid(layout, "v", 3)
    write_dose_grid(layout, "v", 4)
    out = layout.stage_dir("dose_response", "v")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    (out / SUMMARY_FILE).write_text(json.dumps({**summary, "channels": [3]}))  # a rank that finished first
    request = StageRequest(stage="dose_response_for_variant", args={"variant": "v", "config": {}},
                           data_root=str(tmp_path), experiment="default",
                           config_path=str(Path(__file__).resolve().parents[1] / "config" / "ddr.yaml"),
                           device="cpu", invocation_id="x", processes=2)
    relative = layout.relative(out)
    results = [{"out_dir": relative, "done": [3], "resumed": [], "skipped": {}, "seconds": 1.0, "images": 14},
               {"out_dir": relative, "done": [4], "resumed": [], "skipped": {"9": "no activity peak"}, "seconds": 2.0,
                "images": 14}]
    merged = STAGES["dose_response_for_variant"].merge(request, results)
    assert merged["done"] == [3, 4] and merged["images"] == 28 and merged["skipped"] == {"9": "no activity peak"}
    assert json.loads((out / SUMMARY_FILE).read_text())["channels"] == [3, 4]


def test_effects_do_not_depend_on_row_order():
    """The Monte Carlo sign-flip p pairs its sign draws with channels in channel order (not hash order)."""
    rng = np.random.default_rng(1)
    grid = _synthetic_grid(0.5, 0.5, channels=16, seeds=2)
    grid = grid.with_columns(pl.Series("concept_prob", rng.normal(0.05, 0.2, grid.height)))
    first = dose_effects(grid, resamples=200, permutations=2000)
    for seed in range(5):
        shuffled = grid.sample(fraction=1.0, shuffle=True, seed=seed)
        assert dose_effects(shuffled, resamples=200, permutations=2000).equals(first)


def test_a_rerun_from_the_same_inputs_keeps_the_channels_and_other_inputs_redo_them(stats, tmp_path):
    """Resumable like priors: a re-run (or a retry after preemption) with the same settings and the same upstream
    data versions generates nothing; other statistics (another data version) redo the channels."""
    config = DoseResponseConfig(seeds=[3, 4], strength_multiples=[1.0], num_inference_steps=STEPS, batch_size=5,
                                window_half_width=100, measure_draws=1)
    out = tmp_path / "dose_response" / "v"
    inputs = {"code_version": "1", "timestep_stats/v": "stats-a"}

    def run(given: dict) -> tuple:
        result = run_dose_response(IdentityFamily(), None, "layer", stats, [5, 9], out, config, tmp_path, 0.25,
                                   inputs=given)
        return result, {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    first, written = run(inputs)
    assert first.done == [5] and first.images == 4 * 2 and list(first.skipped) == [9]  # 9: no activity peak
    again, kept = run(dict(inputs))
    assert again.done == [] and again.resumed == [5] and again.images == 0 and kept == written
    changed, redrawn = run({**inputs, "timestep_stats/v": "stats-b"})
    assert changed.done == [5] and changed.resumed == []
    assert all(redrawn[p] != written[p] for p in written)
