"""Dream objectives and starts of issue 14 item 3: the SAE pre-activation objective, regenerating a captured
generation from its recorded seed, ``start: example`` (feature accentuation) and config-hash stability."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddr_core.activation_store import ActivationStore
from ddr_core.activations import CaptureConfig, run_capture
from ddr_core.basis import RawChannels, TopKSaeBasis
from ddr_core.dreams import DreamConfig, DreamObjective, optimise_dreams, run_dreams
from ddr_core.families import as_model
from ddr_core.regenerate import example_starts, read_generations, regenerate_latents, top_example_generations
from ddr_core.sae import Sae, SaeConfig, load_sae
from ddr_core.sae_unbox import UnboxSae, UnboxSaeBasis, UnboxSaeConfig
from ddr_core.tiny_model import TINY_PROMPTS, TINY_TARGET_LAYER

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the pre-activation objective ---------------------------------------------------------------


def _inactive_topk_sae() -> TopKSaeBasis:
    """A hand-made 4 -> 3 TopK SAE whose feature 0 reads input 0 with bias -10: inactive on any input
    with |x_0| < 10."""
    sae = Sae(SaeConfig(d_in=4, num_latents=3, k=1))
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.weight[0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
        sae.encoder.bias.copy_(torch.tensor([-10.0, 0.0, 0.0]))
        sae.b_dec.zero_()
    return TopKSaeBasis(sae)


def _inactive_unbox_sae() -> UnboxSaeBasis:
    sae = UnboxSae(UnboxSaeConfig(n_dirs_local=3, d_model=4, k=1))
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.weight[0] = torch.tensor([2.0, 0.0, 0.0, 0.0])
        sae.latent_bias.copy_(torch.tensor([-10.0, 0.0, 0.0]))
        sae.pre_bias.zero_()
    return UnboxSaeBasis(sae)


@pytest.mark.parametrize("make_basis", [_inactive_topk_sae, _inactive_unbox_sae], ids=["topk", "sdxl-unbox"])
def test_pre_activation_has_a_gradient_where_the_feature_is_inactive(make_basis):
    basis = make_basis()
    # layer output (n=1, C=4, H=1, W=5): 5 positions, input 0 between -1 and 1, so pre = 2 x_0 - 10 < 0
    layer = torch.tensor([[[[-1.0, -0.5, 0.0, 0.5, 1.0]], [[3.0] * 5], [[0.0] * 5], [[1.0] * 5]]],
                         requires_grad=True)
    objective = DreamObjective(torch.tensor([0]), basis)
    maximised, activation = objective.targets(layer, kind="activation")
    (grad,) = torch.autograd.grad(maximised.sum(), layer)
    assert float(activation.detach()) == 0.0 and torch.count_nonzero(grad) == 0  # the ReLU passes nothing
    maximised, activation = objective.targets(layer, kind="pre_activation")
    assert float(activation.detach()) == 0.0  # what is reported stays the real (post-ReLU) activation
    assert float(maximised.detach()) == pytest.approx(2 * 0.0 - 10.0)  # mean of 2 x_0 - 10 over the positions
    (grad,) = torch.autograd.grad(maximised.sum(), layer)
    expected = torch.zeros_like(layer)
    expected[0, 0] = 2.0 / 5  # d mean(2 x_0 - 10) / d x_0 at each of the 5 positions
    torch.testing.assert_close(grad, expected)
    # where the feature is active the two objectives agree (no ReLU cut)
    active = layer.detach().clone()
    active[0, 0] = 8.0
    maximised, activation = objective.targets(active, kind="pre_activation")
    assert float(maximised.detach()) == pytest.approx(6.0) and float(activation.detach()) == pytest.approx(6.0)


def test_raw_channels_pre_activation_is_the_activation():
    tokens = torch.randn(2, 5, 4)
    units = torch.tensor([1, 3])
    basis = RawChannels(4)
    torch.testing.assert_close(basis.unit_pre_activations(tokens, units), basis.unit_activations(tokens, units))


def test_an_inactive_sae_feature_is_only_dreamed_with_pre_activation(tiny_pipe, tiny_sae_dir):
    """End to end on the tiny model: an SAE feature that is 0 everywhere stays exactly where it started with
    the activation objective (no gradient; penalties and weight decay off) and moves with the pre-activation,
    whose recorded activation is still the real one (0)."""
    sae = copy.deepcopy(load_sae(tiny_sae_dir, expected_d_in=64))
    with torch.no_grad():
        sae.encoder.bias[5] = -1e4  # feature 5: inactive on any input the layer makes
    basis = TopKSaeBasis(sae)
    model = as_model(tiny_pipe)
    init = model.initial_latents([3], *model.default_size)
    quiet = {"num_steps": 3, "snapshot_every": 0, "batch_size": 1, "weight_decay": 0.0, "total_variation_weight": 0.0,
             "range_penalty_weight": 0.0, "moment_penalty_weight": 0.0, "augmentation_level": 0,
             "gradient_smoothing_sigma_start": 0.0, "timesteps": [500], "use_prior": False}
    layer = model.hook_point(TINY_TARGET_LAYER)
    results = {}
    for kind in ("activation", "pre_activation"):
        config = DreamConfig(**quiet, objective=kind)
        results[kind] = optimise_dreams(model, layer, DreamObjective(torch.tensor([5]), basis), init,
                                        torch.tensor([500]), config, [torch.Generator().manual_seed(1)])
    torch.testing.assert_close(results["activation"].latents, init)
    assert (results["pre_activation"].latents - init).abs().max() > 1e-3
    assert np.all(results["pre_activation"].history["activation"] == 0.0)
    assert np.all(results["pre_activation"].history["loss"] > 1e3)  # minus the (very negative) pre-activation


# --- the config -----------------------------------------------------------------------------------


def test_start_and_objective_at_their_defaults_keep_the_config_hash():
    """At their defaults ``start`` / ``objective`` leave the hash what it is without them (a folder dreamed before
    they existed keeps its hash; ``min_signal``, which changes what is dreamed, is part of it)."""
    from ddr_core.config import config_hash

    for config in (DreamConfig(), DreamConfig(use_prior=False), DreamConfig(num_steps=7, use_prior=False)):
        payload = config.model_dump(mode="json")
        del payload["start"], payload["objective"]
        for key in ("parameterisation", "sampler_steps", "gradient_checkpointing", "x0_projection_timestep",
                    "maco_reference_samples", "maco_reference_steps"):  # parameterisation: latent, the default
            del payload[key]
        assert config.config_hash() == config_hash(payload)
    assert DreamConfig(start="prior").config_hash() == DreamConfig().config_hash()
    assert DreamConfig(start="noise").config_hash() == DreamConfig(use_prior=False).config_hash()
    assert DreamConfig(objective="activation").config_hash() == DreamConfig().config_hash()
    hashes = {DreamConfig().config_hash(), DreamConfig(start="example").config_hash(),
              DreamConfig(objective="pre_activation").config_hash()}
    assert len(hashes) == 3


def test_start_resolves_and_refuses_a_contradiction():
    assert DreamConfig().start_from == "prior" and DreamConfig(use_prior=False).start_from == "noise"
    assert DreamConfig(start="example").start_from == "example"
    assert DreamConfig(start="noise").start_from == "noise"
    with pytest.raises(ValueError, match="contradicts start: prior"):
        DreamConfig(use_prior=False, start="prior")
    with pytest.raises(ValueError, match="needs at least as many seeds"):
        DreamConfig(start="noise", n_results=3, seeds=[1, 2])
    with pytest.raises(ValueError, match="objective"):
        DreamConfig(objective="post")


# --- regenerating a captured generation -----------------------------------------------------------


PROMPTS = list(TINY_PROMPTS[:3])
CAPTURE = {"num_images_per_prompt": 2, "batch_size": 4, "num_inference_steps": 6, "seed": 7}


@pytest.fixture(scope="module")
def capture(tiny_pipe, tmp_path_factory):
    """A tiny capture: 3 prompts x 2 images in 2 batches (so generation 5 is regenerated out of its batch)."""
    data_root = tmp_path_factory.mktemp("regen")
    root = data_root / "capture"
    result = run_capture(tiny_pipe, TINY_TARGET_LAYER, {"raw": RawChannels(None).reduce}, PROMPTS, root, data_root,
                         CaptureConfig(**CAPTURE))
    return data_root, root, result.summary


def test_regenerating_a_generation_reproduces_its_image_and_activations(tiny_pipe, capture):
    data_root, root, summary = capture
    (gen,) = read_generations(root, [5])
    assert gen.prompt == PROMPTS[2] and gen.num_inference_steps == 6 and gen.height == 64
    model = as_model(tiny_pipe)
    final = regenerate_latents(model, [gen])
    assert final.step is None and final.latents.shape == (1, *model.latent_shape(64, 64))
    captured = np.asarray(Image.open(data_root / gen.image_path).convert("RGB"), dtype=np.int16)
    again = np.asarray(model.decode(final.latents)[0].convert("RGB"), dtype=np.int16)
    assert np.abs(captured - again).max() <= 2  # the same picture (PNG rounding, batched kernels)
    assert np.abs(captured - again).mean() < 0.05
    # the latents entering step k give the captured conditional activations at that step's timestep
    parts = list(ActivationStore(root).iter_dense("raw", "conditional"))
    ids = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[2] for p in parts])[list(ids).index(5)]  # (T, C)
    for step in (0, 3, 5):
        at = regenerate_latents(model, [gen], step=step)
        assert at.timestep == summary["timesteps"][step] == model.scheduler_timesteps(6)[step]
        with torch.no_grad():
            output = model.forward_to_layer(model.hook_point(TINY_TARGET_LAYER), at.latents,
                                            torch.tensor([at.timestep]), model.encode_prompt(gen.prompt))
        from ddr_core.hooks import activation_tokens

        reduced = RawChannels(None).reduce(activation_tokens(output)).numpy()[0]
        np.testing.assert_allclose(reduced, values[step], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="step must lie in"):
        regenerate_latents(model, [gen], step=6)
    with pytest.raises(KeyError, match="not in the capture"):
        read_generations(root, [99])


# --- start: example --------------------------------------------------------------------------------


def _dataset_examples(stats_dir: Path) -> None:
    """Channel 0's top examples: generation 3 (best), then 1; channel 1: none."""
    stats_dir.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"channel": [0, 0, 0, 0, 2], "timestep": [900, 500, 500, 100, 500], "rank": [0, 0, 1, 0, 0],
                  "generation_id": [1, 3, 1, 4, 2], "activation": [1.0, 5.0, 0.5, 0.7, 1.0]},
                 schema_overrides={"channel": pl.Int32}).write_parquet(stats_dir / "dataset_examples.parquet")


def test_start_example_dreams_from_the_regenerated_top_examples(tiny_pipe, capture, tmp_path):
    _, root, _ = capture
    stats = tmp_path / "stats"
    _dataset_examples(stats)
    assert top_example_generations(stats, 0, 2) == [3, 1] and top_example_generations(stats, 1, 2) == []
    model = as_model(tiny_pipe)
    config = DreamConfig(timesteps=[400], n_results=2, num_steps=3, snapshot_every=0, batch_size=4,
                         quality_noise_draws=1, start="example")

    def start(channel: int, n: int):
        return example_starts(model, root, stats, channel, n)

    with pytest.raises(ValueError, match="start: example needs"):
        run_dreams(model, None, TINY_TARGET_LAYER, stats, None, [0], tmp_path / "none", config)
    result = run_dreams(model, None, TINY_TARGET_LAYER, stats, None, [0, 1], tmp_path / "out", config,
                        example_start=start)
    assert result.channels_done == [0] and result.channels_without_timesteps == [1]
    dream = json.loads((tmp_path / "out" / "channel_00000" / "dream.json").read_text())
    assert dream["start"] == "example" and dream["seeds"] == [3, 1] and dream["use_prior"] is False
    tensors = load_file(str(tmp_path / "out" / "channel_00000" / "t_0400" / "latents.safetensors"))
    expected = regenerate_latents(model, read_generations(root, [3, 1])).latents
    torch.testing.assert_close(tensors["initial_latents"], expected)
    assert not torch.equal(tensors["latents"], expected)  # and the optimiser moved them
    empty = json.loads((tmp_path / "out" / "channel_00001" / "dream.json").read_text())
    assert "no dataset example" in empty["skipped"]


# --- the benchmark's start-image baseline of start: example ------------------------------------------


def test_benchmark_scores_the_start_images_of_example_dreams(tmp_path):
    """dreams_example = the synthetic root's dreams (raised: channel 0 red/red, channel 1 green/red at t=519)
    started from generation 1 (red) for seed 1 and generation 2 (green) for seed 2."""
    import shutil

    from ddr_core.visual_benchmark import compute_visual_benchmark
    from tests.test_visual_benchmark import COLOURS, FAST, _metric, _png, write_root

    layout = write_root(tmp_path)
    example = layout.stage_dir("dreams_example", "toy-raw")
    shutil.copytree(layout.stage_dir("dreams", "toy-raw"), example)
    for record in example.glob("channel_*/dream.json"):
        dream = json.loads(record.read_text())
        record.write_text(json.dumps({**dream, "config": {**dream["config"], "start": "example"}}))
    generations = {1: _png(tmp_path, "outputs/default/activations/toy/images/gen_1.png", "red"),
                   2: _png(tmp_path, "outputs/default/activations/toy/images/gen_2.png", "green")}
    names = {rgb: name for name, rgb in COLOURS.items()}

    def classify(paths, families):  # the true colour of the (solid) image
        colours = [names[Image.open(tmp_path / p).convert("RGB").getpixel((0, 0))] for p in paths]
        return pl.DataFrame({"image": paths, "colour": colours, "shape": ["circle"] * len(paths),
                             "world_rmse": [0.1] * len(paths)})

    def run(images):
        stages = {s: layout.stage_dir(s, "toy-raw") for s in ("priors", "dreams", "dreams_example")}
        return compute_visual_benchmark("toy-raw", layout.data_root, layout.stage_dir("feature_concepts", "toy-raw"),
                                        stages, layout.stage_dir("visual_benchmark", "toy-raw"), FAST,
                                        classify=classify, generation_images=images).table

    table = run(generations)
    # the dreams: channel 0 red, red (1), channel 1 green, red (0.5)
    assert _metric(table, "dreams_example", "agreement_selective")["value"] == pytest.approx(0.75)
    # their starts: red (gen 1), green (gen 2) for both channels: 0.5 each
    start = _metric(table, "dreams_example", "agreement_selective_start")
    assert start["value"] == pytest.approx(0.5) and start["n"] == 2
    # dream vs start: red/red 0, red/green, green/red, red/green sqrt(2/3) each
    distance = _metric(table, "dreams_example", "distance_to_start")
    assert distance["value"] == pytest.approx(3 * np.sqrt(2 / 3) / 4) and distance["n"] == 4
    assert table.filter(pl.col("metric") == "agreement_selective_start")["method"].to_list() == ["dreams_example"]
    assert "agreement_selective_start" not in run(None)["metric"].to_list()
