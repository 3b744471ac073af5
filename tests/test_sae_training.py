"""Per-position vector collection on the tiny model, and TopK SAE training on data with a known dictionary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddr_core.basis import RawChannels
from ddr_core.families import as_model
from ddr_core.hooks import TimestepTracker, capture_activations
from ddr_core.pipeline import resolve_layer
from ddr_core.sae import find_sae_folder, load_sae
from ddr_core.sae_training import (
    SaeTrainingConfig,
    VectorSamplingConfig,
    collect_layer_vectors,
    evaluate_sae,
    geometric_median,
    load_vectors,
    main,
    maybe_collect_layer_vectors,
    save_trained_sae,
    split_by_generation,
    topk_sae_losses,
    train_sae,
    write_vector_batch,
)
from ddr_core.tiny_model import TINY_TARGET_LAYER

PROMPTS = ["a red circle on a black background", "a blue square on a white background"]
STEPS = 3


def _generate(pipe, ids, sampling, guidance_scale=2.0, with_means=False):
    layer = resolve_layer(pipe.unet, TINY_TARGET_LAYER)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = as_model(pipe).initial_latents([100 + g for g in ids], size, size)
    cfg = guidance_scale > 1
    with TimestepTracker(pipe.unet) as tracker, collect_layer_vectors(
        layer, tracker, cfg, sampling, ids
    ) as recorded, capture_activations(layer, tracker, {"mean": RawChannels(None).reduce}, cfg=cfg) as means, \
            torch.inference_mode():
        pipe(prompt=[PROMPTS[g % 2] for g in ids], latents=latents, height=size, width=size,
             num_inference_steps=STEPS, guidance_scale=guidance_scale, output_type="latent")
    return (recorded, means) if with_means else recorded


def test_collects_every_position_vector_of_both_halves(tiny_pipe) -> None:
    layer = resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    recorded, means = _generate(tiny_pipe, [0, 1], VectorSamplingConfig(dtype="float32"), with_means=True)
    assert not layer._forward_hooks  # both hooks removed
    data = recorded.stacked()
    width = data["vectors"].shape[1]
    positions = int(data["positions"].max()) + 1
    assert width == 64 and positions > 1
    assert data["vectors"].shape[0] == STEPS * 2 * 2 * positions  # steps x halves x batch x positions
    assert sorted(set(data["halves"].tolist())) == [0, 1]
    assert data["timesteps"].tolist()[0] == means.timesteps[0]
    # the conditional vectors of (step, row) average to the spatial mean capture_activations recorded
    conditional = means.conditional["mean"]  # (steps, batch, channels)
    for step in range(STEPS):
        for row in range(2):
            mask = (data["steps"] == step) & (data["rows"] == row) & (data["halves"] == 1)
            assert mask.sum() == positions
            torch.testing.assert_close(data["vectors"][mask].mean(dim=0), conditional[step, row])


def test_hook_is_removed_when_the_generation_fails(tiny_pipe) -> None:
    layer = resolve_layer(tiny_pipe.unet, TINY_TARGET_LAYER)
    with pytest.raises(RuntimeError, match="boom"):
        with TimestepTracker(tiny_pipe.unet) as tracker, collect_layer_vectors(layer, tracker, cfg=False):
            raise RuntimeError("boom")
    assert not layer._forward_hooks
    with maybe_collect_layer_vectors(layer, None, cfg=False, sampling=None) as nothing:  # type: ignore[arg-type]
        assert nothing is None
    assert not layer._forward_hooks


def test_position_subsets_depend_on_the_generation_not_the_batch(tiny_pipe) -> None:
    sampling = VectorSamplingConfig(positions_per_call=3, every_n_timesteps=2, halves="conditional", seed=7)
    together = _generate(tiny_pipe, [4, 5], sampling).stacked()
    alone = _generate(tiny_pipe, [5], sampling).stacked()
    assert sorted(set(together["steps"].tolist())) == [0, 2]  # every 2nd step of 3
    assert set(together["halves"].tolist()) == {1}
    assert together["vectors"].shape[0] == 2 * 2 * 3
    of_5 = together["rows"] == 1
    assert torch.equal(together["positions"][of_5], alone["positions"])
    torch.testing.assert_close(together["vectors"][of_5].float(), alone["vectors"].float(), atol=2e-3, rtol=2e-3)


def test_vector_batches_round_trip(tiny_pipe, tmp_path: Path) -> None:
    sampling = VectorSamplingConfig(positions_per_call=4)
    for batch_index, ids in enumerate(([0, 1], [2, 3])):
        recorded = _generate(tiny_pipe, ids, sampling)
        path = write_vector_batch(tmp_path / "sae_vectors", batch_index, recorded, ids, TINY_TARGET_LAYER)
        assert path.name == f"batch_{batch_index:05d}.safetensors"
    data = load_vectors([tmp_path])  # a capture folder: finds sae_vectors/
    assert data.layer == TINY_TARGET_LAYER and data.width == 64
    assert data.vectors.dtype == torch.float32 and data.vectors.shape[0] == 2 * 2 * STEPS * 2 * 4
    assert sorted(set(data.generation_ids.tolist())) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not 'down_blocks.0'"):
        load_vectors([tmp_path], "down_blocks.0")
    with pytest.raises(FileNotFoundError, match="collect them"):
        load_vectors([tmp_path / "nowhere"])


# --- training ------------------------------------------------------------------------------------------


def _sparse_data(n: int = 6000, d_in: int = 16, atoms: int = 32, active: int = 2, seed: int = 0):
    """Vectors that are exactly ``active``-sparse in a unit-norm dictionary of ``atoms`` rows (+ offset)."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d_in, generator=generator)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, atoms)
    chosen = torch.stack([torch.randperm(atoms, generator=generator)[:active] for _ in range(n)])
    codes.scatter_(1, chosen, 1.0 + torch.rand(n, active, generator=generator) * 2)
    offset = torch.randn(d_in, generator=generator)
    return codes @ dictionary + offset, torch.arange(n) // 20


def test_geometric_median_resists_an_outlier() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    median = geometric_median(points, iterations=200)
    assert median.norm() < 1.5 < points.mean(dim=0).norm()


def test_split_holds_out_whole_generations() -> None:
    ids = torch.arange(100) // 10
    train, held_out = split_by_generation(ids, 0.2, seed=3)
    assert held_out.sum() == 20 and not (set(ids[train].tolist()) & set(ids[held_out].tolist()))
    assert torch.equal(held_out, split_by_generation(ids, 0.2, seed=3)[1])


def test_training_recovers_a_sparse_dictionary_and_is_deterministic(tmp_path: Path) -> None:
    vectors, ids = _sparse_data()
    config = SaeTrainingConfig(num_latents=48, k=2, steps=600, batch_size=256, learning_rate=5e-3,
                               lr_warmup_steps=20, dead_feature_threshold=5000, log_every=100, seed=1)
    first = train_sae(vectors, config, ids)
    report = first.report
    assert report["eval"]["fve"] > 0.9, report["eval"]
    assert report["train"]["fve"] > 0.9
    assert report["vectors"]["eval_generations"] == 30 and report["vectors"]["train"] + report["vectors"]["eval"] == 6000
    assert report["curve"][-1]["fvu"] < report["curve"][0]["fvu"] / 4
    norms = first.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    second = train_sae(vectors, config, ids)
    for name, tensor in first.sae.state_dict().items():
        assert torch.equal(tensor, second.sae.state_dict()[name]), name

    folder = save_trained_sae(first, tmp_path / "sae", TINY_TARGET_LAYER)
    assert find_sae_folder(tmp_path / "sae", TINY_TARGET_LAYER) == folder
    loaded = load_sae(folder, expected_d_in=16)
    assert loaded.cfg.k == 2 and loaded.num_latents == 48 and loaded.cfg.normalize_decoder
    again = evaluate_sae(loaded, vectors[:500])
    assert again["fve"] == pytest.approx(evaluate_sae(first.sae, vectors[:500])["fve"], abs=1e-6)
    saved = json.loads((tmp_path / "sae" / "training_report.json").read_text())
    assert saved["layer"] == TINY_TARGET_LAYER and saved["eval"]["fve"] == pytest.approx(report["eval"]["fve"])


def test_auxiliary_loss_trains_only_dead_latents() -> None:
    vectors, _ = _sparse_data(n=512, seed=2)
    sae = train_sae(vectors, SaeTrainingConfig(num_latents=32, k=2, steps=5, learning_rate=1e-3,
                                               eval_fraction=0.0)).sae
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7, 11, 20]] = True
    sae.train()
    fvu, auxk, indices = topk_sae_losses(sae, vectors, 2, dead, k_aux=3)
    assert indices.shape == (512, 2) and auxk > 0
    auxk.backward()
    touched_encoder = sae.encoder.weight.grad.abs().sum(dim=1) > 0
    touched_decoder = sae.W_dec.grad.abs().sum(dim=1) > 0
    assert touched_encoder.any() and not (touched_encoder & ~dead).any()
    assert touched_decoder.any() and not (touched_decoder & ~dead).any()
    _, no_aux, _ = topk_sae_losses(sae, vectors, 2, None, k_aux=3)
    assert no_aux == 0 and fvu > 0
    with_aux = train_sae(vectors, SaeTrainingConfig(num_latents=96, k=2, steps=60, batch_size=128,
                                                    dead_feature_threshold=256, eval_fraction=0.0,
                                                    log_every=10)).report
    assert any(point["dead"] > 0 and point["auxk"] > 0 for point in with_aux["curve"])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        train_sae(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), SaeTrainingConfig(k=1, steps=1))
    with pytest.raises(ValueError, match="k=9 exceeds"):
        train_sae(torch.randn(10, 2), SaeTrainingConfig(expansion_factor=4, k=9, steps=1))


def test_cli_trains_from_a_capture_folder(tiny_pipe, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recorded = _generate(tiny_pipe, [0, 1], VectorSamplingConfig())
    write_vector_batch(tmp_path / "capture" / "sae_vectors", 0, recorded, [0, 1], TINY_TARGET_LAYER)
    assert main(["train", "--activations-dir", str(tmp_path / "capture"), "--out", str(tmp_path / "sae"),
                 "--expansion-factor", "2", "--k", "4", "--steps", "20", "--batch-size", "64",
                 "--eval-fraction", "0.5"]) == 0
    sae = load_sae(find_sae_folder(tmp_path / "sae", TINY_TARGET_LAYER), expected_d_in=64)
    assert sae.num_latents == 128 and sae.cfg.k == 4
    out = capsys.readouterr().out
    assert "eval FVE" in out and '"num_latents": 128' in out
    report = json.loads((tmp_path / "sae" / "training_report.json").read_text())
    assert report["vectors"]["eval_generations"] == 1 and 0 <= report["eval"]["dead_fraction"] <= 1


def test_capture_cli_uses_the_activations_stage_for_a_raw_variant(tmp_path: Path) -> None:
    """``capture --variant tiny-raw``: the activations stage's own capture (no SAE needed), vectors kept."""
    from ddr_core.activation_store import ActivationStore

    assert main(["capture", "--variant", "tiny-raw", "--data-root", str(tmp_path), "--images-per-prompt", "1",
                 "--steps", "2", "--batch-size", "16", "--guidance-scale", "2", "--positions-per-call", "3"]) == 0
    root = tmp_path / "outputs" / "sae-training" / "activations" / "tiny"
    store = ActivationStore(root)
    assert store.finished_batches()  # a complete capture the statistics could read
    data = load_vectors([root / "sae_vectors"], TINY_TARGET_LAYER)
    generations = store.read_generations().height
    assert data.width == 64 and data.vectors.shape[0] == generations * 2 * 2 * 3  # steps x halves x positions
    with pytest.raises(ValueError, match="raw layer"):
        main(["capture", "--variant", "tiny-sae", "--data-root", str(tmp_path)])
