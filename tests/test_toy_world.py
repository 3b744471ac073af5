"""The toy world: deterministic rendering, labels that match the pixels, prompts in the vocabulary.
(The training script's tests live in tests/test_toy_training.py.)"""

from __future__ import annotations

from collections import Counter

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


# --- the "shapes-rich" world (docs/TOY_WORLD.md) --------------------------------------------------------------

RICH = ToyWorldConfig(world="shapes-rich")


def test_the_shapes_world_is_unchanged_byte_for_byte() -> None:
    """The shipped model's world: the same draws and pixels as before the rich world existed (hashes taken
    on the commit before it), so `make train-toy` still reproduces models/toy-world."""
    import hashlib
    import json

    dataset = make_dataset(400, seed=3)
    assert hashlib.sha256(dataset.images.numpy().tobytes()).hexdigest()[:16] == "503e779576ebdbd9"
    scenes = json.dumps([scene.to_json_dict() for scene in dataset.scenes]).encode()
    assert hashlib.sha256(scenes).hexdigest()[:16] == "28c402c39e536393"
    assert len(world_prompts()) == 36 and set(dataset.labels) == set(CONCEPTS)


def test_rich_world_prompts_parse_back_and_are_one_token_per_word(tmp_path) -> None:
    from ddr_core.tokenizer import build_word_tokenizer
    from ddr_core.toy_world import RICH_CONCEPTS

    prompts = world_prompts("shapes-rich")
    assert len(prompts) == len(set(prompts)) == 6 * 4 * 3 * 2 * 4
    tokenizer = build_word_tokenizer(world_vocabulary("shapes-rich"), tmp_path / "tokenizer")
    for prompt in prompts[::37]:
        labels = parse_prompt(prompt)
        assert set(labels) == set(RICH_CONCEPTS) and all(labels[f] in RICH_CONCEPTS[f] for f in labels)
        assert len(tokenizer(prompt, add_special_tokens=False).input_ids) == len(prompt.split())
    with pytest.raises(ValueError, match="size 'huge'"):
        parse_prompt("a huge red circle at the top left on a black background")
    with pytest.raises(ValueError, match="Unknown toy world"):
        world_prompts("shapes-xl")


def test_rich_scenes_are_balanced_and_sit_in_their_quadrant_at_their_size() -> None:
    from ddr_core.toy_world import SIZE_FRACTIONS

    scenes = sample_scenes(576 * 2, seed=4, config=RICH)
    assert set(Counter(scene.prompt for scene in scenes).values()) == {2}
    half = RICH.image_size / 2
    for scene in scenes:
        low, high = SIZE_FRACTIONS[scene.size]
        assert low * RICH.image_size <= scene.radius <= high * RICH.image_size
        vertical, horizontal = scene.position.split()
        assert (scene.center_x < half) == (horizontal == "left") or scene.center_x == half
        assert (scene.center_y < half) == (vertical == "top") or scene.center_y == half
        assert scene.radius < scene.center_x < RICH.image_size - scene.radius
        assert parse_prompt(scene.prompt)["position"] == scene.position


def test_rich_dataset_labels_every_family_and_the_pixels_agree() -> None:
    from ddr_core.toy_world import RICH_CONCEPTS

    dataset = make_dataset(24, seed=6, config=RICH)
    assert set(dataset.labels) == set(RICH_CONCEPTS)
    images = render_scenes(dataset.scenes, RICH)
    for image, scene in zip(images, dataset.scenes, strict=True):
        centre = image[int(scene.center_y), int(scene.center_x)].astype(int)
        assert np.abs(centre - np.asarray(scene.rgb)).max() <= 1  # the shape's own colour at its centre
        assert RICH_CONCEPTS["size"][int(dataset.labels["size"][dataset.scenes.index(scene)])] == scene.size


def test_diamond_area_is_close_to_the_circle() -> None:
    config = ToyWorldConfig(image_size=64, supersample=8, world="shapes-rich")
    area = {shape: render_scene(ToyScene("red", shape, "black", 12.0, 32.0, 32.0, (255, 0, 0)), config)[..., 0]
            .astype(float).sum() / 255.0 for shape in ("circle", "diamond")}
    assert area["diamond"] == pytest.approx(area["circle"], rel=0.12)


def test_classifier_heads_must_be_the_worlds() -> None:
    from ddr_core.concept_classifier import (
        ClassifierTrainingConfig,
        ConceptClassifierConfig,
        train_concept_classifier,
    )

    with pytest.raises(ValueError, match="not the world's"):
        train_concept_classifier(ConceptClassifierConfig(), ClassifierTrainingConfig(steps=0, num_images=4,
                                                                                      num_eval_images=4), RICH)


def test_rich_prompt_dataset_file_is_the_worlds_prompts_with_their_labels(tmp_path) -> None:
    """datasets/toy-world-rich/prompts.jsonl (the toy-rich variants' prompts) is exactly what
    `write_labelled_prompts(world_prompts("shapes-rich"), "toy-world")` writes: regenerate it that way."""
    from ddr_core.config import PROJECT_ROOT
    from ddr_core.feature_concepts.labels import write_labelled_prompts

    expected = write_labelled_prompts(tmp_path / "prompts.jsonl", world_prompts("shapes-rich"), "toy-world")
    shipped = PROJECT_ROOT / "datasets" / "toy-world-rich" / "prompts.jsonl"
    assert shipped.read_bytes() == expected.read_bytes()


def test_model_worlds_name_a_world() -> None:
    from ddr_core.toy_world import MODEL_WORLDS, WORLDS

    assert MODEL_WORLDS == {"toy-world": "shapes", "toy-world-rich": "shapes-rich",
                            "toy-world-no-yellow": "shapes-no-yellow"}
    assert set(MODEL_WORLDS.values()) == set(WORLDS)
