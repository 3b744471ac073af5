"""Dreams that stay on the model's image manifold (issue 14 item 3): the x0-prediction, through-the-sampler and
MACO parameterisations (:mod:`ddr_core.dreams.parameterisations`), with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddr_core.basis import RawChannels
from ddr_core.dreams import DreamConfig, DreamObjective, optimise_dreams, run_dreams
from ddr_core.dreams.optimise import element_generators
from ddr_core.dreams.parameterisations import (
    MacoParameterisation,
    SamplerParameterisation,
    X0PredictionParameterisation,
    alpha_bar,
    descent_grid,
    hermitian_flip,
    maco_latent,
    predict_x0_eps,
    reference_magnitude,
    self_conjugate_mask,
)
from ddr_core.families import as_model
from ddr_core.regularisation import LatentAugmentation
from ddr_core.tiny_model import TINY_TARGET_LAYER

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(num_steps=3, learning_rate=0.05, snapshot_every=0, n_results=2, timesteps=[400],
            augmentation_level=0, quality_noise_draws=1)


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    """A float64 copy of the tiny model (finite differences need the precision; the shared pipe stays float32)."""
    from ddr_core.pipeline import load_pipeline

    pipe = load_pipeline(tiny_model_dir)
    pipe.unet.to(torch.float64)
    pipe.text_encoder.to(torch.float64)
    return as_model(pipe)


def _objective(channel: int, n: int) -> DreamObjective:
    return DreamObjective(torch.full((n,), channel, dtype=torch.long), RawChannels(64))


# --- config ------------------------------------------------------------------------------------------------


def test_sampler_needs_a_noise_start_and_latent_keeps_the_hash():
    with pytest.raises(ValueError, match="parameterisation: sampler .* needs start: noise"):
        DreamConfig(parameterisation="sampler")
    with pytest.raises(ValueError, match="parameterisation"):
        DreamConfig(parameterisation="pixels")
    assert DreamConfig(parameterisation="sampler", start="noise").start_from == "noise"
    # parameterisation: latent (with any manifold settings) hashes like a config from before they existed
    assert DreamConfig(parameterisation="latent", sampler_steps=9).config_hash() == DreamConfig().config_hash()
    assert DreamConfig().config_hash() == "ea8b39d40b704cca"  # the starting commit's hash of the defaults
    hashes = {DreamConfig(parameterisation=p).config_hash() for p in ("latent", "x0_prediction", "maco")}
    assert len(hashes) == 3


# --- x0_prediction -----------------------------------------------------------------------------------------


def test_x0_parameterisation_projects_through_the_denoiser_and_renoises_to_t(tiny_pipe):
    model = as_model(tiny_pipe)
    config = DreamConfig(parameterisation="x0_prediction", **FAST)
    timesteps = torch.tensor([400, 700])
    seeds = [11, 12]
    context = model.encode_prompt("")
    param = X0PredictionParameterisation(model, timesteps, element_generators(seeds), context, config)
    z = model.initial_latents([1, 2], *model.default_size)
    params = param.init(z)
    rows = torch.arange(2)
    # the projection: x0 = D(sqrt(ab_s) z + sqrt(1 - ab_s) eps1, s) with s = t and eps1 from the seed + 1 stream
    eps1 = torch.cat([torch.randn((1, *z.shape[1:]), generator=torch.Generator().manual_seed(s + 1)) for s in seeds])
    ab = alpha_bar(model, timesteps)[:, None, None, None]
    expected_x0, _ = predict_x0_eps(model, ab.sqrt() * z + (1 - ab).sqrt() * eps1, timesteps, context.expand(2))
    # re-noised to t with fresh noise from the element's own stream
    rendered = param.render(params, rows, LatentAugmentation.preset(0), element_generators(seeds))
    eps2 = torch.cat([torch.randn((1, *z.shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.testing.assert_close(rendered.clean, expected_x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rendered.layer_input, ab.sqrt() * expected_x0 + (1 - ab).sqrt() * eps2,
                               rtol=1e-4, atol=1e-5)
    # a fixed projection timestep is used for every element; the layer still sees each element's own t
    fixed = X0PredictionParameterisation(model, timesteps, element_generators(seeds), context,
                                         DreamConfig(parameterisation="x0_prediction", x0_projection_timestep=100))
    fixed.init(z)
    assert fixed.projection.tolist() == [100, 100]
    ab100 = alpha_bar(model, torch.tensor([100, 100]))[:, None, None, None]
    x0_100, _ = predict_x0_eps(model, ab100.sqrt() * z + (1 - ab100).sqrt() * eps1, torch.tensor([100, 100]),
                               context.expand(2))
    torch.testing.assert_close(fixed.picture(params), x0_100, rtol=1e-4, atol=1e-5)


def test_v_prediction_x0_and_eps_invert_the_forward_process(tiny_pipe):
    """For any model output, the (x0, eps) of the prediction rebuild x_t exactly (both prediction types)."""
    model = as_model(tiny_pipe)
    context = model.encode_prompt("").expand(2)
    x_t = model.initial_latents([5, 6], *model.default_size)
    t = torch.tensor([300, 900])
    ab = alpha_bar(model, t)[:, None, None, None]
    for kind in ("epsilon", "v_prediction"):
        tiny_pipe.scheduler.register_to_config(prediction_type=kind)
        try:
            x0, eps = predict_x0_eps(model, x_t, t, context)
        finally:
            tiny_pipe.scheduler.register_to_config(prediction_type="epsilon")
        torch.testing.assert_close(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, x_t, rtol=1e-4, atol=1e-4)


# --- sampler -----------------------------------------------------------------------------------------------


def test_descent_grid_runs_from_the_top_to_each_rows_timestep():
    grid = descent_grid(torch.tensor([999, 999]), torch.tensor([519, 19]), 4)
    assert grid[0].tolist() == [999, 999] and grid[-1].tolist() == [519, 19]
    assert grid[:, 0].tolist() == [999, 879, 759, 639, 519]
    assert (grid[1:] <= grid[:-1]).all()


def test_through_sampler_gradient_equals_a_finite_difference(model64):
    """d activation(x_t(x_T)) / d x_T along a direction, by autograd through 3 checkpointed DDIM steps, equals the
    central finite difference of the same function (float64)."""
    model = model64
    config = DreamConfig(parameterisation="sampler", start="noise", sampler_steps=3, gradient_checkpointing=True)
    timesteps = torch.tensor([500])
    context = model.encode_prompt("")
    param = SamplerParameterisation(model, timesteps, element_generators([0]), context, config)
    layer = model.hook_point(TINY_TARGET_LAYER)
    rows = torch.arange(1)

    def channel(output: torch.Tensor) -> torch.Tensor:  # channel 3's spatial mean, in float64
        return output[0, 3].mean()

    def f(x: torch.Tensor) -> torch.Tensor:
        x_t = param.at_t(x, rows)
        return channel(model.forward_to_layer(layer, x_t, timesteps, context.expand(1)))

    x = model.initial_latents([7], *model.default_size, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        numeric = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
    analytic = (grad * direction).sum()
    assert f(x).dtype == torch.float64
    assert analytic.abs() > 1e-6
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)
    # checkpointing changes memory, not the gradient
    plain = SamplerParameterisation(model, timesteps, element_generators([0]), context,
                                    DreamConfig(parameterisation="sampler", start="noise", sampler_steps=3,
                                                gradient_checkpointing=False))
    y = x.detach().clone().requires_grad_(True)
    out = channel(model.forward_to_layer(layer, plain.at_t(y, rows), timesteps, context.expand(1)))
    (grad_plain,) = torch.autograd.grad(out, y)
    torch.testing.assert_close(grad, grad_plain)


def test_sampler_trajectory_reaches_the_dream_timestep(tiny_pipe):
    """With one step the trajectory's x_t is DDIM's jump from x_T at 999 to t (computed by hand)."""
    model = as_model(tiny_pipe)
    context = model.encode_prompt("")
    t = torch.tensor([600])
    param = SamplerParameterisation(model, t, element_generators([0]), context,
                                    DreamConfig(parameterisation="sampler", start="noise", sampler_steps=1))
    x_T = model.initial_latents([9], *model.default_size)
    x0, eps = predict_x0_eps(model, x_T, torch.tensor([999]), context.expand(1))
    ab = alpha_bar(model, t)[:, None, None, None]
    with torch.no_grad():
        torch.testing.assert_close(param.at_t(x_T, torch.arange(1)), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


# --- MACO --------------------------------------------------------------------------------------------------


def test_maco_latent_is_real_and_keeps_the_magnitude_spectrum_exactly():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn((3, 4, 8, 6), generator=generator, dtype=torch.float64)
    magnitude = torch.fft.fft2(reference, norm="ortho").abs().mean(0)
    magnitude = (magnitude + hermitian_flip(magnitude)) / 2
    phase = torch.rand((2, 4, 8, 6), generator=generator, dtype=torch.float64) * 6.3 - 3.15
    mask = self_conjugate_mask(8, 6)
    flips = torch.where(torch.rand((2, 4, 8, 6), generator=generator) < 0.5, -1.0, 1.0).double()
    signs = torch.where(mask, flips, torch.ones_like(flips))  # a sign only where there is no phase
    latent = maco_latent(phase, magnitude, signs)
    assert latent.dtype == torch.float64 and latent.shape == (2, 4, 8, 6)
    spectrum = torch.fft.fft2(latent, norm="ortho")
    torch.testing.assert_close(spectrum.abs(), magnitude.expand_as(spectrum.real), rtol=1e-10, atol=1e-12)
    assert mask.sum() == 4 and mask[0, 0] and mask[4, 3] and mask[0, 3] and mask[4, 0]
    # self-conjugate frequencies keep their sign; elsewhere the phase is the antisymmetric part
    assert torch.equal(torch.sign(spectrum.real[..., mask]), signs[..., mask])


def test_maco_dreams_keep_the_reference_spectrum(tiny_pipe, tmp_path):
    model = as_model(tiny_pipe)
    magnitude = reference_magnitude(model, samples=3, steps=2)
    assert torch.allclose(magnitude, hermitian_flip(magnitude))
    config = DreamConfig(parameterisation="maco", use_prior=False, **FAST)
    start = model.initial_latents([1, 2], *model.default_size)
    result = optimise_dreams(model, TINY_TARGET_LAYER, _objective(0, 2), start, [400, 400], config,
                             element_generators([1, 2]), maco_magnitude=magnitude)
    for latents in (result.latents, result.initial_latents):
        torch.testing.assert_close(torch.fft.fft2(latents, norm="ortho").abs(), magnitude.expand_as(latents),
                                   rtol=1e-4, atol=1e-5)
    assert not torch.equal(result.latents, result.initial_latents)  # the phase moved
    # the start's phase is kept: the initial picture correlates with the start
    assert torch.corrcoef(torch.stack([result.initial_latents.flatten(), start.flatten()]))[0, 1] > 0.5
    param = MacoParameterisation(model, torch.tensor([400]), element_generators([0]), model.encode_prompt(""),
                                 config, magnitude)
    with pytest.raises(RuntimeError, match="init must run"):
        param.picture(torch.zeros(1, 4, 8, 8))


# --- the run -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["x0_prediction", "sampler", "maco"])
def test_run_dreams_writes_the_pictures_and_their_starts(tiny_pipe, tmp_path: Path, kind):
    model = as_model(tiny_pipe)
    config = DreamConfig(parameterisation=kind, use_prior=False, sampler_steps=2, maco_reference_samples=2,
                         maco_reference_steps=2, **FAST)
    result = run_dreams(model, None, TINY_TARGET_LAYER, None, None, [0], tmp_path / kind, config)
    assert result.channels_done == [0] and not result.failures
    folder = tmp_path / kind / "channel_00000"
    dream = json.loads((folder / "dream.json").read_text())
    assert dream["config"]["parameterisation"] == kind
    tensors = load_file(str(folder / "t_0400" / "latents.safetensors"))
    noise = model.initial_latents(config.seeds[:2], *model.default_size)
    # the recorded start is the start's picture (not the raw noise), the final latents are finite pictures
    assert not torch.allclose(tensors["initial_latents"], noise)
    assert torch.isfinite(tensors["latents"]).all() and tensors["latents"].shape == noise.shape
    assert (folder / "t_0400" / f"seed_{config.seeds[0]}.png").is_file()


def test_flux_cannot_run_the_manifold_parameterisations():
    from ddr_core.dreams.parameterisations import check_parameterisation

    class NoUnet:
        name = "flux"
        pipe = type("Pipe", (), {"transformer": object(), "scheduler": object()})()

    check_parameterisation(NoUnet(), "latent")
    for kind in ("x0_prediction", "sampler", "maco"):
        with pytest.raises(ValueError, match="DDPM-style UNet family"):
            check_parameterisation(NoUnet(), kind)


# --- the benchmark rows ------------------------------------------------------------------------------------


def test_benchmark_scores_the_manifold_methods_with_todays_metrics(tmp_path):
    """Each manifold method's stage folder is scored with the same metrics as today's dreams (the synthetic
    root of tests/test_visual_benchmark.py, its dreams copied into each method's folder)."""
    import shutil

    import polars as pl
    from PIL import Image

    from ddr_core.visual_benchmark import METHODS, compute_visual_benchmark
    from tests.test_visual_benchmark import COLOURS, write_root
    from tests.test_visual_benchmark import FAST as BENCH_FAST

    layout = write_root(tmp_path)
    methods = ("dreams_x0", "dreams_sampler", "dreams_maco")
    assert set(methods) <= {m.name for m in METHODS}
    for method in methods:
        shutil.copytree(layout.stage_dir("dreams", "toy-raw"), layout.stage_dir(method, "toy-raw"))
    names = {rgb: name for name, rgb in COLOURS.items()}

    def classify(paths, families):
        colours = [names[Image.open(tmp_path / p).convert("RGB").getpixel((0, 0))] for p in paths]
        return pl.DataFrame({"image": paths, "colour": colours, "shape": ["circle"] * len(paths),
                             "world_rmse": [0.1] * len(paths)})

    stages = {s: layout.stage_dir(s, "toy-raw") for s in ("priors", "dreams", *methods)}
    table = compute_visual_benchmark("toy-raw", layout.data_root, layout.stage_dir("feature_concepts", "toy-raw"),
                                     stages, layout.stage_dir("visual_benchmark", "toy-raw"), BENCH_FAST,
                                     classify=classify).table
    dreams = table.filter(pl.col("method") == "dreams")
    for method in methods:
        rows = table.filter(pl.col("method") == method)
        assert rows["metric"].to_list() == dreams["metric"].to_list()
        # same images, same scores: the method row is the dreams row
        for metric in ("agreement_selective", "raised_share", "gain_over_start", "seed_diversity", "coverage"):
            ours, theirs = (r.filter(pl.col("metric") == metric).row(0, named=True) for r in (rows, dreams))
            assert (ours["value"], ours["p_value"], ours["n"]) == (theirs["value"], theirs["p_value"], theirs["n"])


def test_an_unknown_parameterisation_in_the_config_is_refused_at_load(tmp_path):
    """``variants.<v>.overrides.dreams.parameterisation`` is checked when the project config loads (a run config
    goes through the same DreamConfig in Dagster)."""
    from ddr_assets.dreams import DreamsRunConfig
    from ddr_core.config import ConfigError, load_project_config
    from tests.test_config import _edit

    path = _edit(tmp_path, "learning_rate: 0.02}", "learning_rate: 0.02, parameterisation: pixels}")
    with pytest.raises(ConfigError, match="dreams.parameterisation: Input should be 'latent', 'x0_prediction', "
                                          "'sampler' or 'maco'"):
        load_project_config(path)
    path = _edit(tmp_path, "learning_rate: 0.02}", "learning_rate: 0.02, parameterisation: maco}")
    assert load_project_config(path).variants["toy-raw"].overrides["dreams"]["parameterisation"] == "maco"
    assert DreamsRunConfig(parameterisation="sampler", start="noise").sampler_steps == 4
