"""The toy model's shape (:class:`ToyModelConfig`), its training (:class:`ToyTrainingConfig`) and
evaluation (:class:`ToyEvaluationConfig`), and the untrained components built from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ddr_core.concept_classifier import ClassifierTrainingConfig
from ddr_core.tiny_model import build_clip_text_encoder, build_sd_scheduler, build_sd_unet, build_sd_vae

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
        world: The toy world trained on (:data:`ddr_core.toy_world.WORLDS`): ``"shapes"`` (the shipped
            ``models/toy-world``) or ``"shapes-rich"`` (docs/TOY_WORLD.md).
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
    world: str = "shapes"

    def __post_init__(self) -> None:
        from ddr_core.toy_world import world_concepts

        world_concepts(self.world)
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
