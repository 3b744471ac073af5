"""Stable Diffusion XL and SDXL-Turbo (``StableDiffusionXLPipeline``).

What differs from SD 1.x (:mod:`ddr_core.families.sd`):

* **two text encoders**: a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``; the token embeddings are
  the penultimate hidden states of both, concatenated along the channels (``prompt_embeds (B, 77, 768 + 1280)``
  in SDXL), and the second encoder's projected EOS embedding is the **pooled** embedding
  (``pooled_prompt_embeds (B, 1280)``). :class:`~ddr_core.families.base.Conditioning` holds both.
* **added conditions** (``addition_embed_type="text_time"``): every UNet call also takes
  ``added_cond_kwargs = {"text_embeds": pooled, "time_ids": add_time_ids}`` where ``add_time_ids`` is the
  six numbers ``(original height, original width, crop top, crop left, target height, target width)``. This
  family always uses ``original = target = the generated image size`` and crop ``(0, 0)``, as the pipeline
  does by default, so they follow from the latent's size (:meth:`StableDiffusionXLFamily.add_time_ids`).
* **schedulers**: SDXL ships ``EulerDiscreteScheduler`` (variance-exploding parameterisation: the pipeline
  scales the UNet input by ``1 / sqrt(sigma^2 + 1)``). :meth:`add_noise` therefore noises with the
  scheduler's ``alphas_cumprod`` directly (``sqrt(a_t) x + sqrt(1 - a_t) n``), which is exactly the UNet input
  the pipeline builds at timestep ``t`` and is defined for every integer ``t``, not only the current schedule.
* **SDXL-Turbo** is the same architecture and pipeline, distilled for 1-4 steps without classifier-free
  guidance (``guidance_scale=0``), with ``EulerAncestralDiscreteScheduler(timestep_spacing="trailing")``:
  4 steps run at timesteps ``999, 749, 499, 249``, 1 step at ``999``. See :data:`TURBO_NOTE`.

The module also builds the tiny random SDXL-architecture folders used by tests and the Dagster UI
(:func:`build_tiny_sdxl_pipeline`, :func:`build_tiny_sdxl_turbo_pipeline`, :func:`build_tiny_sdxl_sae`): offline,
seeded, safetensors only, seconds on a CPU, with SDXL's real block names (``down_blocks.2.attentions.1``,
``mid_block.attentions.0``, ``up_blocks.0.attentions.0`` / ``.1``) so the sdxl-unbox SAEs' layers exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ddr_core.families.base import Conditioning
from ddr_core.families.sd import UNetFamily
from ddr_core.hooks import HookPoint

SDXL_COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "text_encoder_2": ("config.json",),
    "tokenizer": (),
    "tokenizer_2": (),
    "scheduler": ("scheduler_config.json",),
}
"""Component folder -> files that must exist in an SDXL folder (weights are checked separately)."""

SDXL_UNBOX_LAYERS: tuple[str, ...] = (
    "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.0.attentions.0",
    "up_blocks.0.attentions.1",
)
"""The four transformer blocks of SDXL-Turbo's UNet that the sdxl-unbox SAEs read (their residual update)."""

TINY_SDXL_TARGET_LAYER = "up_blocks.0.attentions.1"

TURBO_NOTE = (
    "SDXL-Turbo runs 1-4 steps with guidance_scale 0: capture with num_inference_steps 1-4 and guidance_scale 0 "
    "(no unconditional half is recorded), compute timestep_stats with profile: sampled, and run priors with the "
    "same few steps."
)


def _weights_variant(root: Path) -> str | None:
    """``"fp16"`` when the folder holds only ``*.fp16.safetensors`` UNet weights (a hub ``variant``)."""
    unet = root / "unet"
    plain = list(unet.glob("diffusion_pytorch_model.safetensors"))
    half = list(unet.glob("diffusion_pytorch_model.fp16.safetensors"))
    return "fp16" if half and not plain else None


class StableDiffusionXLFamily(UNetFamily):
    """SDXL / SDXL-Turbo: conditioning ``prompt_embeds (B, 77, cross_attention_dim)`` and
    ``pooled_prompt_embeds (B, pooled_dim)``; the UNet also gets ``add_time_ids`` built from the image size."""

    name: ClassVar[str] = "sdxl"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)

    @classmethod
    def check_folder(cls, model_dir: str | Path) -> Path:
        from ddr_core.pipeline import check_model_folder

        return check_model_folder(model_dir, SDXL_COMPONENTS, ("unet", "vae", "text_encoder", "text_encoder_2"))

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> StableDiffusionXLFamily:
        from diffusers import StableDiffusionXLPipeline

        from ddr_core.pipeline import load_diffusers_folder

        dtype = torch.float32 if dtype is None else dtype

        root = cls.check_folder(model_dir)
        extra: dict[str, Any] = {"add_watermarker": False}
        variant = _weights_variant(root)
        if variant:
            extra["variant"] = variant
        return cls(load_diffusers_folder(StableDiffusionXLPipeline, root, device, dtype, **extra))

    # --------------------------------------------------------------------------------------- conditioning
    @property
    def pooled_dim(self) -> int:
        """Width of ``pooled_prompt_embeds`` the UNet's added embedding expects."""
        config = self.denoiser.config
        return int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)

    def add_time_ids(self, height: int, width: int, batch: int) -> torch.Tensor:
        """``(batch, 6)`` ``(height, width, 0, 0, height, width)`` in pixels: original size = target size, no crop."""
        row = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return row.expand(batch, 6)

    def added_cond_kwargs(self, conditioning: Conditioning, height: int, width: int) -> dict[str, torch.Tensor]:
        """The UNet's ``added_cond_kwargs`` for a conditioning batch at an image size."""
        pooled = conditioning["pooled_prompt_embeds"]
        return {"text_embeds": pooled, "time_ids": self.add_time_ids(height, width, pooled.shape[0])}

    def encode_prompt(self, prompt: str) -> Conditioning:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            )
        return Conditioning({"prompt_embeds": embeds.to(device=self.device, dtype=self.dtype),
                             "pooled_prompt_embeds": pooled.to(device=self.device, dtype=self.dtype)})

    # ------------------------------------------------------------------------------------------- layers
    def layer_width(self, layer_name: str) -> int:
        """Channels of ``layer_name``'s output, from a probe forward (a ``2**(levels-1)``-pixel latent, one token,
        zero added conditions)."""
        from ddr_core.families.sd import unet_probe_inputs
        from ddr_core.hooks import forward_to_layer

        layer = self.resolve_layer(layer_name)
        sample, timestep, context = unet_probe_inputs(self.denoiser)
        added = {"text_embeds": torch.zeros(1, self.pooled_dim, device=sample.device, dtype=sample.dtype),
                 "time_ids": torch.zeros(1, 6, device=sample.device, dtype=sample.dtype)}
        with torch.no_grad():
            output = forward_to_layer(self.denoiser, layer, sample, timestep, context, added_cond_kwargs=added)
        return int(output.shape[1] if output.ndim == 4 else output.shape[-1])

    # --------------------------------------------------------------------------------------------- calls
    def generate(self, *, latents: torch.Tensor, height: int, width: int, num_inference_steps: int,
                 guidance_scale: float, prompts: Sequence[str] | None = None,
                 conditioning: Conditioning | None = None, output_type: str = "pil") -> Any:
        if prompts is not None:
            text: dict[str, Any] = {"prompt": list(prompts)}
        elif conditioning is not None:
            text = {"prompt_embeds": conditioning["prompt_embeds"],
                    "pooled_prompt_embeds": conditioning["pooled_prompt_embeds"]}
        else:
            raise ValueError("generate needs prompts or a conditioning")
        size = (int(height), int(width))
        return self.pipe(
            **text, latents=latents, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, output_type=output_type, original_size=size, target_size=size,
            crops_coords_top_left=(0, 0),
        ).images

    def forward_to_layer(self, layer: HookPoint | nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                         conditioning: Conditioning) -> torch.Tensor:
        from ddr_core.hooks import forward_to_layer

        height, width = (int(side) * self.vae_scale_factor for side in sample.shape[-2:])
        return forward_to_layer(self.denoiser, layer, sample, timesteps, conditioning["prompt_embeds"],
                                added_cond_kwargs=self.added_cond_kwargs(conditioning, height, width))

    # --------------------------------------------------------------------------------------------- latents
    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) clean + sqrt(1 - a_t) noise`` with the scheduler's ``alphas_cumprod``: the UNet input at ``t``
        (an Euler scheduler's own ``add_noise`` gives the unscaled ``x + sigma n`` and only for its schedule)."""
        alphas = self.pipe.scheduler.alphas_cumprod.to(device=clean.device, dtype=torch.float32)
        index = torch.as_tensor(timesteps, device=clean.device).long().flatten()
        alpha = alphas[index].view(-1, *([1] * (clean.ndim - 1)))
        mixed = alpha.sqrt() * clean.float() + (1 - alpha).sqrt() * noise.to(clean.device).float()
        return mixed.to(clean.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Any]:
        """VAE-decode like the pipeline; SDXL's VAE overflows in float16 (``force_upcast``), so it decodes in
        float32 then."""
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
            try:
                return super().decode(latents, batch_size)
            finally:
                vae.to(torch.float16)
        return super().decode(latents, batch_size)


# ------------------------------------------------------------------------------------------------------------
# Tiny random SDXL-architecture folders (tests, the Dagster UI's tiny-sdxl partitions)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySdxlConfig:
    """Architecture and seed of the tiny SDXL-shaped model (SDXL's block layout at toy widths).

    ``unet_block_out_channels`` has SDXL's three levels: ``DownBlock2D`` then two ``CrossAttnDownBlock2D``,
    ``layers_per_block`` 2, so ``down_blocks.2.attentions.1``, ``mid_block.attentions.0`` and
    ``up_blocks.0.attentions.0`` / ``.1`` / ``.2`` exist. Two text encoders of ``text_hidden_size`` each give the
    cross-attention width ``2 * text_hidden_size``; the pooled width is ``text_hidden_size``.
    """

    seed: int = 0
    image_size: int = 64
    unet_block_out_channels: tuple[int, ...] = (16, 32, 32)
    unet_transformer_layers: tuple[int, ...] = (1, 1, 1)
    unet_attention_heads: tuple[int, ...] = (2, 2, 4)
    unet_norm_num_groups: int = 8
    addition_time_embed_dim: int = 8
    vae_block_out_channels: tuple[int, ...] = (8, 16, 16, 16)
    vae_norm_num_groups: int = 8
    latent_channels: int = 4
    text_hidden_size: int = 16
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 32

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_block_out_channels) - 1)


def _tiny_sdxl_unet(config: TinySdxlConfig):
    from diffusers import UNet2DConditionModel

    from ddr_core.tiny_model import _seeded

    with _seeded(config.seed * 1000 + 11):
        return UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=config.unet_block_out_channels,
            layers_per_block=2,
            transformer_layers_per_block=config.unet_transformer_layers,
            attention_head_dim=config.unet_attention_heads,
            use_linear_projection=True,
            cross_attention_dim=2 * config.text_hidden_size,
            norm_num_groups=config.unet_norm_num_groups,
            addition_embed_type="text_time",
            addition_time_embed_dim=config.addition_time_embed_dim,
            projection_class_embeddings_input_dim=6 * config.addition_time_embed_dim + config.text_hidden_size,
        ).eval()


def _tiny_text_encoders(config: TinySdxlConfig, tokenizer: Any):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ddr_core.tiny_model import _seeded

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size, num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=config.text_hidden_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(config.seed * 1000 + 13):
        first = CLIPTextModel(text_config).eval()
    with _seeded(config.seed * 1000 + 14):
        second = CLIPTextModelWithProjection(text_config).eval()
    return first, second


def sdxl_scheduler(turbo: bool = False):
    """SDXL's ``EulerDiscreteScheduler`` (scaled-linear betas, ``leading`` spacing, offset 1), or Turbo's
    ``EulerAncestralDiscreteScheduler`` with ``trailing`` spacing (as stabilityai/sdxl-turbo ships it)."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon", steps_offset=1)
    if turbo:
        return EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing")
    return EulerDiscreteScheduler(**common, timestep_spacing="leading", interpolation_type="linear")


def build_tiny_sdxl_pipeline(out_dir: str | Path, config: TinySdxlConfig = TinySdxlConfig(),
                             turbo: bool = False) -> Path:
    """Write a tiny random ``StableDiffusionXLPipeline`` folder (``turbo``: with SDXL-Turbo's scheduler).

    Components: the UNet of :class:`TinySdxlConfig` (``addition_embed_type="text_time"``), a four-level
    ``AutoencoderKL`` (8x, SDXL's scaling factor 0.13025), ``CLIPTextModel`` + ``CLIPTextModelWithProjection`` over
    the word tokenizer of :mod:`ddr_core.tokenizer` (both tokenizer folders), the SDXL or Turbo scheduler.
    Weights are safetensors, byte-identical for identical configs.
    """
    from diffusers import StableDiffusionXLPipeline

    from ddr_core.tiny_model import build_sd_vae, tiny_vocabulary
    from ddr_core.tokenizer import build_word_tokenizer

    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(tiny_vocabulary(), out_path / "tokenizer")
    tokenizer_2 = build_word_tokenizer(tiny_vocabulary(), out_path / "tokenizer_2")
    text_encoder, text_encoder_2 = _tiny_text_encoders(config, tokenizer)
    pipe = StableDiffusionXLPipeline(
        vae=build_sd_vae(config, config.seed, scaling_factor=0.13025).eval(),
        text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=_tiny_sdxl_unet(config), scheduler=sdxl_scheduler(turbo), add_watermarker=False,
    )
    pipe.save_pretrained(out_path, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # save_pretrained rewrites them; put the canonical files back
        build_word_tokenizer(tiny_vocabulary(), out_path / name)
    return out_path


def build_tiny_sdxl_turbo_pipeline(out_dir: str | Path) -> Path:
    """The tiny SDXL folder with SDXL-Turbo's scheduler (run it at 1-4 steps, ``guidance_scale`` 0)."""
    return build_tiny_sdxl_pipeline(out_dir, turbo=True)


def tiny_sdxl_layer_width(layer_name: str = TINY_SDXL_TARGET_LAYER,
                          config: TinySdxlConfig = TinySdxlConfig()) -> int:
    """Channels of ``layer_name`` in the tiny SDXL UNet (probe forward, no files)."""
    from ddr_core.families.sd import unet_probe_inputs
    from ddr_core.hooks import forward_to_layer
    from ddr_core.pipeline import resolve_layer

    unet = _tiny_sdxl_unet(config)
    sample, timestep, context = unet_probe_inputs(unet)
    added = {"text_embeds": torch.zeros(1, config.text_hidden_size), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        output = forward_to_layer(unet, resolve_layer(unet, layer_name), sample, timestep, context,
                                  added_cond_kwargs=added)
    return int(output.shape[1])


def build_tiny_sdxl_sae(out_root: str | Path, expansion_factor: int = 4, k: int = 4, seed: int = 0) -> Path:
    """Random SAEs in the sdxl-unbox layout for the tiny SDXL model's four sdxl-unbox layers (one folder each,
    :func:`ddr_core.sae_unbox.save_unbox_sae`); returns ``out_root``."""
    from ddr_core.sae_unbox import UnboxSae, save_unbox_sae, unbox_folder_name

    root = Path(out_root)
    for index, layer in enumerate(SDXL_UNBOX_LAYERS):
        width = tiny_sdxl_layer_width(layer)
        sae = UnboxSae.random(d_model=width, n_dirs=width * expansion_factor, k=k, seed=seed + index)
        save_unbox_sae(sae, root / unbox_folder_name(layer, sae.config) / "final")
    return root
