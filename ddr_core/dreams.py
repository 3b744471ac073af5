"""Deep dreams: latents optimised to maximise one channel (or SAE feature) at one timestep.

For a channel ``c`` of a UNet layer and a timestep ``t``, gradient ascent on a latent
``(batch, 4, h, w)`` maximises the channel's spatial-mean activation at the layer when the UNet
denoises that latent at ``t`` with the empty prompt. The UNet stops right after the layer
(:func:`~ddr_core.hooks.forward_to_layer`). Each step:

1. augment the latent (random jitter, rotation, zoom per element; :class:`LatentAugmentation`);
2. optionally add the scheduler's noise for ``t`` (``see_through_schedule_noise``);
3. loss = ``-activation + w_tv * TV + w_range * range + w_moment * moment`` per element
   (penalties on the un-augmented latent); the total loss is the sum over elements;
4. gradient w.r.t. the latent, then Fourier preconditioning and Gaussian smoothing per element;
5. an AdamW step.

**Batching.** A batch element is ``(channel, timestep, seed)``. The UNet takes a per-element timestep
tensor, so elements of many channels and timesteps share one forward pass. Penalties, gradient
transforms, augmentation and noise are per element and each element draws its random numbers from
its own generator (seeded from ``(random_seed, channel, timestep, seed)``), and AdamW is elementwise:
an element's result does not depend on which others share its batch (up to float rounding of
batched kernels). An element whose activation, loss, gradient or latent becomes NaN/inf stops
there: its latent is frozen at its last finite value and it is recorded as failed with the reason;
the others go on.

On disk (``out_dir``), one folder per channel, written atomically as a whole::

    channel_<c:05d>/
      t_<timestep:04d>/
        latents.safetensors   latents (n_seeds, 4, h, w) float32 final, initial_latents (same shape,
                              where the optimisation started: prior or seeded noise), seeds int64
        seed_<s>.png          final image per seed (VAE decode)
        stats.parquet         seed, step, activation, tv, range, moment, loss (one row per step run)
        steps/seed_<s>_step_<n:04d>.png   snapshots every ``snapshot_every`` steps (and the last)
      dream.json              written last: timesteps, seeds, final activations, failures, config
      quality.parquet         added by :func:`measure_dream_quality` (this channel's rows)
    quality.parquet           union of the channels' quality rows

and beside it ``.<out_dir name>.locks/``: the channel claims of live runs
(:func:`ddr_core.locks.claim_channels`) and ``quality.lock``, held while quality files are written.

A channel with ``dream.json`` is finished and skipped when the run resumes. A run claims its channels
for its whole duration: a second run on any of them fails at once naming the first (or waits), runs on
other channels of the same folder go on side by side; a resumed run deletes the temporary folders a
killed run left for its channels. The ranks of a multi-GPU job (:mod:`ddr_core.distributed`) are such
runs, one per round-robin share of the channels; rank 0 rewrites ``quality.parquet``
(:func:`write_quality_table`) once all of them are done.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from ddr_core.atomic import TEMP_MARKER, atomic_dir, atomic_path, atomic_write_json
from ddr_core.basis import Basis, RawChannels, TopKSaeBasis, as_basis
from ddr_core.channel_store import (  # noqa: F401 - channel_dir, timestep_dir_name, DREAM_FILE re-exported
    DREAM_FILE,
    PRIOR_LATENTS_FILE,
    channel_dir,
    prior_record_path,
    timestep_dir_name,
)
from ddr_core.channel_store import finished_channels as store_finished_channels
from ddr_core.config import config_hash
from ddr_core.hooks import HookPoint
from ddr_core.locks import claim_channels, format_channels, partition_lock, stage_locks_dir
from ddr_core.priors import check_channels
from ddr_core.regularisation import (
    LatentAugmentation,
    fourier_precondition,
    gaussian_smooth,
    moment_penalty,
    range_penalty,
    smoothing_sigma,
    total_variation,
)

LogFn = Callable[[str], None]
TimestepKeyword = Literal["activity_peaks", "active_timesteps", "observed_peaks"]
TIMESTEP_KEYWORDS: tuple[str, ...] = ("activity_peaks", "active_timesteps", "observed_peaks")
_KEYWORD_TABLES: dict[str, str] = {"activity_peaks": "activity_peaks", "active_timesteps": "active_timesteps",
                                   "observed_peaks": "activity_peaks"}
"""Timestep keyword -> the statistics table (``<name>.parquet``) it is read from."""
DEFAULT_SEEDS: tuple[int, ...] = (1024, 1111, 4359, 3248, 1026)
QUALITY_FILE = "quality.parquet"
QUALITY_LOCK_FILE = "quality.lock"
STAT_NAMES: tuple[str, ...] = ("activation", "tv", "range", "moment", "loss")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


class DreamConfig(BaseModel):
    """Parameters of the deep-dream stage (defaults as in the thesis' final deep-dream run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timesteps: list[int | TimestepKeyword] = Field(
        default_factory=lambda: [0, "activity_peaks"], min_length=1,
        description="fixed timesteps and/or 'activity_peaks' / 'active_timesteps' / 'observed_peaks' (from the "
                    "timestep stats)",
    )
    use_just_one_timestep: bool = Field(False, description="only the first resolved timestep per channel")
    use_prior: bool = Field(True, description="start from the priors' latents; else from seeded noise")
    n_results: int = Field(5, ge=1, le=1024, description="dreams per (channel, timestep): seeds / priors used")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), min_length=1,
                             description="noise seeds when use_prior is false")
    num_steps: int = Field(100, ge=1, le=100_000, description="optimisation steps")
    learning_rate: float = Field(0.05, gt=0.0, le=10.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay")
    see_through_schedule_noise: bool = Field(True, description="add the scheduler's noise for t each step")
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
        if not self.use_prior and self.n_results > len(self.seeds):
            raise ValueError(
                f"n_results={self.n_results} needs at least as many seeds (use_prior is false), got "
                f"{len(self.seeds)}: add seeds or lower n_results"
            )
        return self

    def augmentation(self) -> LatentAugmentation:
        """The preset of ``augmentation_level`` with the explicit overrides applied."""
        return LatentAugmentation.preset(
            self.augmentation_level, self.jitter_max, self.rotate_max, self.scale_max
        )

    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

    def config_hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------


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

    def activations(self, layer_output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Spatial-mean activation of each element's unit.

        Args:
            layer_output: ``(n, C, H, W)`` or ``(n, positions, C)`` output of the layer.
            rows: which elements of the objective the ``n`` outputs belong to (default: all).

        Returns:
            ``(n,)`` float32, differentiable.
        """
        from ddr_core.hooks import activation_tokens

        channels = self.channels if rows is None else self.channels[rows.to(self.channels.device)]
        tokens = activation_tokens(layer_output).float()  # (n, N, C)
        if tokens.shape[0] != channels.numel():
            raise ValueError(f"layer batch {tokens.shape[0]} != {channels.numel()} objective elements")
        return self.basis.unit_activations(tokens, channels)


# --------------------------------------------------------------------------------------------------
# The batched optimiser
# --------------------------------------------------------------------------------------------------


@dataclass
class DreamBatchResult:
    """Result of :func:`optimise_dreams` for ``B`` elements.

    Attributes:
        latents: ``(B, 4, h, w)`` float32 CPU final latents (failed elements: last finite value).
        history: stat name (``activation, tv, range, moment, loss``) -> ``(num_steps, B)`` float64;
            NaN where an element did not run that step. Penalties are unweighted; ``loss`` is the
            weighted total of the element. ``activation`` is measured on the augmented, noised input.
        snapshots: step -> ``(B, 4, h, w)`` CPU latents at the start of that step.
        failed: per element ``None`` or the reason it stopped.
        failed_step: per element the step it failed at, or ``None``.
    """

    latents: torch.Tensor
    history: dict[str, np.ndarray]
    snapshots: dict[int, torch.Tensor]
    failed: list[str | None]
    failed_step: list[int | None]
    seconds: float = 0.0

    @property
    def final_activation(self) -> np.ndarray:
        """``(B,)`` the last finite activation of each element (NaN when none)."""
        activation = self.history["activation"]
        out = np.full(activation.shape[1], np.nan)
        for element in range(activation.shape[1]):
            finite = np.nonzero(np.isfinite(activation[:, element]))[0]
            if finite.size:
                out[element] = activation[finite[-1], element]
        return out

    def steps_run(self, element: int) -> np.ndarray:
        """Steps that element ``element`` ran (its stats are recorded at those)."""
        return np.nonzero(~np.isnan(self.history["loss"][:, element]))[0]


def element_generators(seeds: Sequence[int], device: str = "cpu") -> list[torch.Generator]:
    """One CPU generator per element, seeded with ``seeds[i]``."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def element_seed(random_seed: int, channel: int, timestep: int, seed: int, draw: int = 0) -> int:
    """The random stream seed of one element: a function of its identity only."""
    state = np.random.SeedSequence([int(random_seed), int(channel), int(timestep), int(seed), int(draw)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _resolve_generators(generator: Any, batch: int) -> list[torch.Generator]:
    if isinstance(generator, Sequence) and not isinstance(generator, str):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} elements; pass one per element")
        return list(generator)
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (batch,), generator=source).tolist()
    return element_generators(seeds)


def _check_timesteps(timesteps: torch.Tensor, batch: int, total: int) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    if timesteps.numel() != batch:
        raise ValueError(f"timesteps must be (batch,) = ({batch},), got {tuple(timesteps.shape)}")
    if batch and (int(timesteps.min()) < 0 or int(timesteps.max()) >= total):
        raise ValueError(f"timesteps must lie in [0, {total}) (the scheduler's train timesteps), got "
                         f"{sorted(set(timesteps.tolist()))}")
    return timesteps


def optimise_dreams(
    pipe: Any,
    layer: HookPoint | nn.Module | str,
    objective: DreamObjective,
    init_latents: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    config: DreamConfig,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    snapshot_every: int | None = None,
) -> DreamBatchResult:
    """Optimise ``B`` dream latents at once (see the module docstring for one step).

    Args:
        pipe: a :class:`~ddr_core.families.ModelFamily` or a loaded diffusers pipeline.
        layer: the target hook point (:meth:`~ddr_core.families.ModelFamily.hook_point`), layer module or dotted name.
        objective: what each element maximises (``len(objective) == B``).
        init_latents: ``(B, 4, h, w)`` starting latents (e.g. priors).
        timesteps: ``(B,)`` integer timestep per element.
        config: optimisation parameters.
        generator: one generator per element (an element's draws then depend only on its own
            generator, so results do not depend on the batch), or one generator from which
            per-element generators are derived, or ``None`` (seed 0).
        snapshot_every: overrides ``config.snapshot_every`` (0: no snapshots).

    Returns:
        A :class:`DreamBatchResult`.
    """
    from ddr_core.families import as_model

    start = time.monotonic()
    model = as_model(pipe)
    layer_module = model.hook_point(layer) if isinstance(layer, str) else layer
    if init_latents.ndim != 4:
        raise ValueError(f"init_latents must be (batch, channels, height, width), got {tuple(init_latents.shape)}")
    batch = init_latents.shape[0]
    if len(objective) != batch:
        raise ValueError(f"objective has {len(objective)} elements but init_latents has {batch}")
    timesteps = _check_timesteps(timesteps, batch, model.num_train_timesteps)
    generators = _resolve_generators(generator, batch)
    every = config.snapshot_every if snapshot_every is None else snapshot_every
    device = model.device
    model_dtype = model.dtype
    augmentation = config.augmentation()
    context = model.encode_prompt("")
    timesteps_device = timesteps.to(device)

    latents = init_latents.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([latents], lr=config.learning_rate, weight_decay=config.weight_decay)
    history = {name: np.full((config.num_steps, batch), np.nan) for name in STAT_NAMES}
    snapshots: dict[int, torch.Tensor] = {}
    failed: list[str | None] = [None] * batch
    failed_step: list[int | None] = [None] * batch
    active = torch.ones(batch, dtype=torch.bool)
    initial_finite = torch.isfinite(latents.detach()).flatten(1).all(dim=1).cpu()
    for element in torch.nonzero(~initial_finite).flatten().tolist():
        failed[element], failed_step[element] = "non-finite initial latent", 0
        active[element] = False

    for step in range(config.num_steps):
        rows = torch.nonzero(active).flatten()
        if rows.numel() == 0:
            break
        if every and step % every == 0:
            snapshots[step] = latents.detach().float().cpu().clone()
        rows_device = rows.to(device)
        element_gens = [generators[i] for i in rows.tolist()]

        current = latents[rows_device]  # (n, 4, h, w), gradient flows back to `latents`
        augmented = augmentation(current, element_gens)
        if config.see_through_schedule_noise:
            noise = torch.cat([torch.randn((1, *current.shape[1:]), generator=g) for g in element_gens])
            augmented = model.add_noise(augmented, noise.to(device), timesteps_device[rows_device])
        output = model.forward_to_layer(
            layer_module, augmented.to(model_dtype), timesteps_device[rows_device], context.expand(rows.numel()),
        )
        activation = objective.activations(output, rows)
        tv = total_variation(current)
        out_of_range = range_penalty(current, config.range_penalty_threshold)
        moments = moment_penalty(current)
        loss = (
            -activation
            + config.total_variation_weight * tv
            + config.range_penalty_weight * out_of_range
            + config.moment_penalty_weight * moments
        )
        finite = torch.isfinite(loss) & torch.isfinite(activation)
        (grad,) = torch.autograd.grad(torch.where(finite, loss, torch.zeros_like(loss)).sum(), latents)
        element_grad = grad[rows_device]
        grad_finite = torch.isfinite(element_grad).flatten(1).all(dim=1)
        ok = finite & grad_finite

        values = {"activation": activation, "tv": tv, "range": out_of_range, "moment": moments, "loss": loss}
        for name, value in values.items():
            history[name][step, rows.numpy()] = value.detach().double().cpu().numpy()
        ok_cpu = ok.cpu()
        for position in torch.nonzero(~ok_cpu).flatten().tolist():
            element = int(rows[position])
            what = "activation" if not bool(torch.isfinite(activation[position])) else (
                "loss" if not bool(finite[position]) else "gradient")
            failed[element], failed_step[element] = f"non-finite {what} at step {step}", step
            active[element] = False

        element_grad = torch.where(ok[:, None, None, None], element_grad, torch.zeros_like(element_grad))
        if config.fourier_preconditioning:
            element_grad = fourier_precondition(element_grad)
        sigma = smoothing_sigma(
            step, config.num_steps, config.gradient_smoothing_sigma_start, config.gradient_smoothing_sigma_end
        )
        element_grad = gaussian_smooth(element_grad, sigma, config.gradient_smoothing_kernel_size)
        full_grad = torch.zeros_like(latents)
        full_grad[rows_device] = element_grad

        before = latents.detach().clone()
        latents.grad = full_grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            stepped_finite = torch.isfinite(latents).flatten(1).all(dim=1).cpu()
            for element in torch.nonzero(active & ~stepped_finite).flatten().tolist():
                failed[element], failed_step[element] = f"non-finite latent after step {step}", step
                active[element] = False
            frozen = (~active).to(device)
            latents[frozen] = before[frozen]  # failed / finished elements keep their last finite latent

    return DreamBatchResult(
        latents=latents.detach().float().cpu(),
        history=history,
        snapshots=snapshots,
        failed=failed,
        failed_step=failed_step,
        seconds=time.monotonic() - start,
    )


@torch.no_grad()
def measure_activations(
    pipe: Any,
    layer: HookPoint | nn.Module | str,
    objective: DreamObjective,
    latents: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    noise_generators: Sequence[Sequence[torch.Generator]] | None = None,
) -> torch.Tensor:
    """Activation of each element without augmentation, averaged over noise draws.

    Args:
        latents: ``(B, 4, h, w)``.
        timesteps: ``(B,)``.
        noise_generators: ``None`` for one clean forward per element; otherwise per draw a list of
            ``B`` generators giving the scheduler noise added at the element's timestep.

    Returns:
        ``(B,)`` float64 CPU; NaN where the latent is not finite.
    """
    from ddr_core.families import as_model

    model = as_model(pipe)
    layer_module = model.hook_point(layer) if isinstance(layer, str) else layer
    batch = latents.shape[0]
    timesteps = _check_timesteps(timesteps, batch, model.num_train_timesteps).to(model.device)
    context = model.encode_prompt("").expand(batch)
    clean = latents.to(device=model.device, dtype=torch.float32)
    draws = noise_generators if noise_generators else [None]
    total = torch.zeros(batch, dtype=torch.float64)
    for generators in draws:
        sample = clean
        if generators is not None:
            noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g) for g in generators])
            sample = model.add_noise(clean, noise.to(model.device), timesteps)
        output = model.forward_to_layer(layer_module, sample.to(model.dtype), timesteps, context)
        total += objective.activations(output).double().cpu()
    return total / len(draws)


# --------------------------------------------------------------------------------------------------
# Timesteps per channel
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _timestep_table(path: str, mtime_ns: int, kind: str) -> dict[int, list[int]]:
    frame = pl.read_parquet(path)
    if kind == "observed_peaks":  # the observed timestep nearest each peak (a step the model really ran)
        frame = frame.sort(["channel", "peak_rank"]).select("channel", pl.col("observed_timestep").alias("timestep"))
    elif kind == "activity_peaks":
        frame = frame.sort(["channel", "peak_rank"])
    else:
        frame = frame.sort(["channel", "timestep"])
    grouped = frame.group_by("channel", maintain_order=True).agg(pl.col("timestep"))
    return {int(c): [int(t) for t in ts] for c, ts in zip(grouped["channel"], grouped["timestep"], strict=True)}


def _load_timestep_table(stats_dir: Path, kind: str) -> dict[int, list[int]]:
    path = Path(stats_dir) / f"{_KEYWORD_TABLES.get(kind, kind)}.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the dream timesteps use {kind!r}, which comes from the timestep statistics; "
            f"compute the timestep_stats stage for this variant first, or use integer timesteps only"
        )
    return _timestep_table(str(path.resolve()), path.stat().st_mtime_ns, kind)


def resolve_dream_timesteps(
    stats_dir: str | Path | None, channel: int, spec: Sequence[int | str]
) -> list[int]:
    """The timesteps to dream ``channel`` at: ``spec``'s integers plus its keywords expanded.

    ``activity_peaks`` adds the channel's peaks (highest first), ``observed_peaks`` the observed (capture)
    timestep nearest each peak (highest peak first; for a few-step model such as FLUX.1-schnell, whose profile
    is interpolated between 1-4 observed timesteps, a plateau's middle is often a timestep the model never ran
    at), ``active_timesteps`` every timestep where its activity profile is > 0 (ascending). Order follows
    ``spec``; duplicates are dropped.
    A channel without peaks / active timesteps contributes none for that keyword.

    Raises:
        FileNotFoundError: a keyword is used but its table is missing from ``stats_dir``.
        ValueError: an unknown keyword.
    """
    resolved: list[int] = []
    for item in spec:
        if isinstance(item, str):
            if item not in TIMESTEP_KEYWORDS:
                raise ValueError(f"unknown timestep keyword {item!r}; use one of {list(TIMESTEP_KEYWORDS)}")
            if stats_dir is None:
                raise FileNotFoundError(f"timestep keyword {item!r} needs the timestep statistics folder")
            values = _load_timestep_table(Path(stats_dir), item).get(int(channel), [])
        else:
            values = [int(item)]
        for value in values:
            if value not in resolved:
                resolved.append(value)
    return resolved


# --------------------------------------------------------------------------------------------------
# Start latents
# --------------------------------------------------------------------------------------------------


def prior_latents_path(priors_dir: str | Path, channel: int) -> Path:
    return channel_dir(priors_dir, channel) / PRIOR_LATENTS_FILE


def load_prior_latents(priors_dir: str | Path, channel: int, n_results: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``n_results`` prior latents ``(n, 4, h, w)`` float32 of a channel and their seeds.

    Raises:
        FileNotFoundError: naming the missing file and the fix.
    """
    path = prior_latents_path(priors_dir, channel)
    if not path.is_file():
        raise FileNotFoundError(
            f"no prior latents for channel {channel} ({path} is missing): compute the priors stage for these "
            f"channels first, or set use_prior: false to start dreams from seeded noise"
        )
    tensors = load_file(str(path))
    if "latents" not in tensors:
        raise ValueError(f"{path} has no 'latents' tensor; recompute the priors of channel {channel}")
    latents = tensors["latents"].float()[:n_results]
    if "seeds" in tensors:
        seeds = [int(s) for s in tensors["seeds"].flatten()[: latents.shape[0]].tolist()]
    else:
        seeds = list(range(latents.shape[0]))
    return latents, seeds


# --------------------------------------------------------------------------------------------------
# The stage over channels
# --------------------------------------------------------------------------------------------------


@dataclass
class ChannelPlan:
    """Elements of one channel: every timestep x every start latent."""

    channel: int
    timesteps: list[int]
    seeds: list[int]
    init_latents: torch.Tensor  # (n_seeds, 4, h, w)

    @property
    def n_elements(self) -> int:
        return len(self.timesteps) * len(self.seeds)


@dataclass
class DreamsResult:
    """What :func:`run_dreams` did."""

    out_dir: Path
    channels_done: list[int] = field(default_factory=list)
    channels_skipped: list[int] = field(default_factory=list)
    channels_without_timesteps: list[int] = field(default_factory=list)
    elements: int = 0
    element_steps: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    quality_path: Path | None = None
    quality: pl.DataFrame | None = None  # rows of this run's channels (set by dreams_for_variant)

    @property
    def element_steps_per_second(self) -> float:
        return self.element_steps / self.seconds if self.seconds > 0 else float("nan")


def finished_channels(out_dir: str | Path) -> set[int]:
    """Channels whose folder holds ``dream.json``."""
    return store_finished_channels(out_dir, DREAM_FILE)


def _relative(path: Path, root: Path) -> str:
    from ddr_core.paths import UnsafePathError, relative_to_data_root

    try:
        return relative_to_data_root(root, path)
    except UnsafePathError:
        return path.as_posix()


def _json_float(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _write_channel(
    model: Any,
    out_dir: Path,
    plan: ChannelPlan,
    results: dict[tuple[int, int], dict[str, Any]],
    config: DreamConfig,
    data_root: Path,
    info: dict[str, Any],
) -> list[dict[str, Any]]:
    """Write one channel's folder atomically (``dream.json`` last); returns its failures."""
    destination = channel_dir(out_dir, plan.channel)
    failures: list[dict[str, Any]] = []
    per_timestep: dict[str, Any] = {}
    with atomic_dir(destination) as tmp:
        for timestep in plan.timesteps:
            folder = tmp / timestep_dir_name(timestep)
            (folder / "steps").mkdir(parents=True)
            element_results = [results[(timestep, seed)] for seed in plan.seeds]
            final = torch.stack([r["latents"] for r in element_results])
            save_file(
                {
                    "latents": final.contiguous(),
                    "initial_latents": plan.init_latents.float().contiguous(),
                    "seeds": torch.tensor(plan.seeds, dtype=torch.int64),
                },
                str(folder / "latents.safetensors"),
            )
            for seed, image in zip(plan.seeds, model.decode(final, config.batch_size), strict=True):
                image.save(folder / f"seed_{seed}.png", format="PNG")
            snapshot_latents, snapshot_names = [], []
            for seed, result in zip(plan.seeds, element_results, strict=True):
                for step, latent in sorted(result["snapshots"].items()):
                    snapshot_latents.append(latent)
                    snapshot_names.append(f"seed_{seed}_step_{step:04d}.png")
            if snapshot_latents:
                images = model.decode(torch.stack(snapshot_latents), config.batch_size)
                for name, image in zip(snapshot_names, images, strict=True):
                    image.save(folder / "steps" / name, format="PNG")
            rows: dict[str, list] = {"seed": [], "step": [], **{name: [] for name in STAT_NAMES}}
            for seed, result in zip(plan.seeds, element_results, strict=True):
                for step, stats in result["stats"]:
                    rows["seed"].append(seed)
                    rows["step"].append(step)
                    for name in STAT_NAMES:
                        rows[name].append(stats[name])
            schema = {"seed": pl.Int64, "step": pl.Int32, **{name: pl.Float64 for name in STAT_NAMES}}
            pl.DataFrame(rows, schema=schema).write_parquet(folder / "stats.parquet")
            final_dir = destination / timestep_dir_name(timestep)
            per_timestep[str(timestep)] = {
                "seeds": plan.seeds,
                "final_activation": [_json_float(r["final_activation"]) for r in element_results],
                "images": [_relative(final_dir / f"seed_{seed}.png", data_root) for seed in plan.seeds],
                "latents": _relative(final_dir / "latents.safetensors", data_root),
            }
            for seed, result in zip(plan.seeds, element_results, strict=True):
                if result["failed"] is not None:
                    failures.append({"channel": plan.channel, "timestep": timestep, "seed": seed,
                                     "step": result["failed_step"], "reason": result["failed"]})
        dream = {
            "channel": plan.channel,
            **info,
            "timesteps": plan.timesteps,
            "seeds": plan.seeds,
            "results": per_timestep,
            "failures": failures,
            "config": config.model_dump(mode="json"),
            "config_hash": config.config_hash(),
        }
        atomic_write_json(tmp / DREAM_FILE, dream)
    return failures


def _empty_channel(out_dir: Path, channel: int, config: DreamConfig, info: dict[str, Any], reason: str) -> None:
    with atomic_dir(channel_dir(out_dir, channel)) as tmp:
        atomic_write_json(tmp / DREAM_FILE, {
            "channel": channel, **info, "timesteps": [], "seeds": [], "results": {}, "failures": [],
            "skipped": reason, "config": config.model_dump(mode="json"), "config_hash": config.config_hash(),
        })


def _remove_channel_leftovers(out_dir: Path, channel: int) -> None:
    """Delete the temporaries :func:`ddr_core.atomic.atomic_dir` left for ``channel`` when its run died."""
    for leftover in out_dir.glob(f".{channel_dir(out_dir, channel).name}{TEMP_MARKER}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def check_dream_inputs(
    model: Any,
    stats_dir: str | Path | None,
    priors_dir: str | Path | None,
    channels: Sequence[int],
    config: DreamConfig,
) -> None:
    """Check what a dream run reads, before anything is optimised or written.

    Args:
        model: the loaded :class:`~ddr_core.families.ModelFamily` (its train timesteps bound integer timesteps).
        stats_dir: the timestep statistics folder (its tables are needed by timestep keywords).
        priors_dir: the priors folder when dreams start from priors, else ``None``.
        channels: the channels still to dream (each needs a finished prior when ``priors_dir`` is set).

    Raises:
        ValueError: an integer timestep outside ``[0, num_train_timesteps)`` of the scheduler.
        FileNotFoundError: a keyword's statistics table is missing, or channels have no finished prior
            (``prior.json``); the message names the fix.
    """
    total = model.num_train_timesteps
    too_late = [t for t in config.timesteps if isinstance(t, int) and not 0 <= t < total]
    if too_late:
        raise ValueError(f"timesteps {too_late} lie outside the scheduler's train timesteps 0..{total - 1}; "
                         f"use timesteps below {total}")
    for keyword in dict.fromkeys(t for t in config.timesteps if isinstance(t, str)):
        if stats_dir is None:
            raise FileNotFoundError(f"timestep keyword {keyword!r} needs the timestep statistics folder; "
                                    "materialize timestep_stats for the variant first, or use integer timesteps")
        _load_timestep_table(Path(stats_dir), keyword)
    if priors_dir is not None:
        missing = [int(c) for c in channels
                   if not prior_record_path(priors_dir, int(c)).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no finished priors for channel(s) {format_channels(missing)} in {priors_dir}: materialize the "
                f"priors of these channels first, or set use_prior: false to start dreams from seeded noise"
            )


def run_dreams(
    pipe: Any,
    basis: Basis | nn.Module | None,
    layer_name: str,
    stats_dir: str | Path | None,
    priors_dir: str | Path | None,
    channels: Sequence[int],
    out_dir: str | Path,
    config: DreamConfig,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
    log: LogFn | None = None,
    stop_after_channels: int | None = None,
    lock_wait: bool | float = False,
    lock_owner: str = "",
) -> DreamsResult:
    """Dream every channel of ``channels`` at its timesteps from each start latent; resumable.

    Elements ``(channel, timestep, seed)`` are ordered by channel, timestep, seed and optimised
    ``batch_size`` at a time (mixing channels and timesteps in one batch). A channel is written
    when all its elements are done. Channels already holding ``dream.json`` are skipped.

    Args:
        pipe: a :class:`~ddr_core.families.ModelFamily` or a loaded diffusers pipeline (its denoiser's dtype is
            used for the forward pass).
        basis: the variant's :class:`~ddr_core.basis.Basis` (an SAE or ``None`` for raw channels are
            taken as their basis); ``channels`` are its units.
        layer_name: dotted name of the target layer.
        stats_dir: timestep statistics folder (needed for timestep keywords).
        priors_dir: the priors stage folder; ``None`` or ``config.use_prior`` false: seeded noise.
        out_dir: the dreams stage folder.
        data_root: paths in ``dream.json`` are relative to it (default: ``out_dir``).
        batch_size: elements per optimisation batch (default ``config.batch_size``).
        stop_after_channels: stop after writing this many channels (tests simulate a kill with it).
        lock_wait, lock_owner: the run claims ``channels`` of ``out_dir`` while it works
            (:func:`ddr_core.locks.claim_channels`): another live run holding any of them makes it
            fail at once with :class:`~ddr_core.locks.ChannelsLockedError`, or wait ``lock_wait``
            seconds; runs on other channels of the same folder run side by side.

    Raises:
        ValueError: a channel outside the layer / SAE, or an integer timestep outside the scheduler's.
        FileNotFoundError: timestep keywords without their statistics table, or (``use_prior``)
            unfinished channels without a finished prior; nothing is written then.
        ChannelsLockedError: another live run is writing some of ``channels``.
    """
    from ddr_core.families import as_model
    from ddr_core.paths import check_output_folder
    from ddr_core.progress import Progress

    start = time.monotonic()
    out = check_output_folder(Path(out_dir), data_root, "dreams folder")  # not through a link
    root = Path(data_root) if data_root is not None else out
    batch_size = batch_size or config.batch_size
    model = as_model(pipe)
    layer = model.hook_point(layer_name)
    basis = as_basis(basis, model.layer_width(layer_name))
    channels = sorted({int(c) for c in channels})
    basis.check_units(channels)
    use_prior = config.use_prior and priors_dir is not None
    if config.use_prior and priors_dir is None and log:
        log("dreams: no priors folder given; starting from seeded noise")
    info = {"basis": basis.kind, "layer": layer_name, "use_prior": use_prior}
    # Everything that can be checked is checked before anything is written.
    check_dream_inputs(model, stats_dir, priors_dir if use_prior else None,
                       [c for c in channels if c not in finished_channels(out)], config)

    with claim_channels(out, channels, wait=lock_wait,
                        owner=lock_owner or f"{out.parent.name} {out.name} channels {format_channels(channels)}"):
        done = finished_channels(out)
        result = DreamsResult(out_dir=out, channels_skipped=[c for c in channels if c in done])
        todo = [c for c in channels if c not in done]
        for channel in todo:  # folders a killed run was assembling (ours alone while claimed)
            _remove_channel_leftovers(out, channel)
        if result.channels_skipped and log:
            log(f"dreams: resuming, {len(result.channels_skipped)} of {len(channels)} channels already done")
            current = config.config_hash()
            other = [c for c in result.channels_skipped
                     if json.loads((channel_dir(out, c) / DREAM_FILE).read_text(encoding="utf-8")).get("config_hash")
                     != current]
            if other:
                log(f"dreams: warning: {len(other)} finished channel(s) (e.g. {other[0]}) were dreamed with another "
                    f"config; they are kept as they are -- delete their folders under {out} to redo them")

        def plans() -> Iterator[ChannelPlan]:
            for channel in todo:
                timesteps = resolve_dream_timesteps(stats_dir, channel, config.timesteps)
                if config.use_just_one_timestep:
                    timesteps = timesteps[:1]
                if not timesteps:
                    _empty_channel(out, channel, config, info, "no timesteps (no activity peaks / active timesteps)")
                    result.channels_without_timesteps.append(channel)
                    continue
                if use_prior:
                    prior_record = prior_record_path(priors_dir, channel)
                    if prior_record.is_file():
                        prior = json.loads(prior_record.read_text(encoding="utf-8"))
                        if prior.get("status") == "skipped":  # inactive or never steered: nothing to start from
                            _empty_channel(out, channel, config, info,
                                           f"prior skipped ({prior.get('reason')}): {prior.get('message', '')}")
                            result.channels_without_timesteps.append(channel)
                            continue
                    latents, seeds = load_prior_latents(priors_dir, channel, config.n_results)
                else:
                    seeds = list(config.seeds[: config.n_results])
                    latents = model.initial_latents(seeds, *model.default_size)
                yield ChannelPlan(channel, timesteps, seeds, latents)

        pending: dict[int, tuple[ChannelPlan, dict[tuple[int, int], dict[str, Any]]]] = {}
        queue: list[tuple[ChannelPlan, int, int, int]] = []  # plan, timestep, seed, latent index
        written = 0
        plan_iter = plans()
        exhausted = False

        with Progress(len(channels), "dreams", log=log, unit="channel", initial=len(result.channels_skipped)) as progress:
            while True:
                while not exhausted and len(queue) < batch_size:
                    plan = next(plan_iter, None)
                    if plan is None:
                        exhausted = True
                        break
                    pending[plan.channel] = (plan, {})
                    for timestep in plan.timesteps:
                        for index, seed in enumerate(plan.seeds):
                            queue.append((plan, timestep, seed, index))
                if not queue:
                    break
                batch, queue = queue[:batch_size], queue[batch_size:]
                init = torch.stack([plan.init_latents[index] for plan, _, _, index in batch])
                timesteps = torch.tensor([t for _, t, _, _ in batch], dtype=torch.long)
                objective = DreamObjective(torch.tensor([p.channel for p, _, _, _ in batch], dtype=torch.long), basis)
                generators = element_generators(
                    [element_seed(config.random_seed, p.channel, t, s) for p, t, s, _ in batch]
                )
                batch_result = optimise_dreams(model, layer, objective, init, timesteps, config, generators)
                final_activation = batch_result.final_activation
                last_step = config.num_steps
                for position, (plan, timestep, seed, _) in enumerate(batch):
                    steps = batch_result.steps_run(position)
                    snapshots = {s: latents[position] for s, latents in batch_result.snapshots.items()}
                    if config.snapshot_every and batch_result.failed[position] is None:
                        snapshots[last_step] = batch_result.latents[position]
                    pending[plan.channel][1][(timestep, seed)] = {
                        "latents": batch_result.latents[position],
                        "snapshots": snapshots,
                        "stats": [
                            (int(s), {name: float(batch_result.history[name][s, position]) for name in STAT_NAMES})
                            for s in steps
                        ],
                        "final_activation": float(final_activation[position]),
                        "failed": batch_result.failed[position],
                        "failed_step": batch_result.failed_step[position],
                    }
                    result.element_steps += len(steps)
                result.elements += len(batch)
                for channel in list(pending):
                    plan, results = pending[channel]
                    if len(results) < plan.n_elements:
                        continue
                    failures = _write_channel(model, out, plan, results, config, root, info)
                    result.failures.extend(failures)
                    result.channels_done.append(channel)
                    del pending[channel]
                    progress.update()
                    written += 1
                    if failures and log:
                        log(f"dreams: channel {channel}: {len(failures)} element(s) failed, e.g. {failures[0]['reason']}")
                    if stop_after_channels is not None and written >= stop_after_channels:
                        break
                if stop_after_channels is not None and written >= stop_after_channels:
                    break
        result.seconds = time.monotonic() - start
        return result


# --------------------------------------------------------------------------------------------------
# Quality check
# --------------------------------------------------------------------------------------------------


QUALITY_SCHEMA = {
    "channel": pl.Int32,
    "timestep": pl.Int32,
    "seed": pl.Int64,
    "dream_activation": pl.Float64,
    "prior_activation": pl.Float64,
    "top_example_activation": pl.Float64,
    "example_timestep": pl.Int32,
    "ratio": pl.Float64,
    "failed": pl.Boolean,
}


def _top_examples(stats_dir: str | Path | None) -> dict[int, list[tuple[int, float]]]:
    """Channel -> ``[(timestep, rank-0 activation)]`` from ``dataset_examples.parquet`` (empty if missing)."""
    if stats_dir is None:
        return {}
    path = Path(stats_dir) / "dataset_examples.parquet"
    if not path.is_file():
        return {}
    frame = pl.read_parquet(path, columns=["channel", "timestep", "rank", "activation"]).filter(pl.col("rank") == 0)
    table: dict[int, list[tuple[int, float]]] = {}
    for channel, timestep, activation in frame.select("channel", "timestep", "activation").iter_rows():
        table.setdefault(int(channel), []).append((int(timestep), float(activation)))
    return table


def _nearest_example(examples: list[tuple[int, float]], timestep: int) -> tuple[int | None, float | None]:
    if not examples:
        return None, None
    best = min(examples, key=lambda item: (abs(item[0] - timestep), -item[0]))
    return best


def measure_dream_quality(
    pipe: Any,
    basis: Basis | nn.Module | None,
    layer_name: str,
    dreams_dir: str | Path,
    stats_dir: str | Path | None,
    config: DreamConfig,
    channels: Sequence[int] | None = None,
    batch_size: int | None = None,
    reuse: bool = True,
) -> pl.DataFrame:
    """Re-measure each finished dream and compare it with its start latent and the dataset's best example.

    ``dream_activation`` and ``prior_activation`` (of the latent the dream started from: the prior,
    or seeded noise without priors) are measured without augmentation at the dream's timestep,
    averaged over ``config.quality_noise_draws`` scheduler-noise draws when
    ``see_through_schedule_noise`` is on (the same draws for both, so they compare pairwise).
    ``top_example_activation`` is the channel's rank-0 activation in ``dataset_examples.parquet`` at
    the observed timestep nearest the dream's (``example_timestep``); ``ratio`` = dream / top example.

    Each channel's rows are cached in ``channel_<c>/quality.parquet`` (measured once per dream; a
    redone channel folder drops its cache with it; ``reuse=False`` re-measures). Then
    ``dreams_dir/quality.parquet`` is rewritten as the union of every channel's cached rows.

    Every quality file of ``dreams_dir`` is written under the lock ``<parent>/.<name>.locks/quality.lock``
    (waited for): runs on other blocks of the same folder measure one after the other, so the union
    never loses the rows another run just added, and temporaries of a killed measurement are removed.

    Args:
        channels: channels to measure (default: every finished channel in ``dreams_dir``).

    Returns:
        The rows of ``channels`` (columns of :data:`QUALITY_SCHEMA`).
    """
    from ddr_core.families import as_model

    model = as_model(pipe)
    dreams_dir = Path(dreams_dir)
    basis = as_basis(basis, model.layer_width(layer_name))
    with partition_lock(stage_locks_dir(dreams_dir) / QUALITY_LOCK_FILE, wait=True, owner=f"dream quality {dreams_dir.name}"):
        for leftover in [*dreams_dir.glob(f".{QUALITY_FILE}{TEMP_MARKER}*"),
                         *dreams_dir.glob(f"channel_*/.{QUALITY_FILE}{TEMP_MARKER}*")]:
            leftover.unlink(missing_ok=True)  # a measurement killed mid-write (all writers hold this lock)
        return _measure_dream_quality_locked(model, basis, layer_name, dreams_dir, stats_dir, config, channels,
                                             batch_size, reuse)


def _measure_dream_quality_locked(
    model: Any,
    basis: Basis,
    layer_name: str,
    dreams_dir: Path,
    stats_dir: str | Path | None,
    config: DreamConfig,
    channels: Sequence[int] | None,
    batch_size: int | None,
    reuse: bool,
) -> pl.DataFrame:
    layer = model.hook_point(layer_name)
    batch_size = batch_size or config.batch_size
    finished = finished_channels(dreams_dir)
    wanted = sorted(finished if channels is None else finished & {int(c) for c in channels})
    examples = _top_examples(stats_dir)
    elements: list[dict[str, Any]] = []
    latents_list: list[torch.Tensor] = []
    starts_list: list[torch.Tensor] = []
    to_measure: list[int] = []
    for channel in wanted:
        folder = channel_dir(dreams_dir, channel)
        if reuse and (folder / QUALITY_FILE).is_file():
            continue
        to_measure.append(channel)
        dream = json.loads((folder / DREAM_FILE).read_text(encoding="utf-8"))
        failed = {(f["timestep"], f["seed"]) for f in dream.get("failures", [])}
        for timestep in dream["timesteps"]:
            tensors = load_file(str(folder / timestep_dir_name(timestep) / "latents.safetensors"))
            for index, seed in enumerate(int(s) for s in tensors["seeds"].tolist()):
                example_timestep, example_activation = _nearest_example(examples.get(channel, []), timestep)
                elements.append({
                    "channel": channel, "timestep": int(timestep), "seed": seed,
                    "top_example_activation": example_activation, "example_timestep": example_timestep,
                    "failed": (timestep, seed) in failed,
                })
                latents_list.append(tensors["latents"][index])
                starts_list.append(tensors["initial_latents"][index])

    dream_values: list[float] = []
    start_values: list[float] = []
    for first in range(0, len(elements), batch_size):
        chunk = elements[first: first + batch_size]
        timesteps = torch.tensor([e["timestep"] for e in chunk], dtype=torch.long)
        objective = DreamObjective(torch.tensor([e["channel"] for e in chunk], dtype=torch.long), basis)
        for source, sink in ((latents_list, dream_values), (starts_list, start_values)):
            draws = None
            if config.see_through_schedule_noise:
                draws = [
                    element_generators([
                        element_seed(config.random_seed, e["channel"], e["timestep"], e["seed"], draw=1 + d)
                        for e in chunk
                    ])
                    for d in range(config.quality_noise_draws)
                ]
            values = measure_activations(
                model, layer, objective, torch.stack(source[first: first + batch_size]), timesteps, draws
            )
            sink.extend(values.tolist())

    rows_by_channel: dict[int, list[dict[str, Any]]] = {channel: [] for channel in to_measure}
    for element, dream_value, start_value in zip(elements, dream_values, start_values, strict=True):
        top = element["top_example_activation"]
        ratio = dream_value / top if top not in (None, 0.0) and np.isfinite(dream_value) else None
        rows_by_channel[element["channel"]].append({
            **element,
            "dream_activation": dream_value if np.isfinite(dream_value) else None,
            "prior_activation": start_value if np.isfinite(start_value) else None,
            "ratio": ratio,
        })
    for channel, rows in rows_by_channel.items():
        with atomic_path(channel_dir(dreams_dir, channel) / QUALITY_FILE) as tmp:
            _quality_frame(rows).write_parquet(tmp)

    table = _write_quality_union(dreams_dir, finished)
    return table.filter(pl.col("channel").is_in(wanted))


def _write_quality_union(dreams_dir: Path, finished: set[int]) -> pl.DataFrame:
    """Rewrite ``dreams_dir/quality.parquet`` as the union of the finished channels' cached rows
    (channel order); call with the quality lock held."""
    cached = [channel_dir(dreams_dir, c) / QUALITY_FILE for c in sorted(finished)]
    frames = [pl.read_parquet(path) for path in cached if path.is_file()]
    table = pl.concat(frames, how="vertical") if frames else _quality_frame([])
    with atomic_path(dreams_dir / QUALITY_FILE) as tmp:
        table.write_parquet(tmp)
    return table


def write_quality_table(dreams_dir: str | Path) -> pl.DataFrame:
    """Rewrite ``dreams_dir/quality.parquet`` from the channels' cached quality rows; measure nothing.

    What :func:`measure_dream_quality` writes last, without a model: rank 0 of a multi-GPU job calls
    it once every rank has measured its channels, so the table is the union of all of them whatever
    order the ranks finished in. Takes the quality lock (waited for).

    Returns:
        The whole table (columns of :data:`QUALITY_SCHEMA`).
    """
    dreams_dir = Path(dreams_dir)
    with partition_lock(stage_locks_dir(dreams_dir) / QUALITY_LOCK_FILE, wait=True,
                        owner=f"dream quality {dreams_dir.name}"):
        return _write_quality_union(dreams_dir, finished_channels(dreams_dir))


def _quality_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    frame = pl.DataFrame(rows, schema=QUALITY_SCHEMA) if rows else pl.DataFrame(schema=QUALITY_SCHEMA)
    return frame.select(list(QUALITY_SCHEMA))


# --------------------------------------------------------------------------------------------------
# The stage for one variant of the project configuration
# --------------------------------------------------------------------------------------------------


def dreams_for_variant(
    project: Any,
    layout: Any,
    variant: str,
    channels: Sequence[int] | None,
    config: DreamConfig,
    device: torch.device | str,
    log: LogFn | None = None,
    stop_after_channels: int | None = None,
    stage: str = "dreams",
    lock_wait: bool | float = False,
    lock_owner: str = "",
) -> DreamsResult:
    """Dream the channels of one variant: reads its priors and timestep statistics, writes
    ``layout.stage_dir(stage, variant)`` and its ``quality.parquet`` (``stage`` is ``dreams``, or
    ``dreams_no_noise`` for the run without schedule noise).

    Checks before optimising: the channel range and the upstream stages (the statistics tables the
    timestep keywords need, and, with ``use_prior``, a finished prior for every channel still to dream:
    the error names ``timestep_stats[<variant>]`` / ``priors[<block>]`` to materialize), then the model
    folder, the layer, the SAE's ``d_in`` and the variant's width. ``channels=None`` means every
    channel of the variant. ``lock_wait``/``lock_owner``: see :func:`run_dreams`.

    Raises:
        IndexError: a channel outside the variant's declared width (before the model is loaded).
        FileNotFoundError: an upstream stage is missing (before the model is loaded).
        ChannelsLockedError: another live run is writing some of the channels.
        ddr_core.basis.WeightsChangedError: the model / SAE was provisioned again with other weights since
            the variant's capture (its statistics describe the old ones).
    """
    from ddr_core.basis import check_weights_match_capture, load_basis
    from ddr_core.families import load_model

    if variant not in project.variants:
        raise KeyError(f"unknown variant {variant!r}; declared: {sorted(project.variants)}")
    device = torch.device(device)
    spec = project.variants[variant]
    layer_name = project.layer_of(variant)
    what = f"variant {variant!r} ({spec.basis} basis of layer {layer_name!r})"
    selected = list(range(spec.width)) if channels is None else check_channels(channels, spec.width, what)
    stats_dir = layout.timestep_stats_dir(variant)
    out_dir = layout.stage_dir(stage, variant)
    priors_dir = layout.stage_dir("priors", variant) if config.use_prior else None
    # The upstream stages, before the model is loaded; nothing is written when they are missing.
    keywords = [t for t in dict.fromkeys(config.timesteps) if isinstance(t, str)]
    absent = [k for k in keywords if not (stats_dir / f"{_KEYWORD_TABLES.get(k, k)}.parquet").is_file()]
    if absent:
        missing_table = stats_dir / f"{_KEYWORD_TABLES.get(absent[0], absent[0])}.parquet"
        raise FileNotFoundError(
            f"the timestep statistics of variant {variant!r} are missing ({missing_table} "
            f"does not exist) but the dream timesteps use {absent}: materialize timestep_stats[{variant}] "
            f"first (e.g. `dagster asset materialize --select timestep_stats --partition {variant}`), or use "
            f"integer timesteps only"
        )
    if priors_dir is not None:
        finished = finished_channels(out_dir)
        missing = [c for c in selected
                   if c not in finished and not prior_record_path(priors_dir, c).is_file()]
        if missing:
            blocks = [f"priors[{variant}:{first}-{last}]" for first, last in spec.channel_blocks()
                      if any(first <= c <= last for c in missing)]
            raise FileNotFoundError(
                f"no finished priors for channel(s) {format_channels(missing)} of variant {variant!r} in "
                f"{priors_dir}: materialize {', '.join(blocks)} first, or set use_prior: false to start dreams "
                f"from seeded noise"
            )
    check_weights_match_capture(project, layout, variant)
    layout.check_output_folder(out_dir, "dreams folder")  # before the model loads
    model = load_model(layout.model_dir(spec.model), device=device, dtype=config.torch_dtype())
    basis = load_basis(project, layout, variant, model, device)
    result = run_dreams(
        model, basis, layer_name, stats_dir, priors_dir, selected, out_dir, config,
        data_root=layout.data_root, log=log, stop_after_channels=stop_after_channels,
        lock_wait=lock_wait, lock_owner=lock_owner,
    )
    result.quality = measure_dream_quality(model, basis, layer_name, out_dir, stats_dir, config, channels=selected)
    result.quality_path = out_dir / QUALITY_FILE
    return result
