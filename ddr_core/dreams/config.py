"""Parameters of the deep-dream stage (:class:`DreamConfig`) and what each batch element maximises
(:class:`DreamObjective`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ddr_core.basis import Basis, RawChannels, TopKSaeBasis
from ddr_core.config import config_hash
from ddr_core.lazy_imports import lazy_module
from ddr_core.regularisation import LatentAugmentation

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")

LogFn = Callable[[str], None]
TimestepKeyword = Literal["activity_peaks", "active_timesteps", "observed_peaks"]
TIMESTEP_KEYWORDS: tuple[str, ...] = ("activity_peaks", "active_timesteps", "observed_peaks")
KEYWORD_TABLES: dict[str, str] = {"activity_peaks": "activity_peaks", "active_timesteps": "active_timesteps",
                                  "observed_peaks": "activity_peaks"}
"""Timestep keyword -> the statistics table (``<name>.parquet``) it is read from."""
DEFAULT_SEEDS: tuple[int, ...] = (1024, 1111, 4359, 3248, 1026)
StartKind = Literal["prior", "noise", "example"]
ObjectiveKind = Literal["activation", "pre_activation"]
ParameterisationKind = Literal["latent", "x0_prediction", "sampler", "maco"]
STAT_NAMES: tuple[str, ...] = ("activation", "tv", "range", "moment", "loss")


class DreamConfig(BaseModel):
    """Parameters of the deep-dream stage (defaults as in the thesis' final deep-dream run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timesteps: list[int | TimestepKeyword] = Field(
        default_factory=lambda: [0, "activity_peaks"], min_length=1,
        description="fixed timesteps and/or 'activity_peaks' / 'active_timesteps' / 'observed_peaks' (from the "
                    "timestep stats)",
    )
    use_just_one_timestep: bool = Field(False, description="only the first resolved timestep per channel")
    use_prior: bool = Field(True, description="start from the priors' latents; else from seeded noise "
                                              "(``start`` overrides it)")
    start: Literal["auto", "prior", "noise", "example"] = Field(
        "auto", description="where each dream starts: 'prior' (the priors' latents), 'noise' (seeded noise) or "
                          "'example' (the final latent of one of the channel's top dataset examples, regenerated "
                          "from its recorded seed and prompt; feature accentuation); 'auto': use_prior decides")
    objective: ObjectiveKind = Field(
        "activation", description="what the optimiser maximises: the unit's activation, or (SAE features) its "
                                  "pre-activation, the encoder output before the ReLU, which has a gradient where "
                                  "the feature is inactive; the reported activation is always the real one")
    parameterisation: ParameterisationKind = Field(
        "latent", description="what is optimised (ddr_core.dreams.parameterisations): 'latent' the clean latent; "
                              "'x0_prediction' a latent whose denoiser x0-prediction is the picture (re-noised to t "
                              "for the objective); 'sampler' the initial noise, through sampler_steps DDIM steps to "
                              "t (needs start: noise); 'maco' the phase of a latent whose amplitude spectrum is fixed "
                              "to the model's own samples' (MACO)")
    sampler_steps: int = Field(4, ge=1, le=200, description="parameterisation sampler: DDIM steps from the "
                                                           "last timestep down to the dream's (and as many on to 0 "
                                                           "for the picture)")
    gradient_checkpointing: bool = Field(True, description="parameterisation sampler: recompute each denoiser "
                                                           "call in the backward pass instead of storing it")
    x0_projection_timestep: int | None = Field(
        None, ge=0, le=999, description="parameterisation x0_prediction: the timestep the latent is noised to "
                                        "before the denoiser predicts x0; null: the dream's timestep")
    maco_reference_samples: int = Field(16, ge=2, le=1024, description="parameterisation maco: model samples "
                                                                       "whose mean amplitude spectrum is kept")
    maco_reference_steps: int = Field(10, ge=1, le=200, description="parameterisation maco: DDIM steps of each "
                                                                    "reference sample")
    n_results: int = Field(5, ge=1, le=1024, description="dreams per (channel, timestep): seeds / priors used")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), min_length=1,
                             description="noise seeds when use_prior is false")
    num_steps: int = Field(100, ge=1, le=100_000, description="optimisation steps")
    learning_rate: float = Field(0.05, gt=0.0, le=10.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay")
    see_through_schedule_noise: bool = Field(True, description="add the scheduler's noise for t each step")
    min_signal: float = Field(
        0.025, ge=0.0, le=1.0,
        description="with schedule noise on, skip timesteps whose signal fraction (the share of the clean latent "
                    "that survives the noise: sqrt(alpha_bar_t), 1 - sigma for flow matching) is below this: their "
                    "gradient is ~0 and the dream would be a no-op. 0.025 from the toy world's zero-terminal-SNR "
                    "schedule (t >= 959, signal <= 0.019, never raised; t = 919, signal 0.042, raised); 0: keep all")
    total_variation_weight: float = Field(0.5, ge=0.0)
    range_penalty_weight: float = Field(0.5, ge=0.0)
    range_penalty_threshold: float = Field(3.0, gt=0.0)
    moment_penalty_weight: float = Field(0.0, ge=0.0)
    fourier_preconditioning: bool = Field(True, description="scale gradient spectrum by 1/(|f|+1)")
    gradient_smoothing_kernel_size: int = Field(9, ge=1, le=63)
    gradient_smoothing_sigma_start: float = Field(0.5, ge=0.0)
    gradient_smoothing_sigma_end: float = Field(0.0, ge=0.0)
    augmentation_level: int = Field(1, ge=0, le=3, description="preset: jitter/rotate/scale 0-3")
    jitter_max: int | None = Field(None, ge=0, le=256, description="overrides the preset (latent pixels)")
    rotate_max: float | None = Field(None, ge=0.0, le=180.0, description="overrides the preset (degrees)")
    scale_max: float | None = Field(None, ge=1.0, le=4.0, description="overrides the preset (zoom)")
    snapshot_every: int = Field(10, ge=0, description="snapshot image + stats every n steps; 0: none")
    quality_noise_draws: int = Field(4, ge=1, le=64, description="noise draws averaged by the quality check")
    batch_size: int = Field(16, ge=1, le=4096, description="(channel, timestep, seed) elements per optimisation batch")
    random_seed: int = Field(0, ge=0, description="base seed of augmentation and noise draws")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="UNet dtype of the forward pass (latents stay float32)"
    )

    @field_validator("timesteps", mode="before")
    @classmethod
    def _known_timesteps(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise ValueError("timesteps must be a list of integers and/or 'activity_peaks' / 'active_timesteps' / "
                             "'observed_peaks'")
        # integers may come as strings (Dagster run config holds the list as strings)
        value = [int(v) if isinstance(v, str) and v.strip().lstrip("-").isdigit() else v for v in value]
        for item in value:
            if isinstance(item, bool) or (not isinstance(item, int | str)):
                raise ValueError(f"timesteps: {item!r} is neither an integer timestep nor a keyword")
            if isinstance(item, str) and item not in TIMESTEP_KEYWORDS:
                raise ValueError(
                    f"timesteps: unknown keyword {item!r}; use an integer timestep or one of {list(TIMESTEP_KEYWORDS)}"
                )
            if isinstance(item, int) and item < 0:
                raise ValueError(f"timesteps: {item} is negative; timesteps lie in 0..num_train_timesteps-1")
        return list(value)

    @field_validator("gradient_smoothing_kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"gradient_smoothing_kernel_size must be odd, got {value}")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be unique, got {value}")
        if any(seed < 0 for seed in value):
            raise ValueError(f"seeds must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _enough_seeds(self) -> DreamConfig:
        if self.start != "auto" and "use_prior" in self.model_fields_set and self.use_prior != (
                self.start == "prior") and self.start != "example":
            raise ValueError(f"use_prior: {str(self.use_prior).lower()} contradicts start: {self.start}; set only "
                             f"start (prior | noise | example)")
        if self.parameterisation == "sampler" and self.start_from != "noise":
            raise ValueError(f"parameterisation: sampler optimises the sampler's initial noise, so it needs start: "
                             f"noise (got start {self.start_from!r}); set start: noise (and use_prior: false)")
        if self.start_from == "noise" and self.n_results > len(self.seeds):
            raise ValueError(
                f"n_results={self.n_results} needs at least as many seeds (dreams start from noise), got "
                f"{len(self.seeds)}: add seeds or lower n_results"
            )
        return self

    @property
    def start_from(self) -> StartKind:
        """Where dreams start: ``start``, or (``auto``) ``prior`` / ``noise`` from ``use_prior``."""
        if self.start != "auto":
            return self.start
        return "prior" if self.use_prior else "noise"

    def augmentation(self) -> LatentAugmentation:
        """The preset of ``augmentation_level`` with the explicit overrides applied."""
        return LatentAugmentation.preset(
            self.augmentation_level, self.jitter_max, self.rotate_max, self.scale_max
        )

    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

    def config_hash(self) -> str:
        """16 hex digits identifying what the config does. ``start`` and ``objective`` enter only where they
        change something (``start: example``, ``objective: pre_activation``): a config that leaves them at
        their defaults hashes as before they existed (so does ``parameterisation: latent`` with its settings), so earlier dream folders keep their hash (and
        ``start: prior`` / ``noise`` hash like ``use_prior: true`` / ``false``)."""
        payload = self.model_dump(mode="json")
        if self.start_from != "example":
            payload.pop("start")
            payload["use_prior"] = self.start_from == "prior"
        if self.objective == "activation":
            payload.pop("objective")
        if self.parameterisation == "latent":  # the manifold parameterisations' settings change nothing then
            for key in ("parameterisation", "sampler_steps", "gradient_checkpointing", "x0_projection_timestep",
                        "maco_reference_samples", "maco_reference_steps"):
                payload.pop(key)
        return config_hash(payload)


@dataclass(frozen=True)
class DreamObjective:
    """What each batch element maximises: a unit of the variant's basis (:mod:`ddr_core.basis`): a raw
    channel, or an SAE feature's pre-top-k activation (only the encoder rows of the chosen features are
    computed), averaged over positions.

    Attributes:
        channels: ``(batch,)`` long: channel (raw) or feature index (SAE) per element.
        basis: the variant's :class:`~ddr_core.basis.Basis` (default: raw channels).
    """

    channels: torch.Tensor
    basis: Basis = field(default_factory=lambda: RawChannels(None))

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", torch.as_tensor(self.channels, dtype=torch.long).flatten())

    @classmethod
    def raw(cls, channels: Sequence[int] | torch.Tensor) -> DreamObjective:
        return cls(torch.as_tensor(channels, dtype=torch.long))

    @classmethod
    def sae_features(cls, sae: nn.Module, features: Sequence[int] | torch.Tensor) -> DreamObjective:
        return cls(torch.as_tensor(features, dtype=torch.long), TopKSaeBasis(sae))

    def __len__(self) -> int:
        return int(self.channels.numel())

    def select(self, rows: torch.Tensor | Sequence[int]) -> DreamObjective:
        """The objective of a subset of elements."""
        return DreamObjective(self.channels[torch.as_tensor(rows, dtype=torch.long)], self.basis)

    def _tokens(self, layer_output: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        from ddr_core.hooks import activation_tokens

        channels = self.channels if rows is None else self.channels[rows.to(self.channels.device, non_blocking=True)]
        tokens = activation_tokens(layer_output).float()  # (n, N, C)
        if tokens.shape[0] != channels.numel():
            raise ValueError(f"layer batch {tokens.shape[0]} != {channels.numel()} objective elements")
        return tokens, channels

    def activations(self, layer_output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Spatial-mean activation of each element's unit.

        Args:
            layer_output: ``(n, C, H, W)`` or ``(n, positions, C)`` output of the layer.
            rows: which elements of the objective the ``n`` outputs belong to (default: all).

        Returns:
            ``(n,)`` float32, differentiable.
        """
        tokens, channels = self._tokens(layer_output, rows)
        return self.basis.unit_activations(tokens, channels)

    def targets(self, layer_output: torch.Tensor, rows: torch.Tensor | None = None,
                kind: ObjectiveKind = "activation") -> tuple[torch.Tensor, torch.Tensor]:
        """``(maximised, activation)``, each ``(n,)`` float32 and differentiable: what the optimiser maximises
        (``kind``: the activation, or the pre-activation of :meth:`~ddr_core.basis.Basis.unit_pre_activations`)
        and the real activation (what is reported)."""
        activation = self.activations(layer_output, rows)  # the one path of the reported activation
        if kind == "activation":
            return activation, activation
        if kind == "pre_activation":
            tokens, channels = self._tokens(layer_output, rows)
            return self.basis.unit_pre_activations(tokens, channels), activation
        raise ValueError(f"objective must be 'activation' or 'pre_activation', got {kind!r}")
