"""Train a small Stable-Diffusion-architecture model on the toy world (:mod:`ddr_core.toy_world`).

The result is a diffusers ``StableDiffusionPipeline`` folder like SD 1.x, only small enough to
train on two CPU cores, plus the concept classifier that judges it:

* ``concept_classifier/``: a :class:`~ddr_core.concept_classifier.ConceptClassifier` (colour,
  shape, background) trained first on rendered images (``classifier.safetensors`` +
  ``classifier_config.json``; diffusers ignores the folder when it loads the pipeline).
* ``vae``: an ``AutoencoderKL`` with three levels (4x downscale: 32x32 images -> 4x8x8 latents),
  trained on rendered images (MSE + a small KL term); its ``scaling_factor`` is one over the standard
  deviation of the training latents, as SD did.
* ``text_encoder``: a small ``CLIPTextModel`` over the word tokenizer of the world's vocabulary
  (:func:`ddr_core.toy_world.world_vocabulary`), trained jointly with the UNet.
* ``unet``: ``UNet2DConditionModel`` with SD's block types (down ``CrossAttnDownBlock2D x2,
  DownBlock2D``; up ``UpBlock2D, CrossAttnUpBlock2D x2``), so ``up_blocks.1.attentions.1`` exists.
  Trained with the DDPM loss on ``v`` (``prediction_type="v_prediction"``), prompts dropped to the
  empty prompt with probability ``uncond_probability`` for classifier-free guidance; the saved
  weights are an exponential moving average (EMA) of the UNet and text-encoder weights.
* ``scheduler``: ``DDIMScheduler`` with SD's scaled-linear betas rescaled to zero terminal SNR and
  ``"trailing"`` timestep spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
  Steps are Flawed"). SD's own schedule leaves ~7% of the signal at ``t=999`` (on 8x8 latents that is
  enough to carry the image's mean colour), which the model learns to use and pure sampling noise
  lacks. (An earlier, shorter epsilon trial on SD's schedule reached 0.77 colour agreement; this
  setup reaches 0.99 after 1000 UNet steps. Not a clean ablation: the VAE and step counts differed.)

After training the run evaluates itself: classifier accuracy on held-out renders and on their VAE
reconstructions (how much of a concept survives the VAE), then the share of generated images whose
classified colour / shape / background equals what their prompt asked for
(``toy_training_report.json``, ``toy_samples.png``).

Reproducibility: everything is seeded and the step counts are fixed by :class:`ToyTrainingConfig`;
``max_minutes`` is only a wall-clock safety cap. A run that hits it stops early and records it
(``stopped_early`` in the report), so reproducible runs must finish their steps. Weights are
bitwise reproducible for the same seed, steps and thread count on the same machine.

Reproduction check: ``--compare-with models/toy-world`` (what ``make train-toy`` passes) compares the
new report's quality figures with the shipped model's (:func:`compare_with_shipped`: each within 0.05
below), says whether the weights are byte-identical, writes ``reproduction.json`` and exits 1 when a
figure regressed; ``--compare DIR --compare-with models/toy-world`` checks an existing folder.

CLI::

    python -m ddr_core.toy_training --out DIR [--threads 1] [--minutes M] [--seed 0]
        [--vae-steps N] [--unet-steps N] [--classifier-steps N] [--num-images N]
        [--eval-images-per-prompt N] [--guidance-scale G] [--compare-with SHIPPED_DIR [--tolerance T]]
    python -m ddr_core.toy_training --compare DIR --compare-with SHIPPED_DIR
    python -m ddr_core.toy_training --evaluate DIR [--guidance-scale G] [--inference-steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ddr_core.concept_classifier import ClassifierTrainingConfig, ConceptClassifierConfig
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
SAMPLES_FILENAME = "toy_samples.png"
CLASSIFIER_FOLDER = "concept_classifier"
AGREEMENT_TARGETS: dict[str, float] = {"colour": 0.90, "shape": 0.70}
"""Issue 8's bar: share of generated images whose classified concept matches the prompt."""


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


PredictionType = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class ToyTrainingConfig:
    """Seeds, step counts and optimiser settings of one training run.

    Attributes:
        seed: Seeds the dataset, every initialisation and every random draw of training.
        num_images: Rendered training images (balanced over the 36 prompt combinations).
        classifier: Training run of the concept classifier (its own ``seed`` field is used as is;
            the CLI sets it to ``seed``).
        vae_steps: VAE optimiser steps.
        vae_batch_size: Images per VAE step.
        vae_learning_rate: Peak AdamW learning rate of the VAE (warm-up, cosine decay to 10%).
        vae_kl_weight: Weight of the KL term (summed over latent elements, mean over the batch).
        unet_steps: UNet + text encoder optimiser steps.
        unet_batch_size: Latents per UNet step.
        unet_learning_rate: Peak AdamW learning rate of UNet and text encoder (linear warm-up,
            cosine decay to 10%).
        warmup_steps: Warm-up steps of the UNet learning rate.
        uncond_probability: Chance a training prompt is replaced by the empty prompt.
        prediction_type: What the UNet predicts: ``"v_prediction"`` (needed with a zero terminal
            SNR) or ``"epsilon"`` (SD 1.x).
        zero_terminal_snr: Rescale the betas so ``t=999`` is pure noise (and sample with
            ``"trailing"`` timesteps). Requires ``prediction_type="v_prediction"``.
        min_snr_gamma: Min-SNR-gamma loss weighting (``None``: the plain MSE of the prediction).
        ema_decay: Decay of the EMA of UNet and text-encoder weights that is saved (``None``: save
            the raw weights). The decay ramps up as ``min(ema_decay, (1 + step) / (10 + step))``.
        max_minutes: Wall-clock cap for the training phases (``None``: no cap); the VAE phase gets
            ``vae_time_fraction`` of it. Evaluation is not capped.
        vae_time_fraction: Share of ``max_minutes`` for the classifier and VAE phases.
        log_every: Steps between loss log lines.
    """

    seed: int = 0
    num_images: int = 7200
    classifier: ClassifierTrainingConfig = ClassifierTrainingConfig()
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2500
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    warmup_steps: int = 100
    uncond_probability: float = 0.1
    prediction_type: PredictionType = "v_prediction"
    zero_terminal_snr: bool = True
    min_snr_gamma: float | None = None
    ema_decay: float | None = 0.999
    max_minutes: float | None = None
    vae_time_fraction: float = 0.25
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("num_images", "vae_batch_size", "unet_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.vae_steps < 0 or self.unet_steps < 0:
            raise ValueError("vae_steps and unet_steps must be >= 0.")
        if not 0 <= self.uncond_probability < 1:
            raise ValueError(f"uncond_probability must be in [0, 1), got {self.uncond_probability}.")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}."
            )
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "zero_terminal_snr=True needs prediction_type='v_prediction' (epsilon is undefined at "
                "zero SNR); set zero_terminal_snr=False for an epsilon model."
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive or None, got {self.max_minutes}.")
        if not 0 < self.vae_time_fraction < 1:
            raise ValueError(f"vae_time_fraction must be in (0, 1), got {self.vae_time_fraction}.")


@dataclass(frozen=True)
class ToyEvaluationConfig:
    """How the trained model is scored.

    Attributes:
        images_per_prompt: Generated images per world prompt (36 prompts), one seed each.
        seed: Seed of the first generated image; image ``i`` uses ``seed + i``.
        guidance_scale: Classifier-free guidance scale.
        guidance_rescale: diffusers' ``guidance_rescale`` (0 disables it).
        num_inference_steps: DDIM steps.
        batch_size: Images per pipeline call.
    """

    images_per_prompt: int = 10
    seed: int = 12345
    guidance_scale: float = 3.0
    guidance_rescale: float = 0.0
    num_inference_steps: int = 25
    batch_size: int = 60

    def __post_init__(self) -> None:
        if self.images_per_prompt < 0:
            raise ValueError(f"images_per_prompt must be >= 0, got {self.images_per_prompt}.")
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("num_inference_steps and batch_size must be >= 1.")


def build_toy_vae(config: ToyModelConfig, seed: int):
    """An untrained ``AutoencoderKL`` for ``config`` (seeded; scaling factor set after training)."""
    return build_sd_vae(config, seed, scaling_factor=1.0)


def build_toy_unet(config: ToyModelConfig, seed: int):
    """An untrained ``UNet2DConditionModel`` with SD's block layout (seeded)."""
    return build_sd_unet(config, seed)


def build_toy_text_encoder(config: ToyModelConfig, tokenizer, seed: int):
    """An untrained ``CLIPTextModel`` over ``tokenizer``'s vocabulary (seeded)."""
    return build_clip_text_encoder(config, tokenizer, seed)


def build_toy_scheduler(training: ToyTrainingConfig = ToyTrainingConfig()):
    """SD's ``DDIMScheduler`` (scaled-linear betas) with ``training``'s prediction type and terminal SNR."""
    from diffusers import DDIMScheduler

    overrides: dict[str, Any] = {"prediction_type": training.prediction_type}
    if training.zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDIMScheduler.from_config(build_sd_scheduler().config, **overrides)


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


class _RunningMean:
    """Mean of the last ``window`` values (the "final loss" of a phase, less noisy than one step)."""

    def __init__(self, window: int = 50):
        self.window = window
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(value)
        del self.values[: -self.window]

    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None


class ExponentialMovingAverage:
    """EMA of the parameters of some modules: ``shadow += (1 - decay) * (param - shadow)``.

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` so early weights fade fast.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.decay = decay
        self.parameters = [p for module in modules for p in module.parameters()]
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1.0 - decay)

    @torch.no_grad()
    def copy_to_modules(self) -> None:
        """Overwrite the modules' parameters with the averaged ones."""
        for parameter, average in zip(self.parameters, self.shadow, strict=True):
            parameter.copy_(average)


def train_vae(
    vae,
    images: torch.Tensor,
    training: ToyTrainingConfig,
    deadline: _Deadline,
    log: list[dict],
    progress: Callable[[str], None] | None = None,
) -> tuple[int, dict[str, float | None]]:
    """Train ``vae`` in place on ``images`` ``(batch, 3, H, W)`` in ``[-1, 1]``.

    Appends a loss entry to ``log`` every ``training.log_every`` steps (also sent to ``progress``).

    Returns:
        Steps done and the final losses ``{"mse": ..., "kl": ...}`` (means over the last 50 steps).
    """
    generator = torch.Generator().manual_seed(training.seed * 7919 + 11)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=training.vae_learning_rate, weight_decay=0.0)
    vae.train()
    steps_done = 0
    final_mse, final_kl = _RunningMean(), _RunningMean()
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
        final_mse.add(float(mse.detach()))
        final_kl.add(float(kl.detach()))
        if step % training.log_every == 0 or steps_done == training.vae_steps:
            log.append({"phase": "vae", "step": step, "mse": float(mse.detach()), "kl": float(kl.detach())})
            if progress is not None:
                progress(f"vae step {step}: mse {log[-1]['mse']:.4f} kl {log[-1]['kl']:.1f}")
    vae.eval()
    return steps_done, {"mse": final_mse.mean(), "kl": final_kl.mean()}


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``(batch, latent_channels, h, w)`` of ``images`` (unscaled)."""
    means, stds = [], []
    for start in range(0, images.shape[0], batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct_images(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decode the posterior mean of ``images``: ``(batch, 3, H, W)`` in, clamped to ``[-1, 1]`` out."""
    mean, _ = encode_images(vae, images, batch_size)
    decoded = [
        vae.decode(mean[start : start + batch_size]).sample for start in range(0, len(mean), batch_size)
    ]
    return torch.cat(decoded).clamp(-1.0, 1.0)


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
) -> tuple[int, dict[str, float | None]]:
    """Train ``unet`` and ``text_encoder`` jointly with the DDPM loss; leaves the EMA weights in them.

    The target is ``scheduler.config.prediction_type``: the noise (``"epsilon"``) or
    ``v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * latents`` (``"v_prediction"``).

    Args:
        latent_mean, latent_std: Scaled VAE posterior ``(n, latent_channels, h, w)``; each step
            draws a fresh latent sample from it.
        prompt_index: ``(n,)`` index into ``prompt_vocabulary`` of each image's prompt.
        prompt_vocabulary: Unique prompts; the last one must be the empty prompt ``""``.

    Returns:
        Steps done and the final losses ``{"loss": ..., "mse": ...}`` (means over the last 50 steps;
        ``loss`` is weighted, ``mse`` is the plain MSE of the prediction).
    """
    if prompt_vocabulary[-1] != "":
        raise ValueError(
            "prompt_vocabulary must end with the empty prompt used for classifier-free guidance."
        )
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(scheduler.config)
    prediction_type = noise_schedule.config.prediction_type
    alphas_cumprod = noise_schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    all_ids = _tokenize(tokenizer, prompt_vocabulary)
    empty_index = len(prompt_vocabulary) - 1
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=training.unet_learning_rate, weight_decay=1e-4)
    ema = (
        ExponentialMovingAverage([unet, text_encoder], training.ema_decay)
        if training.ema_decay is not None
        else None
    )
    generator = torch.Generator().manual_seed(training.seed * 7919 + 23)
    unet.train()
    text_encoder.train()
    steps_done = 0
    final_loss, final_mse = _RunningMean(), _RunningMean()
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
        target = (
            noise_schedule.get_velocity(latents, noise, timesteps)
            if prediction_type == "v_prediction"
            else noise
        )
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        if training.min_snr_gamma is not None:
            step_snr = snr[timesteps]
            weights = torch.clamp(step_snr, max=training.min_snr_gamma)
            weights = weights / (step_snr + 1) if prediction_type == "v_prediction" else weights / step_snr
            loss = (per_example * weights).mean()
        else:
            loss = per_example.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if ema is not None:
            ema.update(step)
        steps_done = step + 1
        final_loss.add(float(loss.detach()))
        final_mse.add(float(per_example.mean().detach()))
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
    if ema is not None and steps_done > 0:
        ema.copy_to_modules()
    unet.eval()
    text_encoder.eval()
    return steps_done, {"loss": final_loss.mean(), "mse": final_mse.mean()}


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_json_ready(item) for item in value]
    return value


# --- evaluation -----------------------------------------------------------------------------------


def evaluation_prompts(evaluation: ToyEvaluationConfig) -> tuple[list[str], list[int]]:
    """Prompts and seeds of the evaluation: every world prompt ``images_per_prompt`` times.

    Image ``i`` has prompt ``world_prompts()[i % 36]`` and seed ``evaluation.seed + i``.
    """
    all_prompts = world_prompts()
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
    for family, labels in CONCEPTS.items():
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
    pipe, classifier, evaluation: ToyEvaluationConfig = ToyEvaluationConfig()
) -> tuple[dict[str, Any], np.ndarray]:
    """Generate the evaluation images and score them with ``classifier``.

    Returns:
        The agreement (:func:`agreement_from_predictions` plus the evaluation settings,
        ``seconds`` and ``meets_targets``) and the images, float ``(n, H, W, 3)`` in ``[0, 1]``.
    """
    started = time.perf_counter()
    prompts, seeds = evaluation_prompts(evaluation)
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
    """Score a saved toy model (classifier default: ``model_dir/concept_classifier``)."""
    from ddr_core.concept_classifier import load_concept_classifier
    from ddr_core.pipeline import load_pipeline

    pipe = load_pipeline(model_dir)
    classifier = load_concept_classifier(classifier_dir or Path(model_dir) / CLASSIFIER_FOLDER)
    result, _ = evaluate_pipeline(pipe, classifier, evaluation)
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


# --- the whole run --------------------------------------------------------------------------------


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
    world = ToyWorldConfig(image_size=model.image_size)
    classifier_model = classifier_model or ConceptClassifierConfig(image_size=model.image_size)
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
    tokenizer = build_word_tokenizer(world_vocabulary(), out_path / "tokenizer")
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

    prompt_vocabulary = [*world_prompts(), ""]
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
    build_word_tokenizer(world_vocabulary(), out_path / "tokenizer")
    phase = lap("save", phase)

    generation: dict[str, Any] | None = None
    if evaluation is not None:
        say(
            f"evaluating: {evaluation.images_per_prompt} images per prompt, "
            f"guidance {evaluation.guidance_scale}"
        )
        generation, images = evaluate_pipeline(pipe, classifier, evaluation)
        if len(images):
            save_sample_grid(images[: len(world_prompts())], out_path / SAMPLES_FILENAME)
        say(
            "generated images agree with their prompt: "
            + ", ".join(f"{family} {generation[family]:.3f}" for family in CONCEPTS if family in generation)
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


# --------------------------------------------------------------------------------------------------
# Reproduction check: a retrained folder against the shipped one
# --------------------------------------------------------------------------------------------------

REPRODUCTION_FILENAME = "reproduction.json"
REPRODUCTION_TOLERANCE = 0.05
"""How far a quality figure (a share in 0-1) may fall below the shipped model's and still reproduce it."""


def quality_figures(report: dict[str, Any]) -> dict[str, float]:
    """The higher-is-better quality figures of a training report: classifier accuracy on held-out renders
    and on their VAE reconstructions, and the generated images' agreement with their prompts, per family."""
    figures: dict[str, float] = {}
    classifier = report.get("classifier") or {}
    for section in ("accuracy_on_renders", "accuracy_on_vae_reconstructions"):
        for family, value in (classifier.get(section) or {}).items():
            figures[f"classifier_{section}_{family}"] = float(value)
    generation = report.get("generation") or {}
    for family in ("colour", "shape", "background"):
        if family in generation:
            figures[f"generation_{family}"] = float(generation[family])
    return figures


def _weight_hashes(model_dir: Path) -> dict[str, str]:
    import hashlib

    hashes = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        hashes[path.relative_to(model_dir).as_posix()] = digest.hexdigest()
    return hashes


def compare_with_shipped(new_dir: str | Path, shipped_dir: str | Path,
                         tolerance: float = REPRODUCTION_TOLERANCE) -> dict[str, Any]:
    """Does a retrained toy model reproduce the shipped one? Compares the quality figures of the two
    ``toy_training_report.json`` (:func:`quality_figures`): each new figure must be at least the shipped one
    minus ``tolerance``. Also says whether every weight file (``*.safetensors``) is byte-identical, which a
    run with the same seed, steps and thread count on the same kind of machine gives.

    Returns:
        ``{"reproduced", "tolerance", "figures": [{figure, shipped, new, delta, ok}], "missing",
        "weights_identical", "weights_differing"}``.

    Raises:
        FileNotFoundError: a folder has no training report (names the folder and how to make one).
    """
    new_dir, shipped_dir = Path(new_dir), Path(shipped_dir)
    reports = {}
    for name, folder in (("new", new_dir), ("shipped", shipped_dir)):
        path = folder / REPORT_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no {REPORT_FILENAME} in {folder} ({name}): train one with "
                                    f"`python -m ddr_core.toy_training --out {folder}` (make train-toy)")
        reports[name] = json.loads(path.read_text(encoding="utf-8"))
    shipped, new = quality_figures(reports["shipped"]), quality_figures(reports["new"])
    rows = []
    for figure, value in shipped.items():
        if figure not in new:
            continue
        delta = new[figure] - value
        rows.append({"figure": figure, "shipped": value, "new": new[figure], "delta": delta,
                     "ok": bool(delta >= -tolerance - 1e-12)})
    missing = sorted(set(shipped) - set(new))
    new_hashes, shipped_hashes = _weight_hashes(new_dir), _weight_hashes(shipped_dir)
    differing = sorted(name for name in set(new_hashes) | set(shipped_hashes)
                       if new_hashes.get(name) != shipped_hashes.get(name))
    return {"reproduced": all(row["ok"] for row in rows) and not missing and bool(rows),
            "tolerance": tolerance, "figures": rows, "missing": missing,
            "weights_identical": not differing and bool(new_hashes), "weights_differing": differing,
            "new": str(new_dir), "shipped": str(shipped_dir)}


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as a text table with a verdict line."""
    lines = [f"{'figure':54s} {'shipped':>8s} {'new':>8s} {'delta':>8s}"]
    for row in result["figures"]:
        mark = "" if row["ok"] else f"   below the shipped value by more than {result['tolerance']}"
        lines.append(f"{row['figure']:54s} {row['shipped']:8.3f} {row['new']:8.3f} {row['delta']:+8.3f}{mark}")
    for figure in result["missing"]:
        lines.append(f"{figure:54s} missing from the new report")
    weights = ("byte-identical" if result["weights_identical"]
               else f"differ in {len(result['weights_differing'])} file(s) (expected on another machine, "
                    f"thread count or library version; the figures decide)")
    verdict = "REPRODUCED" if result["reproduced"] else "NOT REPRODUCED"
    lines.append(f"weights {weights}")
    lines.append(f"{verdict}: quality figures of {result['new']} vs {result['shipped']} "
                 f"(tolerance {result['tolerance']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train (or evaluate) the toy-world Stable-Diffusion-architecture model."
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="Output folder: diffusers pipeline + concept_classifier/ + report.")
    target.add_argument("--evaluate", metavar="MODEL_DIR", help="Only score an existing toy model folder.")
    target.add_argument("--compare", metavar="MODEL_DIR",
                        help="Only compare a trained folder with --compare-with (no training).")
    parser.add_argument("--compare-with", metavar="SHIPPED_DIR", default=None,
                        help="After training (or with --compare): check the quality figures against this folder "
                             "(e.g. models/toy-world); exit 1 when one falls more than --tolerance below it")
    parser.add_argument("--tolerance", type=float, default=REPRODUCTION_TOLERANCE)
    parser.add_argument(
        "--minutes", type=float, default=None, help="Wall-clock cap (safety stop) in minutes; none by default"
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model and the classifier runs.")
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--classifier-steps", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--eval-images-per-prompt", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--inference-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluation = replace(
        ToyEvaluationConfig(),
        **{
            key: value
            for key, value in {
                "images_per_prompt": args.eval_images_per_prompt,
                "guidance_scale": args.guidance_scale,
                "num_inference_steps": args.inference_steps,
            }.items()
            if value is not None
        },
    )
    if args.evaluate is not None:
        print(json.dumps(evaluate_toy_model(args.evaluate, evaluation=evaluation), indent=2))
        return 0
    if args.compare is not None:
        if args.compare_with is None:
            parser.error("--compare needs --compare-with SHIPPED_DIR")
        return _report_comparison(args.compare, args.compare_with, args.tolerance)
    classifier = ClassifierTrainingConfig(seed=args.seed)
    if args.classifier_steps is not None:
        classifier = replace(classifier, steps=args.classifier_steps)
    overrides = {
        key: value
        for key, value in {
            "vae_steps": args.vae_steps,
            "unet_steps": args.unet_steps,
            "num_images": args.num_images,
        }.items()
        if value is not None
    }
    training = replace(
        ToyTrainingConfig(seed=args.seed, max_minutes=args.minutes, classifier=classifier), **overrides
    )
    train_toy_model(args.out, ToyModelConfig(), training, evaluation, verbose=True)
    if args.compare_with is not None:
        return _report_comparison(args.out, args.compare_with, args.tolerance)
    return 0


def _report_comparison(new_dir: str, shipped_dir: str, tolerance: float) -> int:
    result = compare_with_shipped(new_dir, shipped_dir, tolerance)
    (Path(new_dir) / REPRODUCTION_FILENAME).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_comparison(result))
    return 0 if result["reproduced"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
