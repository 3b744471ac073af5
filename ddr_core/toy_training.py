"""Train a small Stable-Diffusion-architecture model on the toy world (:mod:`ddr_core.toy_world`).

The result is a diffusers ``StableDiffusionPipeline`` folder like SD 1.x, only small enough to
train on two CPU cores:

* ``vae``: an ``AutoencoderKL`` with three levels (4x downscale: 32x32 images -> 4x8x8 latents),
  trained first on rendered images (MSE + a small KL term); its ``scaling_factor`` is set to one over
  the standard deviation of the training latents, as SD did.
* ``text_encoder``: a small ``CLIPTextModel`` over the word tokenizer of the world's vocabulary
  (:func:`ddr_core.toy_world.world_vocabulary`), trained jointly with the UNet.
* ``unet``: ``UNet2DConditionModel`` with SD's block types (down ``CrossAttnDownBlock2D x2,
  DownBlock2D``; up ``UpBlock2D, CrossAttnUpBlock2D x2``), so ``up_blocks.1.attentions.1`` exists.
  Trained with the DDPM epsilon-prediction loss (Min-SNR-gamma weighting), prompts dropped to
  the empty prompt with probability ``uncond_probability`` for classifier-free guidance.
* ``scheduler``: ``DDIMScheduler`` with SD's scaled-linear betas (the same betas as training).

Reproducibility: everything is seeded and the step counts are fixed by :class:`ToyTrainingConfig`;
``max_minutes`` is only a wall-clock safety cap. A run that hits it stops early and records it
(``stopped_early`` in ``toy_training_report.json``), so reproducible runs must finish their steps.

CLI::

    python -m ddr_core.toy_training --out DIR --minutes 25 [--seed 0] [--vae-steps N] [--unet-steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddr_core.tiny_model import build_clip_text_encoder, build_sd_scheduler, build_sd_unet, build_sd_vae
from ddr_core.toy_world import (
    CONCEPTS,
    ToyWorldConfig,
    make_dataset,
    parse_prompt,
    world_prompts,
    world_vocabulary,
)

TOY_TARGET_LAYER = "up_blocks.1.attentions.1"
REPORT_FILENAME = "toy_training_report.json"


@dataclass(frozen=True)
class ToyModelConfig:
    """Architecture of the toy model.

    Attributes:
        image_size: Image side in pixels (the world's ``image_size``).
        vae_block_out_channels: ``AutoencoderKL`` widths; ``n`` levels downscale by ``2**(n-1)``.
        vae_norm_num_groups: GroupNorm groups of the VAE.
        latent_channels: Latent channels (4 as in SD).
        unet_block_out_channels: UNet widths of its 3 resolution levels; ``up_blocks.1`` outputs
            ``unet_block_out_channels[1]`` channels.
        unet_layers_per_block: ResNet(+attention) layers per down block; up blocks get one more.
        unet_attention_heads: diffusers' legacy ``attention_head_dim`` (heads per block).
        unet_norm_num_groups: GroupNorm groups; must divide every UNet width.
        text_hidden_size: CLIP text width = UNet cross-attention width.
        text_layers: CLIP text transformer layers.
        text_heads: CLIP text attention heads.
        text_intermediate_size: CLIP text MLP width.
    """

    image_size: int = 32
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32)
    vae_norm_num_groups: int = 8
    latent_channels: int = 4
    unet_block_out_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    unet_attention_heads: int = 4
    unet_norm_num_groups: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 128

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    def __post_init__(self) -> None:
        if len(self.unet_block_out_channels) != 3:
            raise ValueError(
                "The toy UNet mirrors SD with exactly 3 block widths (2 cross-attention levels)."
            )
        multiple = self.vae_scale_factor * 4
        if self.image_size % multiple:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of {multiple} for this architecture."
            )
        for width in self.unet_block_out_channels:
            if width % self.unet_norm_num_groups:
                raise ValueError(
                    f"unet_norm_num_groups={self.unet_norm_num_groups} must divide every UNet width "
                    f"{self.unet_block_out_channels}."
                )


@dataclass(frozen=True)
class ToyTrainingConfig:
    """Seeds, step counts and optimiser settings of one training run.

    Attributes:
        seed: Seeds the dataset, every initialisation and every random draw of training.
        num_images: Rendered training images (balanced over the 36 prompt combinations).
        vae_steps: VAE optimiser steps.
        vae_batch_size: Images per VAE step.
        vae_learning_rate: AdamW learning rate of the VAE.
        vae_kl_weight: Weight of the KL term (summed over latent elements, mean over the batch).
        unet_steps: UNet + text encoder optimiser steps.
        unet_batch_size: Latents per UNet step.
        unet_learning_rate: Peak AdamW learning rate of UNet and text encoder (linear warm-up,
            cosine decay to 10%).
        warmup_steps: Warm-up steps of the UNet learning rate.
        uncond_probability: Chance a training prompt is replaced by the empty prompt.
        min_snr_gamma: Min-SNR-gamma loss weighting (``None`` for the plain epsilon MSE).
        max_minutes: Wall-clock cap for the whole run (``None``: no cap); the VAE gets
            ``vae_time_fraction`` of it.
        vae_time_fraction: Share of ``max_minutes`` for the VAE phase.
        log_every: Steps between loss log lines.
    """

    seed: int = 0
    num_images: int = 7200
    vae_steps: int = 600
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 3000
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    warmup_steps: int = 100
    uncond_probability: float = 0.1
    min_snr_gamma: float | None = 5.0
    max_minutes: float | None = None
    vae_time_fraction: float = 0.2
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("num_images", "vae_batch_size", "unet_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.vae_steps < 0 or self.unet_steps < 0:
            raise ValueError("vae_steps and unet_steps must be >= 0.")
        if not 0 <= self.uncond_probability < 1:
            raise ValueError(f"uncond_probability must be in [0, 1), got {self.uncond_probability}.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive or None, got {self.max_minutes}.")
        if not 0 < self.vae_time_fraction < 1:
            raise ValueError(f"vae_time_fraction must be in (0, 1), got {self.vae_time_fraction}.")


def build_toy_vae(config: ToyModelConfig, seed: int):
    """An untrained ``AutoencoderKL`` for ``config`` (seeded; scaling factor set after training)."""
    return build_sd_vae(config, seed, scaling_factor=1.0)


def build_toy_unet(config: ToyModelConfig, seed: int):
    """An untrained ``UNet2DConditionModel`` with SD's block layout (seeded)."""
    return build_sd_unet(config, seed)


def build_toy_text_encoder(config: ToyModelConfig, tokenizer, seed: int):
    """An untrained ``CLIPTextModel`` over ``tokenizer``'s vocabulary (seeded)."""
    return build_clip_text_encoder(config, tokenizer, seed)


class _Deadline:
    """Wall-clock cap; ``None`` seconds never expires."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() >= self.end


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay from 1 to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_vae(
    vae,
    images: torch.Tensor,
    training: ToyTrainingConfig,
    deadline: _Deadline,
    log: list[dict],
    progress: Callable[[str], None] | None = None,
) -> int:
    """Train ``vae`` in place on ``images`` ``(batch, 3, H, W)`` in ``[-1, 1]``; returns steps done.

    Appends a loss entry to ``log`` every ``training.log_every`` steps (also sent to ``progress``).
    """
    generator = torch.Generator().manual_seed(training.seed * 7919 + 11)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=training.vae_learning_rate, weight_decay=0.0)
    vae.train()
    steps_done = 0
    for step in range(training.vae_steps):
        if deadline.passed():
            break
        for group in optimizer.param_groups:
            group["lr"] = training.vae_learning_rate * _lr_factor(
                step, training.vae_steps, min(50, training.vae_steps)
            )
        index = torch.randint(0, images.shape[0], (training.vae_batch_size,), generator=generator)
        batch = images[index]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        mse = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean()
        loss = mse + training.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        steps_done = step + 1
        if step % training.log_every == 0 or steps_done == training.vae_steps:
            log.append({"phase": "vae", "step": step, "mse": float(mse.detach()), "kl": float(kl.detach())})
            if progress is not None:
                progress(f"vae step {step}: mse {log[-1]['mse']:.4f} kl {log[-1]['kl']:.1f}")
    vae.eval()
    return steps_done


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``(batch, latent_channels, h, w)`` of ``images`` (unscaled)."""
    means, stds = [], []
    for start in range(0, images.shape[0], batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """``(len(prompts), model_max_length)`` ids, padded like ``StableDiffusionPipeline`` does."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_denoiser(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    prompt_index: torch.Tensor,
    prompt_vocabulary: Sequence[str],
    training: ToyTrainingConfig,
    deadline: _Deadline,
    log: list[dict],
    progress: Callable[[str], None] | None = None,
) -> int:
    """Train ``unet`` and ``text_encoder`` jointly with the DDPM epsilon loss; returns steps done.

    Args:
        latent_mean, latent_std: Scaled VAE posterior ``(n, latent_channels, h, w)``; each step
            draws a fresh latent sample from it.
        prompt_index: ``(n,)`` index into ``prompt_vocabulary`` of each image's prompt.
        prompt_vocabulary: Unique prompts; the last one must be the empty prompt ``""``.
    """
    if prompt_vocabulary[-1] != "":
        raise ValueError(
            "prompt_vocabulary must end with the empty prompt used for classifier-free guidance."
        )
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(scheduler.config)
    alphas_cumprod = noise_schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    all_ids = _tokenize(tokenizer, prompt_vocabulary)
    empty_index = len(prompt_vocabulary) - 1
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=training.unet_learning_rate, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(training.seed * 7919 + 23)
    unet.train()
    text_encoder.train()
    steps_done = 0
    for step in range(training.unet_steps):
        if deadline.passed():
            break
        factor = _lr_factor(step, training.unet_steps, min(training.warmup_steps, training.unet_steps))
        for group in optimizer.param_groups:
            group["lr"] = training.unet_learning_rate * factor
        batch_size = training.unet_batch_size
        index = torch.randint(0, latent_mean.shape[0], (batch_size,), generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(
            latent_mean[index].shape, generator=generator
        )
        prompts = prompt_index[index].clone()
        drop = torch.rand(batch_size, generator=generator) < training.uncond_probability
        prompts[drop] = empty_index
        unique, inverse = torch.unique(prompts, return_inverse=True)
        hidden = text_encoder(all_ids[unique])[0][inverse]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator
        )
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        per_example = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        if training.min_snr_gamma is not None:
            step_snr = snr[timesteps]
            weights = torch.clamp(step_snr, max=training.min_snr_gamma) / step_snr
            loss = (per_example * weights).mean()
        else:
            loss = per_example.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        steps_done = step + 1
        if step % training.log_every == 0 or steps_done == training.unet_steps:
            log.append(
                {
                    "phase": "unet",
                    "step": step,
                    "loss": float(loss.detach()),
                    "mse": float(per_example.mean().detach()),
                }
            )
            if progress is not None:
                progress(f"unet step {step}: loss {log[-1]['loss']:.4f} mse {log[-1]['mse']:.4f}")
    unet.eval()
    text_encoder.eval()
    return steps_done


def train_toy_model(
    out_dir: str | Path,
    model: ToyModelConfig = ToyModelConfig(),
    training: ToyTrainingConfig = ToyTrainingConfig(),
    verbose: bool = False,
) -> Path:
    """Train the toy model and save it as a diffusers ``StableDiffusionPipeline`` folder.

    Writes ``out_dir`` (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``, safetensors weights) and ``toy_training_report.json``
    (configs, steps done, whether the time cap stopped a phase, loss log, seconds).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from diffusers import StableDiffusionPipeline

    from ddr_core.tokenizer import build_word_tokenizer

    started = time.perf_counter()
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    world = ToyWorldConfig(image_size=model.image_size)
    dataset = make_dataset(training.num_images, seed=training.seed, config=world)
    tokenizer = build_word_tokenizer(world_vocabulary(), out_path / "tokenizer")
    log: list[dict[str, Any]] = []

    def say(message: str) -> None:
        if verbose:
            print(f"[toy_training {time.perf_counter() - started:7.1f}s] {message}", flush=True)

    total_seconds = None if training.max_minutes is None else training.max_minutes * 60.0
    vae = build_toy_vae(model, training.seed)
    vae_deadline = _Deadline(None if total_seconds is None else total_seconds * training.vae_time_fraction)
    say(f"dataset {len(dataset)} images; training VAE for {training.vae_steps} steps")
    vae_steps = train_vae(vae, dataset.images, training, vae_deadline, log, say)
    mean, std = encode_images(vae, dataset.images)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(training.seed))
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        reconstruction = vae.decode(mean[:256]).sample
    vae_mse = float(F.mse_loss(reconstruction, dataset.images[:256]))
    say(f"VAE {vae_steps} steps, reconstruction MSE {vae_mse:.4f}, scaling_factor {scaling_factor:.4f}")

    prompt_vocabulary = [*world_prompts(), ""]
    prompt_index = torch.tensor([prompt_vocabulary.index(p) for p in dataset.prompts], dtype=torch.int64)
    unet = build_toy_unet(model, training.seed)
    text_encoder = build_toy_text_encoder(model, tokenizer, training.seed)
    scheduler = build_sd_scheduler()
    remaining = None if total_seconds is None else max(total_seconds - (time.perf_counter() - started), 1.0)
    say(f"training UNet + text encoder for {training.unet_steps} steps")
    unet_steps = train_denoiser(
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
    pipe.save_pretrained(out_path, safe_serialization=True)
    # save_pretrained rewrites tokenizer/ through transformers; put the canonical files back on top.
    build_word_tokenizer(world_vocabulary(), out_path / "tokenizer")
    report = {
        "model": _json_ready(asdict(model)),
        "training": _json_ready(asdict(training)),
        "target_layer": TOY_TARGET_LAYER,
        "vae_steps_done": vae_steps,
        "unet_steps_done": unet_steps,
        "stopped_early": vae_steps < training.vae_steps or unet_steps < training.unet_steps,
        "vae_reconstruction_mse": vae_mse,
        "vae_scaling_factor": scaling_factor,
        "seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "log": log,
    }
    (out_path / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    say(f"done in {report['seconds']:.0f}s")
    return out_path


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_json_ready(item) for item in value]
    return value


@torch.no_grad()
def generate_world_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = 5.0,
    num_inference_steps: int = 25,
    batch_size: int = 32,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair: float ``(batch, H, W, 3)`` in ``[0, 1]``."""
    from ddr_core.pipeline import initial_latents

    if len(prompts) != len(seeds):
        raise ValueError(f"Need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds.")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk_prompts = list(prompts[start : start + batch_size])
        latents = initial_latents(pipe, seeds[start : start + batch_size], size, size)
        output = pipe(
            chunk_prompts,
            height=size,
            width=size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            latents=latents,
            output_type="np",
        )
        images.append(np.asarray(output.images))
    return np.concatenate(images)


def prompt_agreement(classifier, images: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    """Share of images whose classified concept equals the one their prompt asked for, per family.

    Returns:
        ``{"colour": float, "shape": float, "background": float, "count": n, "confusion": {family:
        matrix as nested lists, rows = asked, columns = predicted}}``.
    """
    from ddr_core.concept_classifier import predict_concepts

    predicted = predict_concepts(classifier, images)
    asked = [parse_prompt(prompt) for prompt in prompts]
    result: dict[str, Any] = {"count": len(prompts), "confusion": {}}
    for family, labels in CONCEPTS.items():
        if family not in predicted:
            continue
        target = np.array([labels.index(a[family]) for a in asked])
        result[family] = float((predicted[family] == target).mean()) if len(target) else float("nan")
        confusion = np.zeros((len(labels), len(labels)), dtype=int)
        np.add.at(confusion, (target, predicted[family]), 1)
        result["confusion"][family] = confusion.tolist()
    return result


def evaluate_toy_model(
    model_dir: str | Path,
    classifier_dir: str | Path,
    num_images: int = 64,
    seed: int = 12345,
    guidance_scale: float = 5.0,
    num_inference_steps: int = 25,
) -> dict[str, Any]:
    """Generate ``num_images`` images from world prompts (cycled) and score them with the classifier."""
    from ddr_core.concept_classifier import load_concept_classifier
    from ddr_core.pipeline import load_pipeline

    pipe = load_pipeline(model_dir)
    classifier = load_concept_classifier(classifier_dir)
    all_prompts = world_prompts()
    prompts = [all_prompts[i % len(all_prompts)] for i in range(num_images)]
    seeds = [seed + i for i in range(num_images)]
    images = generate_world_images(pipe, prompts, seeds, guidance_scale, num_inference_steps)
    result = prompt_agreement(classifier, images, prompts)
    result.update(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the toy-world Stable-Diffusion-architecture model.")
    parser.add_argument("--out", required=True, help="Output diffusers folder.")
    parser.add_argument(
        "--minutes", type=float, default=None, help="Wall-clock cap (safety stop) in minutes."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {
        key: value
        for key, value in {
            "vae_steps": args.vae_steps,
            "unet_steps": args.unet_steps,
            "num_images": args.num_images,
        }.items()
        if value is not None
    }
    training = replace(ToyTrainingConfig(seed=args.seed, max_minutes=args.minutes), **overrides)
    train_toy_model(args.out, ToyModelConfig(), training, verbose=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
