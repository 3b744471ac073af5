"""The training loops of the toy model: the VAE (:func:`train_vae`) and the denoiser, UNet and text
encoder together with an EMA of their weights (:func:`train_denoiser`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ddr_core.toy_training.config import ToyTrainingConfig


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
