"""An embedded, deterministic, randomly initialised Stable-Diffusion-shaped model for tests and demos.

:func:`build_tiny_pipeline` writes a complete diffusers ``StableDiffusionPipeline`` folder
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
all weights as safetensors) whose module names mirror Stable Diffusion 1.x, so the layer
``up_blocks.1.attentions.1`` that SAeUron's SAEs read exists here too. Nothing is downloaded:
weights come from a seeded initialisation, the tokenizer from :mod:`ddr_core.tokenizer` over the
words of :data:`TINY_PROMPTS`. Identical configs give byte-identical safetensors files.

The model is untrained; images are structured noise. It exists so that every pipeline stage
(generation, hooks, SAE statistics, steering, visualisation) runs end to end on a CPU in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch

TINY_TARGET_LAYER = "up_blocks.1.attentions.1"

_COLOURS = ("red", "green", "blue", "yellow")
_SHAPES = ("circle", "square", "triangle", "star")
_BACKGROUNDS = ("black", "white")

TINY_PROMPTS: tuple[str, ...] = tuple(
    f"a {colour} {shape} on a {background} background"
    for background, colour, shape in product(_BACKGROUNDS, _COLOURS, _SHAPES)
)
"""32 unique prompts: 4 colours x 4 shapes x 2 backgrounds, e.g. ``"a red circle on a black background"``."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Architecture and seed of the tiny Stable-Diffusion-shaped model.

    Attributes:
        seed: Seed of the weight initialisation (each component derives its own seed from it).
        image_size: Default generated image side in pixels (``unet.sample_size * 8``).
        unet_block_out_channels: UNet widths per resolution level; ``up_blocks.1`` outputs
            ``unet_block_out_channels[-2]`` channels.
        unet_layers_per_block: ResNet/attention pairs per down block (up blocks get one more).
        unet_attention_heads: Attention heads per transformer block (diffusers' legacy
            ``attention_head_dim`` argument).
        unet_norm_num_groups: GroupNorm groups; must divide every UNet width.
        vae_block_out_channels: AutoencoderKL widths; four levels give SD's 8x downscale.
        vae_norm_num_groups: GroupNorm groups of the VAE; must divide every VAE width.
        latent_channels: Latent channels (4 as in SD).
        text_hidden_size: CLIP text width, also the UNet cross-attention width.
        text_layers: CLIP text transformer layers.
        text_heads: CLIP text attention heads.
        text_intermediate_size: CLIP text MLP width.
    """

    seed: int = 0
    image_size: int = 64
    unet_block_out_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    unet_attention_heads: int = 4
    unet_norm_num_groups: int = 8
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    vae_norm_num_groups: int = 8
    latent_channels: int = 4
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 64

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor

    def __post_init__(self) -> None:
        if self.image_size % (self.vae_scale_factor * 2 ** (len(self.unet_block_out_channels) - 1)):
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of "
                f"{self.vae_scale_factor * 2 ** (len(self.unet_block_out_channels) - 1)} for this architecture."
            )
        if len(self.unet_block_out_channels) != 3:
            raise ValueError(
                "The tiny UNet mirrors SD with exactly 3 block widths (2 cross-attention levels)."
            )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for one component without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_vocabulary() -> list[str]:
    """Words of :data:`TINY_PROMPTS` in first-seen order."""
    from ddr_core.tokenizer import prompt_words

    return prompt_words(TINY_PROMPTS)


# --- component builders, shared with the toy-world training script ---------------------------------
# ``config`` is any object with the fields of :class:`TinyModelConfig` used here (``latent_size``,
# ``latent_channels``, ``unet_*``, ``vae_*``, ``text_*``, ``image_size``); ``seed`` seeds the weights.


def build_sd_unet(config: Any, seed: int):
    """A ``UNet2DConditionModel`` with SD's block layout (``up_blocks.1.attentions.1`` exists), seeded."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed * 1000 + 1):
        return UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=config.unet_block_out_channels,
            layers_per_block=config.unet_layers_per_block,
            attention_head_dim=config.unet_attention_heads,
            cross_attention_dim=config.text_hidden_size,
            norm_num_groups=config.unet_norm_num_groups,
        )


def build_sd_vae(config: Any, seed: int, scaling_factor: float = 0.18215, seed_offset: int = 2, **extra: Any):
    """An ``AutoencoderKL`` with one down/up block per ``vae_block_out_channels`` entry, seeded
    (``seed * 1000 + seed_offset``); ``extra``: further ``AutoencoderKL`` arguments (FLUX: ``shift_factor``)."""
    from diffusers import AutoencoderKL

    levels = len(config.vae_block_out_channels)
    with _seeded(seed * 1000 + seed_offset):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=config.vae_block_out_channels,
            layers_per_block=1,
            latent_channels=config.latent_channels,
            norm_num_groups=config.vae_norm_num_groups,
            sample_size=config.image_size,
            scaling_factor=scaling_factor,
            **extra,
        )


def build_clip_text_encoder(config: Any, tokenizer: Any, seed: int):
    """A ``CLIPTextModel`` over ``tokenizer``'s vocabulary, seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=config.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed * 1000 + 3):
        return CLIPTextModel(text_config)


def build_sd_scheduler():
    """``DDIMScheduler`` configured like SD 1.x (scaled-linear betas, epsilon prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_tiny_unet(config: TinyModelConfig = TinyModelConfig()):
    """The tiny ``UNet2DConditionModel`` (seeded, float32, CPU, eval mode)."""
    return build_sd_unet(config, config.seed).eval()


def build_tiny_pipeline(out_dir: str | Path, config: TinyModelConfig = TinyModelConfig()) -> Path:
    """Build the tiny model and save it as a diffusers ``StableDiffusionPipeline`` folder.

    Components: ``UNet2DConditionModel`` (down ``CrossAttnDownBlock2D x2, DownBlock2D``, up
    ``UpBlock2D, CrossAttnUpBlock2D x2``, so ``up_blocks.1.attentions.1`` exists), a four-level
    ``AutoencoderKL`` (8x downscale), a small ``CLIPTextModel`` over the word tokenizer (77
    positions) and a ``DDIMScheduler`` configured like SD 1.x. No safety checker, no feature
    extractor. Weights are safetensors, byte-identical for identical configs.

    Args:
        out_dir: Folder to write (created; files of the same name are overwritten).
        config: Architecture and seed.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from diffusers import StableDiffusionPipeline

    from ddr_core.tokenizer import build_word_tokenizer

    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(tiny_vocabulary(), out_path / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=build_sd_vae(config, config.seed).eval(),
        text_encoder=build_clip_text_encoder(config, tokenizer, config.seed).eval(),
        tokenizer=tokenizer,
        unet=build_tiny_unet(config),
        scheduler=build_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_path, safe_serialization=True)
    # save_pretrained rewrites tokenizer/ through transformers; put our canonical files back on top.
    build_word_tokenizer(tiny_vocabulary(), out_path / "tokenizer")
    return out_path


def tiny_layer_width(layer_name: str = TINY_TARGET_LAYER, config: TinyModelConfig = TinyModelConfig()) -> int:
    """Output channels of ``layer_name`` in the tiny UNet of ``config`` (probe forward, no files)."""
    from ddr_core.families.sd import unet_layer_width

    return unet_layer_width(build_tiny_unet(config), layer_name)


def build_tiny_sae(
    out_root: str | Path,
    layer_name: str = TINY_TARGET_LAYER,
    d_in: int | None = None,
    expansion_factor: int = 4,
    k: int = 8,
    seed: int = 0,
) -> Path:
    """Write a random top-k SAE for one layer of the tiny model in SAeUron format.

    Args:
        out_root: Folder holding SAE folders; the SAE goes to ``out_root/unet.<layer_name>/``
            (``cfg.json`` + ``sae.safetensors``).
        layer_name: UNet layer the SAE is meant for.
        d_in: Activation width; ``None`` means the width of ``layer_name`` in the default tiny model
            (64 for ``up_blocks.1.attentions.1``).
        expansion_factor: ``num_latents = d_in * expansion_factor``.
        k: Top-k of the SAE.
        seed: Seed of the random SAE weights.

    Returns:
        The SAE folder.
    """
    from ddr_core.sae import Sae, save_sae

    width = tiny_layer_width(layer_name) if d_in is None else d_in
    # Sae() runs nn.Linear's default init on the global RNG before Sae.random overwrites it.
    with _seeded(seed):
        sae = Sae.random(d_in=width, num_latents=width * expansion_factor, k=k, seed=seed)
    from ddr_core.paths import check_name

    folder = Path(out_root) / f"unet.{check_name(layer_name, 'layer')}"
    return Path(save_sae(sae, folder))


def build_tiny_prompts(out_dir: str | Path) -> Path:
    """The builtin prompt dataset folder: ``prompts.jsonl`` (:func:`write_builtin_prompts`) in ``out_dir``."""
    return write_builtin_prompts(Path(out_dir) / "prompts.jsonl")


def write_builtin_prompts(path: str | Path) -> Path:
    """Write :data:`TINY_PROMPTS` as JSON Lines, one ``{"text": prompt}`` object per line."""
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        "".join(json.dumps({"text": prompt}) + "\n" for prompt in TINY_PROMPTS), encoding="utf-8"
    )
    return out_path
