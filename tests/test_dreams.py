"""Deep dreams on the tiny model: batching independence, progress, failures, resume, config, quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from ddr_core.dreams import (
    DreamConfig,
    DreamObjective,
    element_generators,
    finished_channels,
    load_prior_latents,
    measure_activations,
    measure_dream_quality,
    optimise_dreams,
    resolve_dream_timesteps,
    run_dreams,
)
from ddr_core.families import as_model
from ddr_core.hooks import activation_tokens, forward_to_layer
from ddr_core.pipeline import resolve_layer
from ddr_core.tiny_model import TINY_TARGET_LAYER

FAST = {"num_steps": 4, "snapshot_every": 2, "batch_size": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def noise_latents(pipe, seeds):
    """Seeded start latents at the model's native size (what dreams start from without priors)."""
    model = as_model(pipe)
    return model.initial_latents(seeds, *model.default_size)


def _generators(seeds):
    return element_generators(seeds)


# --- configuration ------------------------------------------------------------------------------


def test_config_defaults_follow_the_thesis():
    config = DreamConfig()
    assert config.timesteps == [0, "activity_peaks"]
    assert (config.num_steps, config.learning_rate, config.n_results) == (100, 0.05, 5)
    assert config.seeds == [1024, 1111, 4359, 3248, 1026]
    assert (config.total_variation_weight, config.range_penalty_weight, config.moment_penalty_weight) == (
        0.5, 0.5, 0.0)
    assert config.see_through_schedule_noise and config.fourier_preconditioning and config.use_prior
    augmentation = config.augmentation()
    assert (augmentation.jitter_max, augmentation.rotate_max, augmentation.scale_max) == (1, 5.0, 1.1)
    assert DreamConfig(augmentation_level=3, jitter_max=2).augmentation().jitter_max == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timesteps": [0, "peaks"]}, "timesteps"),
        ({"timesteps": [-1]}, "timesteps"),
        ({"timesteps": []}, "timesteps"),
        ({"gradient_smoothing_kernel_size": 4}, "gradient_smoothing_kernel_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"augmentation_level": 4}, "augmentation_level"),
        ({"scale_max": 0.5}, "scale_max"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"learning_rte": 0.1}, "learning_rte"),
    ],
)
def test_config_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as error:
        DreamConfig(**kwargs)
    assert field in str(error.value)


def test_config_needs_enough_seeds_without_priors():
    with pytest.raises(ValidationError, match="n_results=3 needs at least as many seeds"):
        DreamConfig(use_prior=False, seeds=[1, 2], n_results=3)
    assert DreamConfig(use_prior=True, seeds=[1, 2], n_results=3).n_results == 3


# --- objective ----------------------------------------------------------------------------------


def test_sae_objective_equals_the_full_sae_feature_mean(tiny_pipe, tiny_sae_dir):
    from ddr_core.sae import load_sae

    sae = load_sae(tiny_sae_dir)
    layer = resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    latents = noise_latents(tiny_pipe, [1, 2])
    context = torch.zeros(2, 77, tiny_pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        output = forward_to_layer(tiny_pipe.unet, layer, latents, torch.tensor([10, 700]), context)
        full = sae.feature_activations(activation_tokens(output)).mean(dim=1)  # (2, num_latents)
        features = torch.tensor([3, 200])
        mine = DreamObjective.sae_features(sae, features).activations(output)
        raw = DreamObjective.raw([5, 7]).activations(output)
    torch.testing.assert_close(mine, full[torch.arange(2), features], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw, output[torch.arange(2), torch.tensor([5, 7])].mean(dim=(-2, -1)))


# --- the optimiser ------------------------------------------------------------------------------


def test_batched_equals_unbatched_for_the_same_seed(tiny_pipe, tiny_sae_dir):
    """The key property: an element's dream does not depend on what shares its batch."""
    from ddr_core.sae import load_sae

    config = DreamConfig(augmentation_level=0, num_steps=5, snapshot_every=0, use_prior=False)
    channels, timesteps, seeds = [3, 17, 3], [10, 500, 900], [101, 202, 303]
    init = noise_latents(tiny_pipe, [1, 2, 3])
    for objective in (DreamObjective.raw(channels),
                      DreamObjective.sae_features(load_sae(tiny_sae_dir), [4, 100, 4])):
        batched = optimise_dreams(tiny_pipe, TINY_TARGET_LAYER, objective, init, timesteps, config,
                                  _generators(seeds))
        for element in range(3):
            alone = optimise_dreams(
                tiny_pipe, TINY_TARGET_LAYER, objective.select([element]), init[element:element + 1],
                timesteps[element:element + 1], config, _generators(seeds[element:element + 1]),
            )
            torch.testing.assert_close(batched.latents[element:element + 1], alone.latents, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(batched.history["loss"][:, element], alone.history["loss"][:, 0],
                                       rtol=1e-4, atol=1e-5)
        assert not torch.allclose(batched.latents, init)


def test_activation_rises_over_the_steps(tiny_pipe):
    config = DreamConfig(num_steps=25, snapshot_every=5, use_prior=False)
    channels = [0, 9, 21, 40]
    objective = DreamObjective.raw(channels)
    init = noise_latents(tiny_pipe, [11, 12, 13, 14])
    timesteps = [100, 100, 400, 400]
    result = optimise_dreams(tiny_pipe, TINY_TARGET_LAYER, objective, init, timesteps, config,
                             _generators([1, 2, 3, 4]))
    assert result.failed == [None] * 4
    assert sorted(result.snapshots) == [0, 5, 10, 15, 20]
    torch.testing.assert_close(result.snapshots[0], init)
    before = measure_activations(tiny_pipe, TINY_TARGET_LAYER, objective, init, timesteps)
    after = measure_activations(tiny_pipe, TINY_TARGET_LAYER, objective, result.latents, timesteps)
    assert bool((after > before).all()), (before, after)
    activation = result.history["activation"]
    assert bool((activation[-5:].mean(axis=0) > activation[:5].mean(axis=0)).all())


def test_nan_in_one_element_fails_it_and_the_others_finish(tiny_pipe):
    # No smoothing: its sigma schedule depends on num_steps, and the check below reruns 2 steps.
    config = DreamConfig(augmentation_level=0, num_steps=6, snapshot_every=0, use_prior=False,
                         gradient_smoothing_sigma_start=0.0)
    layer = resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    calls = {"n": 0}

    def inject(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:  # step 2: poison element 1
            output = output.clone() if isinstance(output, torch.Tensor) else output
            tensor = output if isinstance(output, torch.Tensor) else output[0]
            tensor[1] = float("nan")
            return output
        return None

    init = noise_latents(tiny_pipe, [1, 2, 3])
    objective = DreamObjective.raw([1, 2, 3])
    handle = layer.register_forward_hook(inject)
    try:
        result = optimise_dreams(tiny_pipe, layer, objective, init, [50, 50, 50], config, _generators([7, 8, 9]))
    finally:
        handle.remove()
    assert result.failed[0] is None and result.failed[2] is None
    assert result.failed[1] == "non-finite activation at step 2"
    assert result.failed_step == [None, 2, None]
    assert torch.isfinite(result.latents).all()
    assert not torch.equal(result.latents[1], init[1])  # it moved for two steps, then froze
    history = result.history["loss"]
    assert np.isfinite(history[:, [0, 2]]).all()
    assert np.isfinite(history[:2, 1]).all() and np.isnan(history[3:, 1]).all()
    assert np.isfinite(result.final_activation[1])

    # The frozen latent is the one reached after step 1: rerun 2 steps alone.
    short = config.model_copy(update={"num_steps": 2})
    alone = optimise_dreams(tiny_pipe, layer, objective.select([1]), init[1:2], [50], short, _generators([8]))
    torch.testing.assert_close(result.latents[1:2], alone.latents, rtol=1e-4, atol=1e-4)


def test_non_finite_initial_latent_fails_immediately(tiny_pipe):
    config = DreamConfig(num_steps=2, snapshot_every=0, use_prior=False)
    init = noise_latents(tiny_pipe, [1, 2])
    init[0, 0, 0, 0] = float("inf")
    result = optimise_dreams(tiny_pipe, TINY_TARGET_LAYER, DreamObjective.raw([0, 1]), init, [5, 5], config)
    assert result.failed == ["non-finite initial latent", None]


def test_optimiser_rejects_bad_shapes(tiny_pipe):
    config = DreamConfig(num_steps=1, use_prior=False)
    init = noise_latents(tiny_pipe, [1, 2])
    with pytest.raises(ValueError, match="objective has 1 elements"):
        optimise_dreams(tiny_pipe, TINY_TARGET_LAYER, DreamObjective.raw([0]), init, [1, 1], config)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        optimise_dreams(tiny_pipe, TINY_TARGET_LAYER, DreamObjective.raw([0, 1]), init, [1, 1000], config)


# --- timesteps, priors, the stage -----------------------------------------------------------------


def _write_stats(stats_dir: Path) -> None:
    stats_dir.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({
        "channel": [0, 0, 2], "peak_rank": [1, 0, 0], "timestep": [300, 700, 41],
        "height": [0.2, 0.5, 0.3], "plateau_start": [300, 700, 41], "plateau_end": [300, 700, 41],
        "observed_timestep": [301, 701, 41],
    }, schema_overrides={"channel": pl.Int32, "peak_rank": pl.Int32, "timestep": pl.Int32}).write_parquet(
        stats_dir / "activity_peaks.parquet")
    pl.DataFrame({"channel": [0, 0, 1], "timestep": [5, 6, 9], "frequency": [0.1, 0.2, 0.3]}).write_parquet(
        stats_dir / "active_timesteps.parquet")
    pl.DataFrame({
        "channel": [0, 0, 0, 1, 2], "timestep": [701, 701, 41, 41, 41], "rank": [0, 1, 0, 0, 0],
        "generation_id": [1, 2, 3, 4, 5], "activation": [2.0, 1.5, 4.0, 3.0, 0.5],
        "prompt": ["p"] * 5, "image_path": ["x.png"] * 5,
    }).write_parquet(stats_dir / "dataset_examples.parquet")


def _write_priors(priors_dir: Path, pipe, channels) -> None:
    for channel in channels:
        folder = priors_dir / f"channel_{channel:05d}"
        folder.mkdir(parents=True)
        seeds = [40 + channel, 50 + channel, 60 + channel]
        save_file({"latents": noise_latents(pipe, seeds) * 0.5, "seeds": torch.tensor(seeds, dtype=torch.int64)},
                  str(folder / "latents.safetensors"))
        (folder / "prior.json").write_text(json.dumps({"channel": channel, "seeds": seeds}))


def test_resolve_dream_timesteps(tmp_path):
    _write_stats(tmp_path)
    assert resolve_dream_timesteps(tmp_path, 0, [0, "activity_peaks"]) == [0, 700, 300]
    assert resolve_dream_timesteps(tmp_path, 0, ["active_timesteps", 6, 0]) == [5, 6, 0]
    assert resolve_dream_timesteps(tmp_path, 1, ["activity_peaks"]) == []
    assert resolve_dream_timesteps(tmp_path, 2, [41, "activity_peaks"]) == [41]
    with pytest.raises(FileNotFoundError, match="timestep_stats"):
        resolve_dream_timesteps(tmp_path / "missing", 0, ["activity_peaks"])


def test_missing_prior_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="use_prior: false"):
        load_prior_latents(tmp_path, 3, 2)


def test_run_dreams_writes_the_layout_and_resumes(tiny_pipe, tmp_path):
    stats_dir, priors_dir = tmp_path / "stats", tmp_path / "priors"
    _write_stats(stats_dir)
    _write_priors(priors_dir, tiny_pipe, [0, 1, 2])
    config = DreamConfig(timesteps=[20, "activity_peaks"], n_results=2, **FAST)
    channels = [0, 1, 2]  # elements: ch0 3 timesteps x 2 seeds, ch1 1 x 2, ch2 1 x 2 (20 and 41)

    interrupted = tmp_path / "interrupted"
    first = run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, stats_dir, priors_dir, channels, interrupted, config,
                       data_root=tmp_path, stop_after_channels=1)
    assert first.channels_done == [0]
    assert finished_channels(interrupted) == {0}
    second = run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, stats_dir, priors_dir, channels, interrupted, config,
                        data_root=tmp_path)
    assert second.channels_skipped == [0] and second.channels_done == [1, 2]

    straight = tmp_path / "straight"
    run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, stats_dir, priors_dir, channels, straight, config,
               data_root=tmp_path, batch_size=7)

    channel_0 = interrupted / "channel_00000"
    dream = json.loads((channel_0 / "dream.json").read_text())
    assert dream["timesteps"] == [20, 700, 300] and dream["seeds"] == [40, 50]
    assert dream["failures"] == [] and dream["basis"] == "raw" and dream["use_prior"] is True
    assert len(dream["results"]["700"]["final_activation"]) == 2
    assert dream["results"]["700"]["images"][0] == "interrupted/channel_00000/t_0700/seed_40.png"
    folder = channel_0 / "t_0700"
    tensors = load_file(str(folder / "latents.safetensors"))
    assert tensors["latents"].shape == (2, 4, 8, 8) and tensors["seeds"].tolist() == [40, 50]
    prior, _ = load_prior_latents(priors_dir, 0, 2)
    torch.testing.assert_close(tensors["initial_latents"], prior)
    assert (folder / "seed_40.png").is_file() and (folder / "seed_50.png").is_file()
    assert sorted(p.name for p in (folder / "steps").iterdir()) == [
        f"seed_{s}_step_{n:04d}.png" for s in (40, 50) for n in (0, 2, 4)]
    stats = pl.read_parquet(folder / "stats.parquet")
    assert stats.columns == ["seed", "step", "activation", "tv", "range", "moment", "loss"]
    assert stats.height == 2 * 4 and stats["step"].to_list() == [0, 1, 2, 3] * 2

    # Resumed == uninterrupted, with different batch sizes too (batch independence end to end).
    for channel in channels:
        for timestep in json.loads((straight / f"channel_{channel:05d}" / "dream.json").read_text())["timesteps"]:
            name = f"channel_{channel:05d}/t_{timestep:04d}/latents.safetensors"
            torch.testing.assert_close(load_file(str(interrupted / name))["latents"],
                                       load_file(str(straight / name))["latents"], rtol=1e-4, atol=1e-4)

    quality = measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, straight, stats_dir,
                                    config.model_copy(update={"quality_noise_draws": 2}))
    assert (straight / "quality.parquet").is_file()
    assert quality.columns == ["channel", "timestep", "seed", "dream_activation", "prior_activation",
                               "top_example_activation", "example_timestep", "ratio", "failed", "prior_draw_sd",
                               "noise_draws", "gain", "noise_sd", "noise_samples", "raised"]
    assert quality["noise_draws"].to_list() == [2] * quality.height  # the start's spread over draws is recorded
    assert quality.height == 2 * (3 + 1 + 2)
    row = quality.filter((pl.col("channel") == 0) & (pl.col("timestep") == 700) & (pl.col("seed") == 40)).row(
        0, named=True)
    assert row["example_timestep"] == 701 and row["top_example_activation"] == 2.0
    assert row["ratio"] == pytest.approx(row["dream_activation"] / 2.0)
    assert quality.filter(pl.col("channel") == 1)["top_example_activation"].to_list() == [3.0, 3.0]
    assert not quality["failed"].any()
    assert quality["dream_activation"].mean() > quality["prior_activation"].mean()
    assert (straight / "channel_00001" / "quality.parquet").is_file()
    cached = measure_dream_quality(tiny_pipe, None, TINY_TARGET_LAYER, straight, stats_dir, config, channels=[1])
    assert cached.equals(quality.filter(pl.col("channel") == 1))  # reused, not re-measured with 4 draws
    assert pl.read_parquet(straight / "quality.parquet").height == quality.height


def test_channels_without_timesteps_are_recorded_done(tiny_pipe, tmp_path):
    _write_stats(tmp_path / "stats")
    config = DreamConfig(timesteps=["activity_peaks"], use_prior=False, n_results=1, **FAST)
    result = run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, tmp_path / "stats", None, [1], tmp_path / "out", config)
    assert result.channels_without_timesteps == [1]
    dream = json.loads((tmp_path / "out" / "channel_00001" / "dream.json").read_text())
    assert dream["timesteps"] == [] and "no timesteps" in dream["skipped"]


def test_use_just_one_timestep_and_noise_start(tiny_pipe, tmp_path):
    _write_stats(tmp_path / "stats")
    config = DreamConfig(timesteps=["activity_peaks", 5], use_just_one_timestep=True, use_prior=False,
                         n_results=2, seeds=[7, 8, 9], **FAST)
    run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, tmp_path / "stats", None, [0], tmp_path / "out", config)
    dream = json.loads((tmp_path / "out" / "channel_00000" / "dream.json").read_text())
    assert dream["timesteps"] == [700] and dream["seeds"] == [7, 8] and dream["use_prior"] is False
    tensors = load_file(str(tmp_path / "out" / "channel_00000" / "t_0700" / "latents.safetensors"))
    torch.testing.assert_close(tensors["initial_latents"], noise_latents(tiny_pipe, [7, 8]))
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 64\)"):
        run_dreams(tiny_pipe, None, TINY_TARGET_LAYER, None, None, [64], tmp_path / "x",
                   DreamConfig(timesteps=[1], use_prior=False, **FAST))


def test_dreams_for_variant_sae_reads_priors_and_stats_and_writes_quality(tiny_pipe, tiny_model_dir,
                                                                          tiny_sae_root, tmp_path):
    import shutil

    from ddr_core.config import ProjectConfig
    from ddr_core.dreams import dreams_for_variant
    from ddr_core.paths import DataLayout

    project = ProjectConfig.model_validate({
        "models": {"tiny": {"source": {"builtin": "tiny"}}},
        "saes": {"tiny-sae": {"source": {"builtin": "tiny-sae"}}},
        "prompt_datasets": {"tiny-prompts": {"source": {"builtin": "tiny-prompts"}}},
        "variants": {"tiny-sae": {"model": "tiny", "basis": "sae", "sae": "tiny-sae", "prompts": "tiny-prompts",
                                  "width": 256}},
    })
    layout = DataLayout(tmp_path / "data")
    shutil.copytree(tiny_model_dir, layout.model_dir("tiny"))
    shutil.copytree(tiny_sae_root, layout.sae_dir("tiny-sae"))
    _write_stats(layout.timestep_stats_dir("tiny-sae"))
    _write_priors(layout.stage_dir("priors", "tiny-sae"), tiny_pipe, [0, 2])
    config = DreamConfig(timesteps=["activity_peaks"], n_results=1, quality_noise_draws=1, **FAST)
    messages: list[str] = []
    result = dreams_for_variant(project, layout, "tiny-sae", [0, 2], config, "cpu", log=messages.append)
    out = layout.stage_dir("dreams", "tiny-sae")
    assert result.channels_done == [0, 2] and result.quality_path == out / "quality.parquet"
    assert result.quality is not None and result.quality["channel"].unique().sort().to_list() == [0, 2]
    dream = json.loads((out / "channel_00002" / "dream.json").read_text())
    assert dream["basis"] == "sae" and dream["timesteps"] == [41] and dream["seeds"] == [42]
    assert dream["results"]["41"]["images"] == ["outputs/default/dreams/tiny-sae/channel_00002/t_0041/seed_42.png"]
    quality = pl.read_parquet(out / "quality.parquet")
    assert quality.height == 3 and quality["top_example_activation"].null_count() == 0
    with pytest.raises(ValueError, match="width is 300 in the config"):
        bad = project.model_copy(deep=True)
        object.__setattr__(bad.variants["tiny-sae"], "width", 300)
        dreams_for_variant(bad, layout, "tiny-sae", [0], config, "cpu")
