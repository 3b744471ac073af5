"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): a UNet on ``(B, 4, H/8, W/8)`` latents, one CLIP
text encoder, integer DDPM-style timesteps, classifier-free guidance as ``[unconditional; conditional]``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ddr_core.families.base import Conditioning, ModelFamily
from ddr_core.hooks import HookPoint


def unet_probe_inputs(unet: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A minimal ``(sample, timestep, context)`` for a probe forward: ``2**(levels-1)``-pixel latent, one token."""
    config = unet.config
    parameter = next(unet.parameters())
    side = 2 ** max(len(config.down_block_types) - 1, 0)
    sample = torch.zeros(1, config.in_channels, side, side, device=parameter.device, dtype=parameter.dtype)
    cross_dim = config.cross_attention_dim
    cross_dim = cross_dim[0] if isinstance(cross_dim, list | tuple) else cross_dim
    context = torch.zeros(1, 1, cross_dim, device=parameter.device, dtype=parameter.dtype)
    timestep = torch.tensor([0], device=parameter.device)
    return sample, timestep, context


def unet_layer_width(unet: nn.Module, layer_name: str) -> int:
    """Channels of a UNet layer's output, from a probe forward on a ``2**(levels-1)``-pixel latent (a fraction of
    a real step)."""
    from ddr_core.hooks import forward_to_layer
    from ddr_core.pipeline import resolve_layer

    layer = resolve_layer(unet, layer_name)
    sample, timestep, context = unet_probe_inputs(unet)
    with torch.no_grad():
        output = forward_to_layer(unet, layer, sample, timestep, context)
    return int(output.shape[1])


def unet_signal_fraction(scheduler: Any, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``sqrt(alpha_bar_t)`` (float64 CPU) of a DDPM-style scheduler at integer ``timesteps``.

    Raises:
        ValueError: the scheduler has no ``alphas_cumprod`` or a timestep lies outside it.
    """
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod: its signal fraction is "
                         f"unknown; use a DDPM-style scheduler (DDPM, DDIM, Euler)")
    alphas = torch.as_tensor(alphas).detach().cpu().double()
    index = torch.as_tensor(timesteps).long().flatten().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= alphas.numel()):
        raise ValueError(f"timesteps {sorted(set(index.tolist()))} lie outside the scheduler's 0..{alphas.numel() - 1}")
    return alphas[index].clamp(min=0.0).sqrt()


class UNetFamily(ModelFamily):
    """What every diffusers UNet pipeline shares: ``pipe.unet``, ``pipe.vae``, a DDPM-style ``pipe.scheduler``."""

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.unet.config.in_channels)

    @property
    def default_size(self) -> tuple[int, int]:
        size = self.pipe.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(height) * self.vae_scale_factor, int(width) * self.vae_scale_factor)

    @property
    def num_train_timesteps(self) -> int:
        return int(getattr(self.pipe.scheduler.config, "num_train_timesteps", 1000))

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer

    def scheduler_timesteps(self, num_inference_steps: int, height: int | None = None,
                            width: int | None = None) -> list[int]:
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        return [int(t) for t in scheduler.timesteps.tolist()]

    def track_timesteps(self) -> Any:
        from ddr_core.hooks import TimestepTracker

        return TimestepTracker(self.denoiser)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.pipe.scheduler.add_noise(clean, noise, timesteps)

    def signal_fraction(self, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``sqrt(alpha_bar_t)`` from the scheduler's ``alphas_cumprod`` (DDPM, DDIM, Euler, ...: every scheduler
        of a UNet family; SDXL's :meth:`add_noise` mixes with the same factor)."""
        return unet_signal_fraction(self.pipe.scheduler, timesteps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Any]:
        """VAE-decode ``(n, 4, h, w)`` to PIL images (``(x + 1) / 2`` clamped, rounded, like the pipeline)."""
        from PIL import Image

        vae = self.pipe.vae
        images = []
        for chunk in latents.split(batch_size):
            chunk = torch.nan_to_num(chunk.float(), nan=0.0, posinf=0.0, neginf=0.0)
            decoded = vae.decode((chunk / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)).sample
            pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
                images.append(Image.fromarray(array))
        return images


class StableDiffusionFamily(UNetFamily):
    """SD 1.x / 2.x: conditioning is the CLIP token embeddings ``prompt_embeds (B, 77, cross_attention_dim)``."""

    name: ClassVar[str] = "sd"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)

    @classmethod
    def check_folder(cls, model_dir: str | Path) -> Path:
        from ddr_core.pipeline import check_model_folder

        return check_model_folder(model_dir)

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> StableDiffusionFamily:
        from diffusers import StableDiffusionPipeline

        from ddr_core.pipeline import load_diffusers_folder

        dtype = torch.float32 if dtype is None else dtype

        pipe = load_diffusers_folder(
            StableDiffusionPipeline, cls.check_folder(model_dir), device, dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        return cls(pipe)

    def layer_width(self, layer_name: str) -> int:
        return unet_layer_width(self.denoiser, layer_name)

    def encode_prompt(self, prompt: str) -> Conditioning:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return Conditioning({"prompt_embeds": embeds.to(device=self.device, dtype=self.dtype)})

    def generate(self, *, latents: torch.Tensor, height: int, width: int, num_inference_steps: int,
                 guidance_scale: float, prompts: Sequence[str] | None = None,
                 conditioning: Conditioning | None = None, output_type: str = "pil") -> Any:
        text = {"prompt": list(prompts)} if prompts is not None else {"prompt_embeds": conditioning["prompt_embeds"]}
        return self.pipe(
            **text, latents=latents, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, output_type=output_type,
        ).images

    def forward_to_layer(self, layer: HookPoint | nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                         conditioning: Conditioning) -> torch.Tensor:
        from ddr_core.hooks import forward_to_layer

        return forward_to_layer(self.denoiser, layer, sample, timesteps, conditioning["prompt_embeds"])
