"""The toy model's evaluation: images generated for every world prompt, judged by the concept classifier
(prompt agreement), the classifier's accuracy on renders and their VAE reconstructions, a sample grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddr_core.toy_training.config import AGREEMENT_TARGETS, CLASSIFIER_FOLDER, ToyEvaluationConfig
from ddr_core.toy_world import parse_prompt, world_concepts, world_prompts


def evaluation_prompts(evaluation: ToyEvaluationConfig, world: str = "shapes") -> tuple[list[str], list[int]]:
    """Prompts and seeds of the evaluation: every prompt of ``world`` ``images_per_prompt`` times.

    Image ``i`` has prompt ``world_prompts(world)[i % len(world_prompts(world))]`` and seed ``evaluation.seed + i``.
    """
    all_prompts = world_prompts(world)
    count = evaluation.images_per_prompt * len(all_prompts)
    prompts = [all_prompts[i % len(all_prompts)] for i in range(count)]
    return prompts, [evaluation.seed + i for i in range(count)]


@torch.no_grad()
def generate_world_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = 3.0,
    num_inference_steps: int = 25,
    batch_size: int = 60,
    guidance_rescale: float = 0.0,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair: float ``(batch, H, W, 3)`` in ``[0, 1]``."""
    from ddr_core.families import as_model

    if len(prompts) != len(seeds):
        raise ValueError(f"Need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds.")
    model = as_model(pipe)
    size = model.default_size[0]
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk_prompts = list(prompts[start : start + batch_size])
        latents = model.initial_latents(seeds[start : start + batch_size], size, size)
        output = pipe(
            chunk_prompts,
            height=size,
            width=size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            latents=latents,
            output_type="np",
        )
        images.append(np.asarray(output.images))
    if not images:
        return np.zeros((0, size, size, 3), dtype=np.float32)
    return np.concatenate(images)


def agreement_from_predictions(
    predicted: dict[str, np.ndarray], prompts: Sequence[str]
) -> dict[str, Any]:
    """Share of images whose predicted concept equals the one their prompt asked for, per family.

    Args:
        predicted: Concept family -> ``(n,)`` predicted label indices in :data:`CONCEPTS` order
            (families absent here are skipped).
        prompts: ``n`` world prompts (:func:`~ddr_core.toy_world.parse_prompt` must accept them).

    Returns:
        ``{"count": n, family: agreement in [0, 1] (NaN for n = 0), ..., "confusion": {family:
        matrix as nested lists, rows = asked, columns = predicted}}``.

    Raises:
        ValueError: for a prediction array whose length is not ``len(prompts)``.
    """
    asked = [parse_prompt(prompt) for prompt in prompts]
    result: dict[str, Any] = {"count": len(prompts), "confusion": {}}
    concepts = world_concepts("shapes-rich" if asked and "size" in asked[0] else "shapes")
    for family, labels in concepts.items():
        if family not in predicted:
            continue
        guess = np.asarray(predicted[family], dtype=np.int64).reshape(-1)
        if len(guess) != len(asked):
            raise ValueError(
                f"{len(guess)} {family} predictions for {len(asked)} prompts; pass one per prompt."
            )
        target = np.array([labels.index(a[family]) for a in asked], dtype=np.int64)
        result[family] = float((guess == target).mean()) if len(target) else float("nan")
        confusion = np.zeros((len(labels), len(labels)), dtype=int)
        np.add.at(confusion, (target, guess), 1)
        result["confusion"][family] = confusion.tolist()
    return result


def prompt_agreement(classifier, images: np.ndarray | torch.Tensor, prompts: Sequence[str]) -> dict[str, Any]:
    """Classify ``images`` and score them against ``prompts`` (see :func:`agreement_from_predictions`)."""
    from ddr_core.concept_classifier import predict_concepts

    return agreement_from_predictions(predict_concepts(classifier, images), prompts)


def classifier_accuracy(
    classifier, images: torch.Tensor | np.ndarray, labels: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per-head accuracy of ``classifier`` on ``images`` with known ``labels`` (family -> ``(n,)``)."""
    from ddr_core.concept_classifier import predict_concepts

    predicted = predict_concepts(classifier, images)
    return {
        family: float((torch.as_tensor(predicted[family]) == labels[family]).float().mean())
        for family in predicted
    }


def evaluate_pipeline(
    pipe, classifier, evaluation: ToyEvaluationConfig = ToyEvaluationConfig(), world: str = "shapes"
) -> tuple[dict[str, Any], np.ndarray]:
    """Generate the evaluation images (the prompts of ``world``) and score them with ``classifier``.

    Returns:
        The agreement (:func:`agreement_from_predictions` plus the evaluation settings,
        ``seconds`` and ``meets_targets``) and the images, float ``(n, H, W, 3)`` in ``[0, 1]``.
    """
    started = time.perf_counter()
    prompts, seeds = evaluation_prompts(evaluation, world)
    images = generate_world_images(
        pipe,
        prompts,
        seeds,
        guidance_scale=evaluation.guidance_scale,
        num_inference_steps=evaluation.num_inference_steps,
        batch_size=evaluation.batch_size,
        guidance_rescale=evaluation.guidance_rescale,
    )
    result = prompt_agreement(classifier, images, prompts)
    result["meets_targets"] = bool(
        len(prompts) > 0 and all(result[family] >= bar for family, bar in AGREEMENT_TARGETS.items())
    )
    result["targets"] = dict(AGREEMENT_TARGETS)
    result["settings"] = asdict(evaluation)
    result["seconds"] = time.perf_counter() - started
    return result, images


def evaluate_toy_model(
    model_dir: str | Path,
    classifier_dir: str | Path | None = None,
    evaluation: ToyEvaluationConfig = ToyEvaluationConfig(),
) -> dict[str, Any]:
    """Score a saved toy model (classifier default: ``model_dir/concept_classifier``); the world is the
    classifier's (``"shapes-rich"`` when it has a ``size`` head)."""
    from ddr_core.concept_classifier import load_concept_classifier
    from ddr_core.pipeline import load_pipeline

    pipe = load_pipeline(model_dir)
    classifier = load_concept_classifier(classifier_dir or Path(model_dir) / CLASSIFIER_FOLDER)
    world = "shapes-rich" if "size" in classifier.config.heads else "shapes"
    result, _ = evaluate_pipeline(pipe, classifier, evaluation, world)
    return result


def save_sample_grid(images: np.ndarray, path: str | Path, columns: int = 12) -> Path:
    """Save float ``(n, H, W, 3)`` images in ``[0, 1]`` as one PNG grid, row-major, ``columns`` wide."""
    from PIL import Image

    count, height, width, _ = images.shape
    rows = max(1, math.ceil(count / columns))
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = np.round(
            np.clip(image, 0.0, 1.0) * 255
        ).astype(np.uint8)
    out = Path(path)
    Image.fromarray(grid).save(out)
    return out
