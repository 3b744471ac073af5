"""The toy world: deterministic rendering, labels that match the pixels, prompts in the vocabulary,
and the toy training script end to end (a few steps) into a loadable diffusers folder."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from ddr_core.toy_world import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    SHAPES,
    ToyScene,
    ToyWorldConfig,
    images_to_tensor,
    make_dataset,
    parse_prompt,
    render_scene,
    render_scenes,
    sample_scenes,
    world_prompts,
    world_vocabulary,
)


def test_same_seed_gives_identical_images_and_other_seed_differs() -> None:
    first = render_scenes(sample_scenes(40, seed=3))
    second = render_scenes(sample_scenes(40, seed=3))
    other = render_scenes(sample_scenes(40, seed=4))
    assert first.dtype == np.uint8 and first.shape == (40, 32, 32, 3)
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


def test_scenes_are_balanced_over_every_combination() -> None:
    scenes = sample_scenes(72, seed=0)
    counts = Counter((s.background, s.colour, s.shape) for s in scenes)
    assert len(counts) == len(BACKGROUNDS) * len(COLOURS) * len(SHAPES) == 36
    assert set(counts.values()) == {2}


def test_labels_match_the_pixels() -> None:
    config = ToyWorldConfig()
    for scene in sample_scenes(36, seed=1, config=config):
        image = render_scene(scene, config).astype(int)
        # The corner is background (shapes keep a margin), the centre pixel is the shape colour.
        assert tuple(image[0, 0]) == BACKGROUND_RGB[scene.background]
        centre = image[int(scene.center_y), int(scene.center_x)]
        assert np.abs(centre - np.array(scene.rgb)).max() <= 1, scene
        labels = scene.label_indices()
        assert CONCEPTS["colour"][labels["colour"]] == scene.colour
        assert CONCEPTS["shape"][labels["shape"]] == scene.shape


def test_shapes_have_their_expected_area() -> None:
    """Circle, square and triangle of one radius cover the areas their geometry predicts."""
    config = ToyWorldConfig(image_size=64, supersample=8)
    radius = 12.0
    areas = {}
    for shape in SHAPES:
        scene = ToyScene("red", shape, "black", radius, 32.0, 32.0, (255, 0, 0))
        areas[shape] = render_scene(scene, config)[..., 0].astype(float).sum() / 255.0
    assert areas["circle"] == pytest.approx(np.pi * radius**2, rel=0.02)
    assert areas["square"] == pytest.approx((2 * 0.85 * radius) ** 2, rel=0.02)
    assert areas["triangle"] == pytest.approx(3 * np.sqrt(3) / 4 * (1.2 * radius) ** 2, rel=0.02)


def test_prompts_use_only_the_world_vocabulary_and_parse_back() -> None:
    vocabulary = set(world_vocabulary())
    prompts = world_prompts()
    assert len(set(prompts)) == 36
    for scene in sample_scenes(50, seed=2):
        assert set(scene.prompt.split()) <= vocabulary
        assert parse_prompt(scene.prompt) == {
            "colour": scene.colour,
            "shape": scene.shape,
            "background": scene.background,
        }
    with pytest.raises(ValueError, match="not one of"):
        parse_prompt("a purple circle on a black background")
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt("a red circle")


def test_every_world_word_is_one_token(tmp_path) -> None:
    from ddr_core.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(world_vocabulary(), tmp_path / "tokenizer")
    for prompt in world_prompts():
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert len(ids) == len(prompt.split())


def test_dataset_tensors_and_labels() -> None:
    dataset = make_dataset(36, seed=5)
    assert dataset.images.shape == (36, 3, 32, 32) and dataset.images.dtype == torch.float32
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0
    for family, labels in dataset.labels.items():
        assert labels.shape == (36,)
        assert [CONCEPTS[family][int(i)] for i in labels] == [getattr(s, family) for s in dataset.scenes]
    # Float images in [0, 1] (diffusers output_type="np") map like uint8 ones.
    uint8 = render_scenes(dataset.scenes[:2])
    assert torch.allclose(images_to_tensor(uint8), images_to_tensor(uint8 / 255.0), atol=1e-6)


def test_config_rejects_shapes_that_cannot_fit() -> None:
    with pytest.raises(ValueError, match="max_size_fraction"):
        ToyWorldConfig(max_size_fraction=0.6)


def test_training_script_runs_end_to_end_and_saves_a_loadable_pipeline(tmp_path) -> None:
    from ddr_core.pipeline import layer_width, load_pipeline, resolve_layer
    from ddr_core.toy_training import (
        REPORT_FILENAME,
        TOY_TARGET_LAYER,
        ToyModelConfig,
        ToyTrainingConfig,
        generate_world_images,
        main,
        train_toy_model,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training = ToyTrainingConfig(
            num_images=72, vae_steps=2, unet_steps=3, vae_batch_size=4, unet_batch_size=4
        )
        out = train_toy_model(tmp_path / "toy", ToyModelConfig(), training)
        report = json.loads((out / REPORT_FILENAME).read_text())
        assert report["vae_steps_done"] == 2 and report["unet_steps_done"] == 3
        assert report["stopped_early"] is False
        pipe = load_pipeline(out)
        assert pipe.vae_scale_factor == 4
        assert pipe.vae.config.scaling_factor == pytest.approx(report["vae_scaling_factor"])
        resolve_layer(pipe.unet, TOY_TARGET_LAYER)
        assert layer_width(pipe.unet, TOY_TARGET_LAYER) == ToyModelConfig().unet_block_out_channels[1]
        images = generate_world_images(pipe, world_prompts()[:2], [0, 1], num_inference_steps=2)
        assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()

        # Same seed and steps -> identical UNet weights (the run is reproducible).
        again = train_toy_model(tmp_path / "toy_again", ToyModelConfig(), training)
        assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
            again / "unet" / "diffusion_pytorch_model.safetensors"
        ).read_bytes()

        # The CLI takes the same path; a tiny wall-clock cap stops it early and says so.
        assert main(["--out", str(tmp_path / "cli"), "--minutes", "0.0001", "--num-images", "36"]) == 0
        cli_report = json.loads((tmp_path / "cli" / REPORT_FILENAME).read_text())
        assert cli_report["stopped_early"] is True
        load_pipeline(tmp_path / "cli")
    finally:
        torch.set_num_threads(threads)


def test_training_config_rejects_bad_values() -> None:
    from ddr_core.toy_training import ToyModelConfig, ToyTrainingConfig

    with pytest.raises(ValueError, match="uncond_probability"):
        ToyTrainingConfig(uncond_probability=1.0)
    with pytest.raises(ValueError, match="multiple of"):
        ToyModelConfig(image_size=36)
    with pytest.raises(ValueError, match="unet_norm_num_groups"):
        replace(ToyModelConfig(), unet_norm_num_groups=7)
