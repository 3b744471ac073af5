"""The priors' activation gain over the unsteered generation (ddr_core.prior_gain), with answers known by hand."""

from pathlib import Path

import polars as pl
import pytest
import torch

from ddr_core.basis import RawChannels
from ddr_core.channel_store import read_prior
from ddr_core.families import as_model
from ddr_core.prior_gain import (
    GAIN_COLUMNS,
    UNSTEERED_FILE,
    activation_rows,
    measure_prior_activation,
    prior_gain_rows,
    record_prior_gain,
    unsteered_latents,
)
from ddr_core.priors import run_priors
from ddr_core.tiny_model import TINY_TARGET_LAYER
from ddr_core.visual_benchmark import VisualBenchmarkConfig, benchmark_lines
from tests.test_priors import SEEDS, STEPS, raw_stats, small_config  # noqa: F401 - raw_stats is a fixture

CONFIG = VisualBenchmarkConfig(permutations=10000, bootstrap_resamples=200)


def images(gains: dict[int, list[float]], unsteered_sd: float = 0.0, base: float = 1.0) -> pl.DataFrame:
    """Prior images of channels -> per-seed gains; unsteered activations ``base + 0.1 x seed index``."""
    rows = []
    for channel, per_seed in gains.items():
        for index, gain in enumerate(per_seed):
            unsteered = base + 0.1 * index
            rows.append({"channel": channel, "timestep": None, "seed": index, "image": f"c{channel}s{index}.png",
                         "gain_timestep": 500, "gain_noise_draws": 4, "steered_activation": unsteered + gain,
                         "unsteered_activation": unsteered, "unsteered_draw_sd": unsteered_sd})
    schema = {"channel": pl.Int32, "timestep": pl.Int64, "seed": pl.Int64, "image": pl.String, **GAIN_COLUMNS}
    return pl.DataFrame(rows, schema=schema, orient="row")


def metrics(rows: list[dict]) -> dict[str, dict]:
    return {r["metric"]: r for r in rows}


def test_a_known_constant_gain_is_that_gain_and_raised():
    # every prior adds 0.5 to its channel; the unsteered activations spread 0.1 apart over 3 seeds (sd 0.1)
    m = metrics(prior_gain_rows(images({c: [0.5, 0.5, 0.5] for c in range(4)}), CONFIG))
    gain = m["gain_over_unsteered"]
    assert gain["value"] == pytest.approx(0.5) and gain["low"] == pytest.approx(0.5)
    assert gain["high"] == pytest.approx(0.5) and gain["n"] == 12 and gain["chance"] == 0.0
    assert gain["p_value"] == pytest.approx(1 / 16)  # 4 channels all positive: only the all-plus flip reaches it
    assert m["raised_over_unsteered_share"]["value"] == 1.0
    assert m["channels_gaining"]["value"] == 4 and m["channels_gaining"]["n"] == 4


def test_zero_steering_gains_nothing_and_is_not_raised():
    m = metrics(prior_gain_rows(images({c: [0.0, 0.0, 0.0] for c in range(4)}), CONFIG))
    assert m["gain_over_unsteered"]["value"] == 0.0 and m["gain_over_unsteered"]["p_value"] == 1.0
    assert m["raised_over_unsteered_share"]["value"] == 0.0
    assert m["channels_gaining"]["value"] == 0


def test_a_gain_within_the_unsteered_noise_is_not_raised():
    # gain 0.05 < sd 0.1 of the unsteered activation over seeds: positive, counted as gaining, but not raised
    m = metrics(prior_gain_rows(images({c: [0.05, 0.05, 0.05] for c in range(3)}), CONFIG))
    assert m["gain_over_unsteered"]["value"] == pytest.approx(0.05)
    assert m["raised_over_unsteered_share"]["value"] == 0.0 and m["channels_gaining"]["value"] == 3


def test_p_of_a_hand_made_sign_pattern():
    # channel mean gains 1, 2, 4, -1: of the 16 sign vectors, (+,+,+,+) 8, (+,+,+,-) 6 and (-,+,+,+) 6 reach the
    # observed sum 6, so p = 3/16; channels gaining 3 of 4
    m = metrics(prior_gain_rows(images({0: [1.0, 1.0], 1: [2.0, 2.0], 2: [4.0, 4.0], 3: [-1.0, -1.0]}), CONFIG))
    assert m["gain_over_unsteered"]["p_value"] == pytest.approx(3 / 16)
    assert m["gain_over_unsteered"]["value"] == pytest.approx(1.5)
    assert m["channels_gaining"]["value"] == 3 and m["channels_gaining"]["n"] == 4


def test_priors_without_a_measurement_are_reported_as_not_measured():
    old = images({0: [1.0]}).with_columns(pl.lit(None, pl.Float64).alias("steered_activation"))
    m = metrics(prior_gain_rows(old, CONFIG))
    assert m["gain_over_unsteered"]["value"] is None and "not measured" in m["gain_over_unsteered"]["note"]
    assert activation_rows(3, {"seeds": [1, 2]}) == [dict.fromkeys(GAIN_COLUMNS)] * 2


def test_benchmark_line_shows_the_prior_gain_as_text():
    rows = prior_gain_rows(images({0: [1.0, 1.0], 1: [2.0, 2.0], 2: [4.0, 4.0], 3: [-1.0, -1.0]}), CONFIG)
    table = pl.DataFrame([{"variant": "toy-raw", "method": "priors", "settings": "{}", **r} for r in rows])
    (line,) = benchmark_lines(table)
    assert "gain over unsteered 1.500" in line and "(p 0.19)" in line and "channels gaining 3 of 4" in line


def test_measurement_of_an_added_constant_and_of_zero_steering(tiny_pipe):
    """Through the real measurement: identical steered and unsteered latents gain exactly 0; a hook adding 0.75 to
    channel 5 of the steered elements only (the first n of each draw's 2n measured elements) gains exactly 0.75."""
    model = as_model(tiny_pipe)
    width = model.layer_width(TINY_TARGET_LAYER)
    latents = torch.randn(2, *model.latent_shape(*model.default_size), generator=torch.Generator().manual_seed(0))
    basis = RawChannels(width)
    zero = measure_prior_activation(model, basis, TINY_TARGET_LAYER, 5, latents, latents.clone(), 501, SEEDS, 3)
    assert zero["steered"] == zero["unsteered"] and zero["noise_draws"] == 3 and zero["timestep"] == 501
    assert all(sd > 0 for sd in zero["unsteered_draw_sd"])  # the draws differ, shared by each pair

    point = model.hook_point(TINY_TARGET_LAYER)

    def add(args, kwargs, output):
        tensor = point.read(args, kwargs, output).clone()
        steered = (torch.arange(tensor.shape[0]) % (2 * len(SEEDS))) < len(SEEDS)  # per draw: steered, unsteered
        tensor[steered, 5] += 0.75  # (B, C, H, W)
        return point.write(args, kwargs, output, tensor)

    handle = point.register(add)
    try:
        added = measure_prior_activation(model, basis, TINY_TARGET_LAYER, 5, latents, latents.clone(), 501, SEEDS, 3)
    finally:
        handle.remove()
    assert [s - u for s, u in zip(added["steered"], added["unsteered"], strict=True)] == pytest.approx([0.75] * 2)
    assert added["unsteered"] == pytest.approx(zero["unsteered"])
    assert measure_prior_activation(model, basis, TINY_TARGET_LAYER, 5, latents, latents, None, SEEDS, 3)[
        "timestep"] is None


def test_run_priors_records_the_gain_once_and_backfills_old_priors(tiny_pipe, raw_stats, tmp_path):  # noqa: F811
    root = tmp_path
    out = root / "priors"
    result = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [0, 5, 9], out, small_config(), root)
    assert result.done == [0, 5]
    prior = read_prior(out, 5)
    activation = prior["activation"]
    assert activation["timestep"] == 501 and activation["noise_draws"] == 4  # channel 5's one peak
    assert len(activation["steered"]) == len(SEEDS) == len(activation["unsteered"])
    assert "activation" not in read_prior(out, 9)  # skipped (inactive): nothing generated, nothing measured
    # the unsteered generations: one file for the folder, the same latents a zero-strength generation gives
    saved = unsteered_latents(as_model(tiny_pipe), TINY_TARGET_LAYER, out, prior["config_hash"], SEEDS,
                              num_inference_steps=STEPS, height=prior["height"], width=prior["width"], batch_size=3)
    assert (out / UNSTEERED_FILE).is_file() and saved.shape[0] == len(SEEDS)
    # the recorded unsteered activations are the unsteered generations' (every channel shares them)
    model = as_model(tiny_pipe)
    again = measure_prior_activation(model, RawChannels(model.layer_width(TINY_TARGET_LAYER)), TINY_TARGET_LAYER, 5,
                                     saved, saved, 501, SEEDS, 4)
    assert again["unsteered"] == pytest.approx(activation["unsteered"], abs=1e-5)

    # a prior made before the measurement (no "activation"): the next run adds it, nothing regenerated
    import json

    path = Path(out) / "channel_00000" / "prior.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "activation"}
    path.write_text(json.dumps(old))
    latents_before = (Path(out) / "channel_00000" / "latents.safetensors").read_bytes()
    unsteered_made = (out / UNSTEERED_FILE).stat().st_mtime_ns
    rerun = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [0, 5, 9], out, small_config(), root)
    assert rerun.done == [] and sorted(rerun.resumed) == [0, 5, 9]
    assert read_prior(out, 0)["activation"]["unsteered"] is not None
    assert (Path(out) / "channel_00000" / "latents.safetensors").read_bytes() == latents_before
    assert (out / UNSTEERED_FILE).stat().st_mtime_ns == unsteered_made  # made once per folder and settings
    # and with nothing to add, record_prior_gain measures nothing
    assert record_prior_gain(model, None, TINY_TARGET_LAYER, raw_stats, out, [0, 5, 9], 4) == []
    # gain_noise_draws = 0: not measured
    bare = run_priors(tiny_pipe, None, TINY_TARGET_LAYER, raw_stats, [5], root / "bare", small_config(gain_noise_draws=0),
                      root)
    assert bare.done == [5] and "activation" not in read_prior(root / "bare", 5)
