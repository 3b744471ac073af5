"""Priors: steering schedule from the statistics, batched steered generation, the resumable runner."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from ddr_core.activation_store import ActivationStore, VariantBatch
from ddr_core.basis import RawChannels
from ddr_core.config import ProjectConfig
from ddr_core.families import as_model
from ddr_core.paths import DataLayout
from ddr_core.priors import (
    PriorsConfig,
    PriorsConfigMismatch,
    channel_is_active,
    generate_priors,
    priors_for_variant,
    read_prior,
    run_priors,
    steering_schedule,
)
from ddr_core.sae import find_sae_folder, load_sae
from ddr_core.statistics import TimestepStatsConfig, compute_timestep_stats
from ddr_core.tensor_files import read_metadata
from ddr_core.tiny_model import TINY_TARGET_LAYER

STEPS = 4
TIMESTEPS = [751, 501, 251, 1]  # DDIM (steps_offset=1) with 4 steps; checked below
SEEDS = [1024, 1111]


def hand_made_stats(out: Path, width: int) -> Path:
    """Statistics (top_k=1) of 2 generations x 4 timesteps x ``width`` channels, made by hand.

    Background ``1 - channel / 128`` (exact in float16), so channel 0 wins wherever nobody is boosted.
    channel 5: 2.0 at t=501 in both generations (active 252..750, one peak at 501);
    channel 7: 3.0 at t=1 in generation 0 (active 0..250, peak at the edge, nearest step 1);
    channel 9: never wins (inactive); channel 0 wins at 751, 251 and (generation 1) at 1.
    """
    cond = np.broadcast_to(1 - np.arange(width, dtype=np.float32) / 128, (2, 4, width)).copy()
    cond[:, 1, 5] = 2.0
    cond[0, 3, 7] = 3.0
    store = ActivationStore(out / "capture")
    rows = [{"generation_id": g, "prompt_index": g, "prompt": f"p{g}", "image_index": 0, "seed": g,
             "image_path": f"images/{g}.png"} for g in range(2)]
    store.write_batch(0, rows, TIMESTEPS, {"raw": VariantBatch(cond, None)})
    store.finalize()
    stats = out / "stats"
    compute_timestep_stats(store, "raw", stats, TimestepStatsConfig(top_k=1))
    return stats


@pytest.fixture(scope="module")
def raw_stats(tmp_path_factory) -> Path:
    return hand_made_stats(tmp_path_factory.mktemp("raw_stats"), 64)


@pytest.fixture(scope="module")
def sae_stats(tmp_path_factory) -> Path:
    return hand_made_stats(tmp_path_factory.mktemp("sae_stats"), 256)


def small_config(**overrides) -> PriorsConfig:
    values = {"n_results": 2, "seeds": SEEDS, "num_inference_steps": STEPS, "batch_size": 3}
    return PriorsConfig(**{**values, **overrides})


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_and_validation_names_fields():
    config = PriorsConfig()
    assert config.seeds == [1024, 1111, 4359, 3248, 1026] and config.n_results == 5
    assert config.timesteps == "active_timesteps" and config.batch_size == 16
    assert config.resolved_scale("raw") == 50 and config.resolved_scale("sae") == 500
    assert PriorsConfig(steer_strength_scale=3).resolved_scale("sae") == 3
    with pytest.raises(ValidationError, match=r"seeds\n.*seeds has 2 entries but n_results is 5"):
        PriorsConfig(seeds=[1, 2])
    with pytest.raises(ValidationError, match="seeds"):
        PriorsConfig(n_results=2, seeds=[1, 1])
    with pytest.raises(ValidationError, match="batch_size"):
        PriorsConfig(batch_size=0)
    for field, value in (("height", 12), ("width", 65536), ("num_inference_steps", 100000), ("n_results", 100000),
                         ("batch_size", 100000)):  # bounded when the config is read, before any model loads
        with pytest.raises(ValidationError, match=field):
            PriorsConfig(**{field: value})
    with pytest.raises(ValidationError, match="num_inference_steps"):
        PriorsConfig(num_inference_steps=0)
    with pytest.raises(ValidationError, match="timesteps"):
        PriorsConfig(timesteps="peaks")
    with pytest.raises(ValidationError, match="steer_strenght_scale"):
        PriorsConfig(steer_strenght_scale=1.0)


# --- steering schedule ----------------------------------------------------------------------------


def test_scheduler_timesteps_match_hand_made_stats(tiny_pipe):
    assert as_model(tiny_pipe).scheduler_timesteps(STEPS) == TIMESTEPS


def test_schedule_active_timesteps(raw_stats):
    schedule = steering_schedule(raw_stats, [5, 7, 9, 0], "active_timesteps", 50.0)
    assert schedule.shape == (4, 1000) and schedule.dtype == torch.float32
    nonzero = [set(torch.nonzero(row).flatten().tolist()) for row in schedule]
    assert nonzero[0] == set(range(252, 751))
    assert nonzero[1] == set(range(0, 251))
    assert nonzero[2] == set()  # inactive
    active = pl.read_parquet(raw_stats / "active_timesteps.parquet")
    assert nonzero[3] == set(active.filter(pl.col("channel") == 0)["timestep"].to_list())
    assert schedule[0, 501] == pytest.approx(2.0 * 50)  # recorded max x scale
    assert schedule[1, 1] == pytest.approx(3.0 * 50)
    # between observed timesteps: linear in the max activation, like the profile (2.0 at 501, 123/128 at 751)
    assert schedule[0, 626] == pytest.approx((2.0 + 123 / 128) / 2 * 50, rel=1e-5)
    assert schedule[1, 0] == pytest.approx(3.0 * 50)  # held beyond the observed range
    assert channel_is_active(raw_stats, [5, 7, 9, 0]).tolist() == [True, True, False, True]


def test_schedule_all_timesteps_and_scale(raw_stats):
    schedule = steering_schedule(raw_stats, [5, 9], "all_timesteps", 10.0)
    assert bool((schedule != 0).all())
    assert schedule[0, 501] == pytest.approx(20.0) and schedule[0, 751] == pytest.approx(1230 / 128)
    assert schedule[1, 251] == pytest.approx(1190 / 128) and schedule[1, 999] == pytest.approx(1190 / 128)
    doubled = steering_schedule(raw_stats, [5, 9], "all_timesteps", 20.0)
    torch.testing.assert_close(doubled, 2 * schedule)


def test_schedule_activity_peaks_nearest_scheduler_timestep(raw_stats):
    peaks = pl.read_parquet(raw_stats / "activity_peaks.parquet")
    assert peaks.filter(pl.col("channel") == 5)["timestep"].to_list() == [501]
    schedule = steering_schedule(raw_stats, [5, 7, 9], "activity_peaks", 50.0)
    assert torch.nonzero(schedule[0]).flatten().tolist() == [501]
    assert torch.nonzero(schedule[1]).flatten().tolist() == [1]  # edge peak near 0 -> step 1
    assert schedule[0, 501] == pytest.approx(100.0) and schedule[1, 1] == pytest.approx(150.0)
    assert not schedule[2].any()
    # Another generation schedule: the peak at 501 goes to the nearest step, 600.
    other = steering_schedule(raw_stats, [5], "activity_peaks", 50.0, scheduler_timesteps=[900, 600, 300, 0])
    assert torch.nonzero(other[0]).flatten().tolist() == [600]
    expected = np.interp(600, [1, 251, 501, 751], [123 / 128, 123 / 128, 2.0, 123 / 128]) * 50
    assert other[0, 600] == pytest.approx(expected, rel=1e-5)


def test_schedule_errors(raw_stats):
    with pytest.raises(ValueError, match=r"\[64\] are out of range.*0\.\.63"):
        steering_schedule(raw_stats, [3, 64], "active_timesteps", 1.0)
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        steering_schedule(raw_stats, [3], "active_timesteps", 1.0, num_train_timesteps=500)
    with pytest.raises(ValueError, match="unknown timesteps mode"):
        steering_schedule(raw_stats, [3], "peaks", 1.0)


# --- generation -----------------------------------------------------------------------------------


def test_batched_equals_one_channel_at_a_time(tiny_pipe, raw_stats):
    channels = [5, 7]
    directions = RawChannels(64).directions(channels)
    schedule = steering_schedule(raw_stats, channels, "all_timesteps", 50.0)
    # 4 generations in batches of 3: (5, s0) (5, s1) (7, s0) share a batch, (7, s1) runs alone.
    latents, images = generate_priors(tiny_pipe, TINY_TARGET_LAYER, directions, schedule, SEEDS,
                                      num_inference_steps=STEPS, batch_size=3)
    assert latents.shape == (2, 2, 4, 8, 8) and latents.dtype == torch.float32
    assert len(images) == 2 and all(len(row) == 2 for row in images)
    assert images[0][0].size == (64, 64)
    for row, channel in enumerate(channels):
        for seed_index, seed in enumerate(SEEDS):
            alone, alone_images = generate_priors(
                tiny_pipe, TINY_TARGET_LAYER, RawChannels(64).directions([channel]), schedule[row:row + 1],
                [seed], num_inference_steps=STEPS, batch_size=1,
            )
            torch.testing.assert_close(latents[row, seed_index], alone[0, 0], atol=1e-4, rtol=1e-4)
            diff = np.abs(pixels(images[row][seed_index]) - pixels(alone_images[0][0]))
            assert diff.max() <= 1
    # Not vacuous: each channel and each seed gives its own result.
    assert (latents[0, 0] - latents[1, 0]).abs().max() > 1e-2
    assert (latents[1, 0] - latents[1, 1]).abs().max() > 1e-2


def test_steering_changes_the_image(tiny_pipe, raw_stats):
    directions = RawChannels(64).directions([5])
    schedule = steering_schedule(raw_stats, [5], "all_timesteps", 50.0)
    steered, steered_images = generate_priors(tiny_pipe, TINY_TARGET_LAYER, directions, schedule, [1024],
                                              num_inference_steps=STEPS, batch_size=1)
    plain, plain_images = generate_priors(tiny_pipe, TINY_TARGET_LAYER, directions, torch.zeros_like(schedule),
                                          [1024], num_inference_steps=STEPS, batch_size=1)
    unhooked = tiny_pipe(prompt="", latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1024)),
                         num_inference_steps=STEPS, guidance_scale=1.0, output_type="latent").images
    torch.testing.assert_close(plain[0, 0], unhooked[0], atol=1e-5, rtol=1e-5)  # zero strength = no hook
    assert (steered - plain).abs().mean() > 0.05
    assert np.abs(pixels(steered_images[0][0]) - pixels(plain_images[0][0])).mean() > 1.0


# --- runner ---------------------------------------------------------------------------------------


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_priors_format_skips_and_resume(tiny_pipe, raw_stats, tmp_path):
    config = small_config()
    channels = [0, 9, 5, 7]

    # Uninterrupted reference run.
    reference_root = tmp_path / "reference"
    full = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, channels, reference_root / "priors",
                      config, reference_root)
    assert full.done == [0, 5, 7] and full.skipped == {9: "inactive"} and full.resumed == []
    assert full.images == 6 and full.images_per_second > 0
    assert full.counts()["skipped_inactive"] == 1

    prior = read_prior(reference_root / "priors", 5)
    assert prior["status"] == "done" and prior["channel"] == 5 and prior["seeds"] == SEEDS
    assert prior["basis"] == "raw" and prior["timesteps_mode"] == "active_timesteps"
    assert prior["steer_strength_scale"] == 50.0 and prior["prompt"] == "" and prior["guidance_scale"] == 1.0
    assert prior["steered_timesteps"] == [501] and prior["strengths"] == pytest.approx([100.0])
    assert prior["strength_summary"]["n_steered"] == 1
    assert prior["images"] == ["priors/channel_00005/seed_1024.png", "priors/channel_00005/seed_1111.png"]
    assert prior["latents"] == "priors/channel_00005/latents.safetensors"
    assert all((reference_root / p).is_file() for p in prior["images"])
    with safe_open(str(reference_root / prior["latents"]), framework="pt") as handle:
        latents, seeds = handle.get_tensor("latents"), handle.get_tensor("seeds")
        metadata = read_metadata(handle)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    assert seeds.tolist() == SEEDS and seeds.dtype == torch.int64
    assert metadata["channel"] == "5" and metadata["basis"] == "raw" and metadata["format"] == "ddr.priors/1"
    assert read_prior(reference_root / "priors", 0)["steered_timesteps"] == [751, 251, 1]

    skipped = read_prior(reference_root / "priors", 9)
    assert skipped["status"] == "skipped" and skipped["reason"] == "inactive"
    assert "no active timesteps" in skipped["message"] and skipped["images"] == []
    assert sorted(p.name for p in (reference_root / "priors" / "channel_00009").iterdir()) == ["prior.json"]

    # Killed after 2 channels, then resumed.
    root = tmp_path / "resumed"
    first = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, channels, root / "priors", config, root,
                       stop_after_channels=2)
    assert first.done == [0] and first.skipped == {9: "inactive"}
    assert read_prior(root / "priors", 5) is None
    before = files_of(root / "priors")
    second = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, channels, root / "priors", config, root)
    assert second.resumed == [0, 9] and second.done == [5, 7] and second.skipped == {}
    after = files_of(root / "priors")
    assert [name for name in before if after[name] != before[name]] == []  # finished channels untouched
    reference = files_of(reference_root / "priors")
    assert sorted(after) == sorted(reference)
    for name in after:
        if name.endswith(".json"):  # the measured activations agree up to the float rounding of batched kernels
            mine, theirs = json.loads(after[name][0]), json.loads(reference[name][0])
            mine_gain, their_gain = mine.pop("activation", None), theirs.pop("activation", None)
            assert mine == theirs, name
            assert (mine_gain is None) == (their_gain is None), name
            for key in ("steered", "unsteered") if mine_gain else ():
                assert mine_gain[key] == pytest.approx(their_gain[key], rel=1e-4, abs=1e-4), (name, key)
        elif name.endswith(".safetensors"):
            with safe_open(str(root / "priors" / name), framework="pt") as a, \
                    safe_open(str(reference_root / "priors" / name), framework="pt") as b:
                torch.testing.assert_close(a.get_tensor("latents"), b.get_tensor("latents"), atol=1e-4, rtol=1e-4)

    # A third run does nothing.
    third = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, channels, root / "priors", config, root)
    assert third.resumed == channels and third.done == [] and third.images == 0
    assert files_of(root / "priors") == after

    # Other parameters on the same folder: refused, nothing mixed.
    with pytest.raises(PriorsConfigMismatch, match="steer_strength_scale"):
        run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, channels, root / "priors",
                   small_config(steer_strength_scale=7.0), root)


def test_channel_whose_timesteps_miss_the_schedule_is_skipped(tiny_pipe, raw_stats, tmp_path):
    # One DDIM step runs at t=1 only: channel 5 (active 252..750) gets no steered step and is skipped
    # with a reason; channel 7 (active 0..250) is steered at t=1 with its max activation there.
    config = small_config(num_inference_steps=1)
    assert as_model(tiny_pipe).scheduler_timesteps(1) == [1]
    result = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [5, 7], tmp_path / "priors", config, tmp_path)
    assert result.skipped == {5: "no_steered_timesteps"} and result.done == [7]
    skipped = read_prior(tmp_path / "priors", 5)
    assert skipped["status"] == "skipped" and "scheduler timesteps" in skipped["message"]
    done = read_prior(tmp_path / "priors", 7)
    assert done["steered_timesteps"] == [1] and done["strengths"] == pytest.approx([150.0])


def test_out_of_range_channel_is_a_clear_error(tiny_pipe, raw_stats, tmp_path):
    with pytest.raises(IndexError, match=r"\[64\] out of range.*64 channels, valid indices are 0\.\.63"):
        run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [1, 64], tmp_path / "priors",
                   small_config(), tmp_path)
    assert not (tmp_path / "priors").exists()


def test_sae_basis_steers_along_decoder_rows(tiny_pipe, tiny_sae_dir, sae_stats, tmp_path):
    sae = load_sae(tiny_sae_dir, expected_d_in=64)
    config = small_config(timesteps="activity_peaks")
    result = run_priors(tiny_pipe, sae, TINY_TARGET_LAYER, sae_stats, [5, 200], tmp_path / "priors", config, tmp_path)
    assert result.done == [5] and result.skipped == {200: "inactive"}
    prior = read_prior(tmp_path / "priors", 5)
    assert prior["basis"] == "sae" and prior["steer_strength_scale"] == 500.0
    assert prior["steered_timesteps"] == [501] and prior["strengths"] == pytest.approx([1000.0])
    schedule = steering_schedule(sae_stats, [5], "activity_peaks", 500.0)
    expected, _ = generate_priors(tiny_pipe, TINY_TARGET_LAYER, sae.decoder_directions(torch.tensor([5])).detach(),
                                  schedule, SEEDS, num_inference_steps=STEPS, batch_size=2)
    with safe_open(str(tmp_path / prior["latents"]), framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor("latents"), expected[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(IndexError, match="256 channels"):
        run_priors(tiny_pipe, sae, TINY_TARGET_LAYER, sae_stats, [256], tmp_path / "priors", config, tmp_path)


def test_priors_for_variant(tiny_model_dir, tiny_sae_root, raw_stats, tmp_path):
    layout = DataLayout(tmp_path / "data", "exp")
    layout.model_dir("tiny").parent.mkdir(parents=True)
    layout.model_dir("tiny").symlink_to(tiny_model_dir)
    layout.sae_dir("tiny-sae").parent.mkdir(parents=True)
    layout.sae_dir("tiny-sae").symlink_to(tiny_sae_root)
    stats = layout.timestep_stats_dir("tiny-raw")
    stats.parent.mkdir(parents=True)
    stats.symlink_to(raw_stats)
    project = ProjectConfig.model_validate({
        "models": {"tiny": {"source": {"builtin": "tiny"}}},
        "saes": {"tiny-sae": {"source": {"builtin": "tiny-sae"}}},
        "prompt_datasets": {"tiny-prompts": {"source": {"builtin": "tiny-prompts"}}},
        "variants": {
            "tiny-raw": {"model": "tiny", "prompts": "tiny-prompts", "width": 64},
            "tiny-sae": {"model": "tiny", "prompts": "tiny-prompts", "basis": "sae", "sae": "tiny-sae",
                         "width": 256},
        },
    })
    with pytest.raises(IndexError, match=r"\[64\] out of range: variant 'tiny-raw'"):
        priors_for_variant(project, layout, "tiny-raw", [64], small_config(), "cpu")
    result = priors_for_variant(project, layout, "tiny-raw", [7], small_config(n_results=1, seeds=[3]), "cpu")
    assert result.done == [7]
    prior = json.loads((layout.stage_dir("priors", "tiny-raw") / "channel_00007" / "prior.json").read_text())
    assert prior["images"] == ["outputs/exp/priors/tiny-raw/channel_00007/seed_3.png"]
    assert (layout.data_root / prior["images"][0]).is_file()
    # The SAE variant finds its SAE folder and checks its statistics' width.
    assert find_sae_folder(layout.sae_dir("tiny-sae"), TINY_TARGET_LAYER).is_dir()
    with pytest.raises(FileNotFoundError, match="summary.json"):
        priors_for_variant(project, layout, "tiny-sae", [1], small_config(), "cpu")


def test_priors_refuse_weights_other_than_the_capture_was_made_with(tiny_model_dir, raw_stats, tmp_path):
    """The model was provisioned again with other weights after the capture: its statistics (which channels
    are active, when) describe weights that are gone, so priors refuse instead of steering the new ones."""
    from ddr_core.provisioning import LocalSource, provision
    from ddr_core.records import make_record, write_record
    from ddr_core.tiny_model import TinyModelConfig, build_tiny_pipeline

    layout = DataLayout(tmp_path / "data", "exp")
    captured = provision(LocalSource(tiny_model_dir), layout.model_dir("tiny")).content_hash
    stats = layout.timestep_stats_dir("tiny-raw")
    stats.parent.mkdir(parents=True)
    stats.symlink_to(raw_stats)
    write_record(layout.records_dir, make_record("activations", "tiny", "1", {}, {"models/tiny": captured}, "v1"))
    project = ProjectConfig.model_validate({
        "models": {"tiny": {"source": {"builtin": "tiny"}}},
        "prompt_datasets": {"tiny-prompts": {"source": {"builtin": "tiny-prompts"}}},
        "variants": {"tiny-raw": {"model": "tiny", "prompts": "tiny-prompts", "width": 64}},
    })
    config = small_config(n_results=1, seeds=[3])
    assert priors_for_variant(project, layout, "tiny-raw", [7], config, "cpu").done == [7]

    other = build_tiny_pipeline(tmp_path / "other", TinyModelConfig(seed=1))
    provision(LocalSource(other), layout.model_dir("tiny"))
    with pytest.raises(ValueError, match=r"model 'tiny' now holds other weights .* than activations\[tiny\] was "
                                         r"captured with .*Materialize activations\[tiny\] again"):
        priors_for_variant(project, layout, "tiny-raw", [8], config, "cpu")
    assert not (layout.stage_dir("priors", "tiny-raw") / "channel_00008").exists()
