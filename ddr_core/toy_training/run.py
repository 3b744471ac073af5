"""The whole toy-model run (:func:`train_toy_model`): classifier, VAE, denoiser, the saved pipeline folder
and its evaluation report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ddr_core.concept_classifier import ConceptClassifierConfig
from ddr_core.toy_training.config import (
    CLASSIFIER_FOLDER,
    REPORT_FILENAME,
    SAMPLES_FILENAME,
    TOY_TARGET_LAYER,
    ToyEvaluationConfig,
    ToyModelConfig,
    ToyTrainingConfig,
    build_toy_scheduler,
    build_toy_text_encoder,
    build_toy_unet,
    build_toy_vae,
)
from ddr_core.toy_training.evaluation import classifier_accuracy, evaluate_pipeline, save_sample_grid
from ddr_core.toy_training.training import (
    _Deadline,
    encode_images,
    reconstruct_images,
    train_denoiser,
    train_vae,
)
from ddr_core.toy_world import ToyWorldConfig, make_dataset, world_prompts, world_vocabulary


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_json_ready(item) for item in value]
    return value


def train_toy_model(
    out_dir: str | Path,
    model: ToyModelConfig = ToyModelConfig(),
    training: ToyTrainingConfig = ToyTrainingConfig(),
    evaluation: ToyEvaluationConfig | None = ToyEvaluationConfig(),
    classifier_model: ConceptClassifierConfig | None = None,
    verbose: bool = False,
) -> Path:
    """Train the classifier and the toy model, save them, evaluate the model.

    Writes ``out_dir``: the diffusers ``StableDiffusionPipeline`` folder (``model_index.json``,
    ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, safetensors weights),
    ``concept_classifier/`` (:func:`~ddr_core.concept_classifier.save_concept_classifier`),
    ``toy_training_report.json`` (configs, steps done, whether the time cap stopped a phase,
    seconds per phase, final losses, classifier accuracy on renders and on VAE reconstructions,
    the generation agreement, the loss log) and, unless ``evaluation`` is ``None``,
    ``toy_samples.png`` (one generated image per world prompt: rows = backgrounds).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from diffusers import StableDiffusionPipeline

    from ddr_core.concept_classifier import save_concept_classifier, train_concept_classifier
    from ddr_core.tokenizer import build_word_tokenizer

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    world = ToyWorldConfig(image_size=model.image_size, world=training.world)
    classifier_model = classifier_model or ConceptClassifierConfig(image_size=model.image_size,
                                                                   heads=world.concepts)
    log: list[dict[str, Any]] = []

    def say(message: str) -> None:
        if verbose:
            print(f"[toy_training {time.perf_counter() - started:7.1f}s] {message}", flush=True)

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = now - since
        return now

    total_seconds = None if training.max_minutes is None else training.max_minutes * 60.0
    first_deadline = _Deadline(None if total_seconds is None else total_seconds * training.vae_time_fraction)

    phase = time.perf_counter()
    say(f"training the concept classifier for {training.classifier.steps} steps")
    classifier, classifier_report = train_concept_classifier(classifier_model, training.classifier, world)
    save_concept_classifier(classifier, out_path / CLASSIFIER_FOLDER, classifier_report)
    held_out = make_dataset(
        training.classifier.num_eval_images, seed=training.classifier.seed + 10_000, config=world
    )
    say(f"classifier accuracy on held-out renders {classifier_report['accuracy']}")
    phase = lap("classifier", phase)

    dataset = make_dataset(training.num_images, seed=training.seed, config=world)
    tokenizer = build_word_tokenizer(world_vocabulary(training.world), out_path / "tokenizer")
    vae = build_toy_vae(model, training.seed)
    say(f"dataset {len(dataset)} images; training VAE for {training.vae_steps} steps")
    vae_steps, vae_losses = train_vae(vae, dataset.images, training, first_deadline, log, say)
    mean, std = encode_images(vae, dataset.images)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(training.seed))
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    reconstructions = reconstruct_images(vae, held_out.images)
    vae_mse = float(F.mse_loss(reconstructions, held_out.images))
    reconstruction_accuracy = classifier_accuracy(classifier, reconstructions, held_out.labels)
    say(
        f"VAE {vae_steps} steps, held-out reconstruction MSE {vae_mse:.4f}, scaling_factor "
        f"{scaling_factor:.4f}; classifier on reconstructions {reconstruction_accuracy}"
    )
    phase = lap("vae", phase)

    prompt_vocabulary = [*world_prompts(training.world), ""]
    prompt_index = torch.tensor([prompt_vocabulary.index(p) for p in dataset.prompts], dtype=torch.int64)
    unet = build_toy_unet(model, training.seed)
    text_encoder = build_toy_text_encoder(model, tokenizer, training.seed)
    scheduler = build_toy_scheduler(training)
    remaining = None if total_seconds is None else max(total_seconds - (time.perf_counter() - started), 1.0)
    say(f"training UNet + text encoder for {training.unet_steps} steps")
    unet_steps, unet_losses = train_denoiser(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        mean * scaling_factor,
        std * scaling_factor,
        prompt_index,
        prompt_vocabulary,
        training,
        _Deadline(remaining),
        log,
        say,
    )
    phase = lap("unet", phase)
    say(f"UNet {unet_steps} steps; saving to {out_path}")

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(out_path, safe_serialization=True)
    # save_pretrained rewrites tokenizer/ through transformers; put the canonical files back on top.
    build_word_tokenizer(world_vocabulary(training.world), out_path / "tokenizer")
    phase = lap("save", phase)

    generation: dict[str, Any] | None = None
    if evaluation is not None:
        say(
            f"evaluating: {evaluation.images_per_prompt} images per prompt, "
            f"guidance {evaluation.guidance_scale}"
        )
        generation, images = evaluate_pipeline(pipe, classifier, evaluation, training.world)
        if len(images):
            save_sample_grid(images[: min(len(world_prompts(training.world)), 144)], out_path / SAMPLES_FILENAME)
        say(
            "generated images agree with their prompt: "
            + ", ".join(f"{family} {generation[family]:.3f}" for family in world.concepts if family in generation)
        )
        phase = lap("evaluation", phase)
    seconds["total"] = time.perf_counter() - started

    report = {
        "model": _json_ready(asdict(model)),
        "training": _json_ready(asdict(training)),
        "classifier_model": classifier_model.to_json_dict(),
        "target_layer": TOY_TARGET_LAYER,
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "vae_steps_done": vae_steps,
        "unet_steps_done": unet_steps,
        "stopped_early": vae_steps < training.vae_steps or unet_steps < training.unet_steps,
        "final_losses": {
            "vae_mse": vae_losses["mse"],
            "vae_kl": vae_losses["kl"],
            "unet_loss": unet_losses["loss"],
            "unet_mse": unet_losses["mse"],
            "classifier": classifier_report["final_loss"],
        },
        "vae_reconstruction_mse": vae_mse,
        "vae_scaling_factor": scaling_factor,
        "classifier": {
            "folder": CLASSIFIER_FOLDER,
            "held_out_images": len(held_out),
            "accuracy_on_renders": classifier_report["accuracy"],
            "accuracy_on_vae_reconstructions": reconstruction_accuracy,
        },
        "generation": generation,
        "log": log,
    }
    (out_path / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    say(f"done in {seconds['total']:.0f}s")
    return out_path
