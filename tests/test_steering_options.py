"""Issue 14's steering options of the priors stage, each with a known answer: where in space (a self-gated
mask of the positions where the unit fires most) and how strongly per timestep (the activity profile)."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ddr_core.basis import RawChannels, TopKSaeBasis
from ddr_core.hooks import TimestepTracker, steer_layer
from ddr_core.priors import PriorsConfig, read_prior, run_priors
from ddr_core.sae import find_sae_folder, load_sae
from ddr_core.steering import activity_profiles, self_gated_positions, steering_schedule, top_positions
from ddr_core.tiny_model import TINY_TARGET_LAYER
from tests.test_priors import SEEDS, STEPS, hand_made_stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def raw_stats(tmp_path_factory) -> Path:
    return hand_made_stats(tmp_path_factory.mktemp("steer_options_stats"), 64)


def _tracked_identity(timestep: int) -> tuple[nn.Module, TimestepTracker]:
    tracker = TimestepTracker(nn.Identity())
    tracker.current = timestep
    return nn.Identity(), tracker


# --- where in space -------------------------------------------------------------------------------


def test_top_positions_known_masks():
    maps = torch.tensor([[0.0, 5.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
    assert top_positions(maps, 0.5).tolist() == [[False, True, False, True], [False, False, True, True]]
    # ceil(0.25 x 4) = 1 position; the tie of 5.0 goes to the lower position
    assert top_positions(maps, 0.25).tolist() == [[False, True, False, False], [False, False, False, True]]
    assert top_positions(maps, 0.01).sum(dim=1).tolist() == [1, 1]  # at least one
    assert bool(top_positions(maps, 1.0).all())
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
            top_positions(maps, bad)


@pytest.mark.parametrize("layout", ["spatial", "tokens"])
def test_self_gated_steering_touches_only_the_unit_top_positions(layout):
    """Channel 2's map is [[0, 9], [1, 8]] (row-major positions 0..3): with fraction 0.5 only positions 1 and 3
    are steered (by exactly the strength, on channel 2 only); positions 0 and 2 stay bit-identical."""
    layer, tracker = _tracked_identity(500)
    spatial = torch.randn(1, 4, 2, 2)
    spatial[0, 2] = torch.tensor([[0.0, 9.0], [1.0, 8.0]])
    x = spatial if layout == "spatial" else spatial.flatten(2).transpose(1, 2).contiguous()
    strengths = torch.zeros(1, 1000)
    strengths[0, 500] = 3.0
    gate = self_gated_positions(RawChannels(4), [2], 0.5)
    with steer_layer(layer, tracker, RawChannels(4).directions([2]), strengths, positions=gate):
        y = layer(x)
    tokens_x = x if layout == "tokens" else x.flatten(2).transpose(1, 2)
    tokens_y = y if layout == "tokens" else y.flatten(2).transpose(1, 2)
    expected = torch.zeros(1, 4, 4)
    expected[0, 1, 2] = expected[0, 3, 2] = 3.0
    torch.testing.assert_close(tokens_y - tokens_x, expected)
    for outside in (0, 2):
        assert torch.equal(tokens_y[0, outside], tokens_x[0, outside])
    assert not layer._forward_hooks


def test_self_gated_cfg_halves_gate_by_their_own_maps_and_bad_gates_are_refused():
    layer, tracker = _tracked_identity(7)
    x = torch.zeros(2, 3, 1, 3)  # two CFG halves of one element, 3 positions
    x[0, 1, 0] = torch.tensor([5.0, 0.0, 0.0])  # the unconditional half's channel 1 peaks at position 0
    x[1, 1, 0] = torch.tensor([0.0, 0.0, 5.0])  # the conditional half's at position 2
    gate = self_gated_positions(RawChannels(3), [1], 0.3)  # ceil(0.9) = 1 position
    with steer_layer(layer, tracker, RawChannels(3).directions([1]), torch.ones(1, 1000), positions=gate):
        y = layer(x)
    delta = (y - x)[:, 1, 0]
    assert delta.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="bool mask of shape"):
        with steer_layer(layer, tracker, RawChannels(3).directions([1]), torch.ones(1, 1000),
                         positions=lambda tokens: torch.ones(tokens.shape[:2])):
            layer(x)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        self_gated_positions(RawChannels(3), [1], 0.0)


def test_sae_unit_maps_are_the_per_position_activations(tiny_sae_dir):
    basis = TopKSaeBasis(load_sae(find_sae_folder(tiny_sae_dir, TINY_TARGET_LAYER)))
    tokens = torch.randn(2, 5, basis.sae.d_in, generator=torch.Generator().manual_seed(0))
    units = torch.tensor([3, 17])
    maps = basis.unit_maps(tokens, units)
    assert maps.shape == (2, 5) and bool((maps >= 0).all())
    torch.testing.assert_close(maps.mean(dim=1), basis.unit_activations(tokens, units))
    weight, bias = basis.sae.encoder_rows(units)
    by_hand = torch.relu(torch.einsum("bnd,bd->bn", basis.sae.prepare_input(tokens) - basis.sae.b_dec, weight)
                         + bias[:, None])
    torch.testing.assert_close(maps, by_hand)
    raw = RawChannels(basis.sae.d_in).unit_maps(tokens, units)
    torch.testing.assert_close(raw, torch.stack([tokens[0, :, 3], tokens[1, :, 17]]))


# --- how strongly per timestep --------------------------------------------------------------------


def test_activity_profile_strengths_known_values(raw_stats):
    """Channel 5: profile a triangle 252..750 peaking at 1.0 at t=501, max activation 2.0. Channel 7: profile 0.5
    at t<=1 falling to 0 at 251, max activation 3.0 (hand_made_stats)."""
    schedule = steering_schedule(raw_stats, [5, 7, 9], "active_timesteps", 50.0, shape="activity_profile")
    profile = activity_profiles(raw_stats, [5, 7], 1000)
    assert profile[0, 501] == pytest.approx(1.0) and profile[0, 376] == pytest.approx(0.5)
    assert schedule[0, 501] == pytest.approx(2.0 * 50)  # at the profile's peak: max activation x scale
    assert schedule[0, 376] == pytest.approx(2.0 * 50 * 0.5)  # half the profile: half the strength
    assert schedule[0, 626] == pytest.approx(2.0 * 50 * 0.5)
    assert schedule[0, 251] == 0.0 and schedule[0, 751] == 0.0  # inactive: untouched
    assert schedule[1, 1] == pytest.approx(3.0 * 50)  # normalised by its own peak (0.5)
    assert schedule[1, 126] == pytest.approx(3.0 * 50 * 0.5)
    assert not schedule[2].any()  # inactive channel
    # the default shape at the same t: the interpolated max activation, not the profile
    default = steering_schedule(raw_stats, [5], "active_timesteps", 50.0)
    assert default[0, 376] == pytest.approx((2.0 + 123 / 128) / 2 * 50, rel=1e-5)
    with pytest.raises(ValueError, match="unknown strength shape 'flat'"):
        steering_schedule(raw_stats, [5], "active_timesteps", 50.0, shape="flat")


# --- the priors stage -----------------------------------------------------------------------------


def test_config_options_default_off_and_validated():
    config = PriorsConfig()
    assert (config.strength_shape, config.steer_positions) == ("max_activation", "everywhere")
    assert config.option_settings() == {}  # a default run hashes and records as before
    gated = PriorsConfig(steer_positions="self_top", position_fraction=0.5, strength_shape="activity_profile")
    assert gated.option_settings() == {"strength_shape": "activity_profile", "steer_positions": "self_top",
                                       "position_fraction": 0.5}
    with pytest.raises(ValidationError, match="applies only with steer_positions: self_top"):
        PriorsConfig(position_fraction=0.5)
    # every field handed over (what the Dagster run config does), defaults included: still valid and default
    assert PriorsConfig.model_validate(PriorsConfig().model_dump()).option_settings() == {}
    assert PriorsConfig.model_validate(gated.model_dump()) == gated
    with pytest.raises(ValidationError, match="position_fraction"):
        PriorsConfig(steer_positions="self_top", position_fraction=0.0)
    with pytest.raises(ValidationError, match="strength_shape"):
        PriorsConfig(strength_shape="flat")
    with pytest.raises(ValidationError, match="steer_positions"):
        PriorsConfig(steer_positions="heatmap")


def _run(tiny_pipe, raw_stats, tmp_path: Path, name: str, **options) -> dict:
    config = PriorsConfig(n_results=2, seeds=SEEDS, num_inference_steps=STEPS, batch_size=3,
                          timesteps="all_timesteps", **options)
    out = tmp_path / name
    run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [5], out, config, tmp_path)
    return read_prior(out, 5)


def _latents(tmp_path: Path, record: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(tmp_path / record["latents"]))["latents"]


def test_self_top_priors_whole_map_equals_everywhere_and_a_part_differs(tiny_pipe, raw_stats, tmp_path):
    everywhere = _run(tiny_pipe, raw_stats, tmp_path, "everywhere")
    whole = _run(tiny_pipe, raw_stats, tmp_path, "whole", steer_positions="self_top", position_fraction=1.0)
    part = _run(tiny_pipe, raw_stats, tmp_path, "part", steer_positions="self_top", position_fraction=0.25)
    profile = _run(tiny_pipe, raw_stats, tmp_path, "profile", strength_shape="activity_profile")
    assert "steer_positions" not in everywhere and "strength_shape" not in everywhere
    assert (part["steer_positions"], part["position_fraction"]) == ("self_top", 0.25)
    assert profile["strength_shape"] == "activity_profile"
    assert len({everywhere["config_hash"], whole["config_hash"], part["config_hash"], profile["config_hash"]}) == 4
    assert torch.equal(_latents(tmp_path, whole), _latents(tmp_path, everywhere))  # the mask covers every position
    assert (_latents(tmp_path, part) - _latents(tmp_path, everywhere)).abs().max() > 1e-3
    # the profile shape steers only where channel 5 is active (252..750: the steps 501), at max x scale there
    assert profile["steered_timesteps"] == [501]
    assert profile["strengths"] == pytest.approx([2.0 * profile["steer_strength_scale"]])


def test_the_dagster_run_config_builds_default_and_option_configs():
    """The run config hands every field to the core config (defaults included): the default run keeps its options
    off, a run naming the options gets them, a contradictory one fails naming the fields."""
    import dagster as dg

    from ddr_assets.configs import with_variant_overrides
    from ddr_assets.priors import PriorsRunConfig

    default = with_variant_overrides(PriorsRunConfig(), PriorsConfig, {"steer_strength_scale": 15.0}, asset="priors")
    assert default.option_settings() == {} and default.steer_strength_scale == 15.0
    gated = with_variant_overrides(PriorsRunConfig(steer_positions="self_top", position_fraction=0.5), PriorsConfig,
                                   {}, asset="priors")
    assert gated.option_settings() == {"steer_positions": "self_top", "position_fraction": 0.5}
    with pytest.raises(dg.Failure, match="position_fraction"):
        with_variant_overrides(PriorsRunConfig(position_fraction=0.5), PriorsConfig, {}, asset="priors")
