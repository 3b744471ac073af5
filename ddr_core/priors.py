"""Priors: what the model draws, from an empty prompt, when one channel is pushed.

For every channel of a variant (a raw channel of the target layer, or a feature of its SAE), the
prior is ``n_results`` images generated from the **empty prompt** with ``guidance_scale=1`` (no
classifier-free guidance), one per seed, while the channel is steered at the target layer:

- raw basis: ``strength(t)`` is added to that channel at every spatial position (one-hot direction);
- SAE basis: ``strength(t) * W_dec[feature]`` (the feature's decoder row) is added at every position.

Steering schedule
-----------------
``strength(t) = max_activation(channel, t) * scale`` (``scale``: ``steer_strength_scale``, default 50
raw / 500 SAE), applied only at the channel's *selected* timesteps. The timestep statistics record
``max_activation`` at the capture's observed timesteps (e.g. the 50 DDIM steps ``981, 961, ..., 1``);
the generation runs on its own scheduler timesteps. The mapping:

1. ``max_activation`` is linearly interpolated onto every train timestep ``0..num_train_timesteps-1``
   exactly like the activity profile (:func:`ddr_core.statistics.interpolate_profile`; ``np.interp``,
   values beyond the observed range held). At an observed timestep it is the recorded value.
2. The selected train timesteps are

   - ``active_timesteps``: the channel's active timesteps (interpolated activity profile ``> 0``,
     the rows of ``active_timesteps.parquet``);
   - ``all_timesteps``: every train timestep;
   - ``activity_peaks``: for each of the channel's peaks (``activity_peaks.parquet``, up to
     ``top_peak_count``), the *scheduler* timestep nearest the peak (ties to the larger timestep);
   - ``activity_window``: every train timestep within 100 of the channel's highest peak
     (:func:`ddr_core.steering.activity_window`; the schedule lives in :mod:`ddr_core.steering`, shared with
     the ``dose_response`` stage).

3. :func:`ddr_core.hooks.steer_layer` reads the table at the current scheduler timestep, so a
   scheduler timestep is steered iff it is selected.

Two options, off by default (issue 14's "steering that acts where and when the feature lives"; measured in
BENCHMARKS.md, neither passes, see docs/DREAM_METHODS.md):

- ``strength_shape: activity_profile``: ``strength(t) = scale x max_t max_activation(channel) x profile(t) /
  max_t profile`` (the channel's activity profile normalised to 1 at its peak) instead of ``scale x
  max_activation(channel, t)``, which is nearly flat over the active timesteps (:func:`ddr_core.steering.steering_schedule`);
- ``steer_positions: self_top``: at each steered step only the ``ceil(position_fraction x positions)`` latent
  positions where the channel itself fires most in the current, unsteered activation are pushed
  (:func:`ddr_core.steering.self_gated_positions`); the others are left untouched.

A run with either option records it in ``prior.json`` (``strength_shape`` / ``steer_positions``,
``position_fraction``) and in its ``config_hash``; a default run's records and hash are those of before. With the capture's scheduler and step count
   (the default) this is what the thesis did; with another step count the interpolation keeps the
   strengths defined where the thesis would have failed a dictionary lookup.

Differences from the thesis' prior stage (``stages/s04_prior.py``): it looked up ``max_activation``
only at observed timesteps (generation had to use the capture's schedule), had no ``activity_peaks``
mode, generated unsteered images for channels without active timesteps (we record them as skipped),
drew noise with device generators (we use one CPU generator per seed, so results do not depend on the
device or batch), ran one channel per pipeline call (we batch channel x seed), and min-max normalised
the decoded images over each channel's whole batch (we use diffusers' per-image postprocessing).

On-disk format (``out_dir/channel_<c:05d>/``, every file written atomically)
-------------------------------------------------------------------------------
``latents.safetensors``  ``latents`` ``(n_seeds, latent_channels, h, w)`` float32: the final denoised
                         latents (before the VAE, as ``output_type="latent"`` returns them);
                         ``seeds`` ``(n_seeds,)`` int64; string metadata: format, channel, basis,
                         layer, timesteps_mode, steer_strength_scale, num_inference_steps, height,
                         width, config_hash.
``seed_<seed>.png``      the decoded image of each seed.
``prior.json``           written **last**; a channel is finished iff it exists. Fields: format,
                         channel, status (``"done"`` or ``"skipped"``), reason (``null``, or why it
                         was skipped: ``"inactive"`` / ``"no_steered_timesteps"``), message, basis,
                         layer, prompt (``""``), guidance_scale (1.0), timesteps_mode,
                         steer_strength_scale, num_inference_steps, height, width, seeds,
                         steered_timesteps (scheduler timesteps with nonzero strength, denoising
                         order), strengths (one per steered timestep), strength_summary (n_steered,
                         min, max, mean), images (paths relative to the data root, seed order),
                         latents (relative path or ``null``), config_hash, stats_config_hash; and, with
                         ``gain_noise_draws > 0``, ``activation``: the prior's and the unsteered generation's
                         activation of the channel per seed (:mod:`ddr_core.prior_gain`; not hashed).
``unsteered.safetensors`` (in ``out_dir`` itself): the unsteered empty-prompt generations of the seeds, made
                         once per folder and settings hash, shared by every channel's ``activation``.

A rerun skips finished channels; one whose ``prior.json`` has another ``config_hash`` (other seeds,
mode, scale, steps, size, basis or layer) raises :class:`PriorsConfigMismatch` rather than mixing.

Concurrent runs: a run claims its channels for its whole duration (:func:`ddr_core.locks.claim_channels`, files under
``<parent>/.<out_dir name>.locks/``, a sibling of ``out_dir`` so the stage folder holds results
only). A second run on any of them fails at once with :class:`ddr_core.locks.ChannelsLockedError`
naming the first (or waits ``lock_wait`` seconds); runs on other channels of the same variant (other
channel blocks) go on side by side. A killed run's claim dies with it; the next run on its channels
deletes the temporaries it left in their folders. The ranks of a multi-GPU job
(:mod:`ddr_core.distributed`) are such runs: each claims its round-robin share of the channels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ddr_core.atomic import atomic_path, atomic_write_json, remove_temp_files
from ddr_core.channel_store import PRIOR_FILE, channel_dir, read_prior  # noqa: F401 - read_prior re-exported
from ddr_core.channel_store import PRIOR_LATENTS_FILE as LATENTS_FILE
from ddr_core.config import config_hash
from ddr_core.lazy_imports import lazy_module
from ddr_core.locks import (  # noqa: F401  (claims live in locks; re-exported for callers of this module)
    ChannelsLockedError,
    claim_channels,
    format_channels,
    stage_locks_dir,
)
from ddr_core.paths import check_output_folder, relative_to_data_root
from ddr_core.prior_gain import ACTIVATION_KEY, measure_prior_activation, record_prior_gain, unsteered_latents
from ddr_core.statistics import read_summary, require_statistics
from ddr_core.steering import (  # noqa: F401 - steering_schedule / TimestepSelection re-exported
    SteerPositions,
    StrengthShape,
    TimestepSelection,
    check_stats_channels,
    self_gated_positions,
    steering_schedule,
    top_peaks,
)
from ddr_core.variant_inputs import channel_list, check_channels, load_variant_model, select_variant_channels

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

LogFn = Callable[[str], None]

FORMAT = "ddr.priors/1"
DEFAULT_SEEDS: tuple[int, ...] = (1024, 1111, 4359, 3248, 1026)
PRIOR_PROMPT = ""
PRIOR_GUIDANCE_SCALE = 1.0
DEFAULT_POSITION_FRACTION = 0.25


class PriorsConfig(BaseModel):
    """Parameters of the priors stage (validated; errors name the field)."""

    model_config = ConfigDict(extra="forbid")

    n_results: int = Field(default=5, ge=1, le=1024, description="images per channel, one per seed")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS),
                             description="one seed per result; len(seeds) == n_results")
    timesteps: TimestepSelection = Field(default="active_timesteps",
                                         description="which timesteps of a channel are steered")
    steer_strength_scale: float | None = Field(
        default=None, allow_inf_nan=False,
        description="strength = max activation x this; None: 50 (raw) / 500 (SAE)",
    )
    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    batch_size: int = Field(default=16, ge=1, le=1024, description="generations (channel x seed) per forward batch")
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8,
                               description="image height (a multiple of 8); None: the model's default")
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8,
                              description="image width (a multiple of 8); None: the model's default")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    strength_shape: StrengthShape = Field(
        default="max_activation",
        description="max_activation: strength(t) = scale x max activation at t (default); activity_profile: "
                    "scale x the channel's max activation x its activity profile at t / the profile's peak")
    steer_positions: SteerPositions = Field(
        default="everywhere",
        description="everywhere: every latent position (default); self_top: only the position_fraction of positions "
                    "where the channel fires most in the current unsteered activation")
    position_fraction: float = Field(
        default=DEFAULT_POSITION_FRACTION, gt=0.0, le=1.0, allow_inf_nan=False,
        description="share of positions steered with steer_positions: self_top (ceil(share x positions), >= 1)")
    gain_noise_draws: int = Field(
        default=4, ge=0, le=64,
        description="schedule-noise draws of the activation gain over the unsteered generation recorded per prior "
                    "(ddr_core.prior_gain; not part of the settings hash); 0: not measured")

    @model_validator(mode="after")
    def _fraction_needs_gate(self) -> PriorsConfig:
        # by value, not by "was it set": the Dagster run config hands every field over, defaults included
        if self.position_fraction != DEFAULT_POSITION_FRACTION and self.steer_positions != "self_top":
            raise ValueError(
                f"position_fraction ({self.position_fraction}) applies only with steer_positions: self_top, but "
                f"steer_positions is {self.steer_positions!r}; set steer_positions: self_top or drop position_fraction")
        return self

    def option_settings(self) -> dict[str, Any]:
        """The non-default steering options, as recorded in ``prior.json`` and hashed (empty for a default run, so
        its records and hash are those of before the options existed)."""
        out: dict[str, Any] = {}
        if self.strength_shape != "max_activation":
            out["strength_shape"] = self.strength_shape
        if self.steer_positions != "everywhere":
            out["steer_positions"] = self.steer_positions
            out["position_fraction"] = float(self.position_fraction)
        return out

    @field_validator("seeds")
    @classmethod
    def _seeds_match_results(cls, seeds: list[int], info: ValidationInfo) -> list[int]:
        n_results = info.data.get("n_results")
        if n_results is not None and len(seeds) != n_results:
            raise ValueError(
                f"seeds has {len(seeds)} entries but n_results is {n_results}: give exactly one seed "
                f"per result (or change n_results to {len(seeds)})"
            )
        if any(seed < 0 for seed in seeds):
            raise ValueError(f"seeds must be >= 0, got {seeds}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct (one image file per seed), got {seeds}")
        return seeds

    def resolved_scale(self, basis: str) -> float:
        """``steer_strength_scale``, or the basis default (50 raw, 500 SAE) when unset."""
        if self.steer_strength_scale is not None:
            return float(self.steer_strength_scale)
        from ddr_core.basis import basis_class

        return basis_class(basis).default_steer_scale


# --------------------------------------------------------------------------------------------------
# Steering schedule from the timestep statistics
# --------------------------------------------------------------------------------------------------


def channel_is_active(stats_dir: str | Path, channels: Sequence[int]) -> np.ndarray:
    """``(len(channels),)`` bool: whether each channel has any active timestep in the statistics."""
    stats_dir = Path(stats_dir)
    channels = channel_list(channels)
    check_stats_channels(read_summary(stats_dir), stats_dir, channels)
    active = set(
        pl.scan_parquet(stats_dir / "active_timesteps.parquet")
        .filter(pl.col("channel").is_in(channels))
        .select(pl.col("channel").unique())
        .collect()["channel"]
        .to_list()
    )
    return np.array([c in active for c in channels], dtype=bool)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generate_priors(
    pipe: Any,
    layer_name: str,
    directions: torch.Tensor,
    schedule: torch.Tensor,
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    batch_size: int,
    height: int | None = None,
    width: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    position_gate: Callable[[list[int]], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, list[list[Any]]]:
    """Generate the steered empty-prompt images of several channels, channel x seed in batches.

    The ``n_channels * n_seeds`` generations are ordered channel-major and cut into batches of
    ``batch_size``; batch element ``b`` is steered along its own channel's direction with its own
    strengths (:func:`ddr_core.hooks.steer_layer`). Initial noise comes from one CPU generator per
    seed (:func:`ddr_core.pipeline.initial_latents`), so a result depends only on (channel, seed),
    not on which batch it ran in (up to float rounding of batched kernels).

    Args:
        pipe: a :class:`~ddr_core.families.ModelFamily` or a loaded diffusers pipeline (on its device and dtype).
        layer_name: dotted denoiser module name to steer.
        directions: ``(n_channels, layer_channels)`` steering directions (one-hot rows for raw
            channels, SAE decoder rows for features).
        schedule: ``(n_channels, num_train_timesteps)`` strengths (:func:`steering_schedule`).
        seeds: the seeds, one image per seed and channel.
        num_inference_steps: denoising steps.
        batch_size: generations per pipeline call.
        height, width: image size; default the model's (:attr:`~ddr_core.families.ModelFamily.default_size`).
        on_batch: called with the number of generations after each batch (progress).
        position_gate: ``None`` (steer every position), or ``rows -> gate``: the position gate
            (:func:`ddr_core.hooks.steer_layer`) of a batch whose elements steer the channels of these rows.

    Returns:
        ``(latents, images)``: final denoised latents ``(n_channels, n_seeds, latent_channels, h, w)``
        float32 on CPU, and ``images[channel_row][seed_index]`` PIL images.
    """
    from ddr_core.families import as_model
    from ddr_core.hooks import steer_layer

    if directions.ndim != 2 or schedule.ndim != 2 or directions.shape[0] != schedule.shape[0]:
        raise ValueError(
            f"directions (n_channels, C) and schedule (n_channels, timesteps) must have the same number "
            f"of rows, got {tuple(directions.shape)} and {tuple(schedule.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("generate_priors needs at least one seed")
    model = as_model(pipe)
    n_channels, n_seeds = directions.shape[0], len(seeds)
    height, width = height or model.default_size[0], width or model.default_size[1]
    device = model.device
    layer = model.hook_point(layer_name)
    directions = directions.detach().float().cpu()
    schedule = schedule.detach().float().cpu()

    latents = torch.empty(n_channels, n_seeds, *model.latent_shape(height, width))
    images: list[list[Any]] = [[None] * n_seeds for _ in range(n_channels)]
    if n_channels == 0:
        return latents, images
    empty = model.encode_prompt(PRIOR_PROMPT)
    elements = [(row, seed_index) for row in range(n_channels) for seed_index in range(n_seeds)]
    for start in range(0, len(elements), batch_size):
        batch = elements[start:start + batch_size]
        rows = [row for row, _ in batch]
        noise = model.initial_latents([seeds[s] for _, s in batch], height, width, dtype=model.dtype, device=device)
        gate = position_gate(rows) if position_gate is not None else None
        with model.track_timesteps() as tracker, steer_layer(
            layer, tracker, directions[rows], schedule[rows], positions=gate
        ), torch.inference_mode():
            final = model.generate(
                conditioning=empty.repeat(len(batch)), latents=noise, height=height, width=width,
                num_inference_steps=num_inference_steps, guidance_scale=PRIOR_GUIDANCE_SCALE, output_type="latent",
            )
            pil_images = model.decode(final, batch_size=len(batch))
        final = final.float().cpu()
        for index, (row, seed_index) in enumerate(batch):
            latents[row, seed_index] = final[index]
            images[row][seed_index] = pil_images[index]
        if on_batch is not None:
            on_batch(len(batch))
    return latents, images


# --------------------------------------------------------------------------------------------------
# Channel claims: two runs never write the same channels of a stage folder at once
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# Resumable per-channel runner
# --------------------------------------------------------------------------------------------------


class PriorsConfigMismatch(ValueError):
    """A priors folder already holds channels made with other parameters."""


@dataclass
class PriorsResult:
    """What :func:`run_priors` did.

    Attributes:
        out_dir: the priors folder.
        done: channels generated by this run.
        skipped: channels recorded as skipped by this run -> reason (``inactive``,
            ``no_steered_timesteps``).
        resumed: channels already finished before this run (left untouched).
        seconds: wall time of this run; ``images``: images generated by it.
    """

    out_dir: Path
    done: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    resumed: list[int] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0

    @property
    def skipped_inactive(self) -> list[int]:
        return [c for c, reason in self.skipped.items() if reason == "inactive"]

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def counts(self) -> dict[str, Any]:
        """Counts and throughput (for logs and asset metadata)."""
        return {
            "done": len(self.done),
            "skipped": len(self.skipped),
            "skipped_inactive": len(self.skipped_inactive),
            "resumed": len(self.resumed),
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3) if self.images else None,
        }


def _relative(path: Path, data_root: Path) -> str:
    return relative_to_data_root(data_root, path)


def run_priors(
    pipe: Any,
    basis: Any,
    layer_name: str,
    stats_dir: str | Path,
    channels: Sequence[int],
    out_dir: str | Path,
    config: PriorsConfig,
    data_root: str | Path,
    log: LogFn | None = None,
    stop_after_channels: int | None = None,
    lock_wait: bool | float = False,
    lock_owner: str = "",
) -> PriorsResult:
    """Generate the priors of ``channels`` into ``out_dir``; resumable (see the module docstring).

    The channels are claimed for the run (:func:`ddr_core.locks.claim_channels`): another live run writing any of
    them makes this one fail at once (or wait ``lock_wait`` seconds); runs on other channels of the
    same ``out_dir`` (other blocks of the variant) run side by side.

    Args:
        pipe: a :class:`~ddr_core.families.ModelFamily` or a loaded diffusers pipeline (on its device and dtype).
        basis: the variant's :class:`~ddr_core.basis.Basis` (an SAE, or ``None`` for raw channels, are taken
            as their basis); each unit is steered along :meth:`~ddr_core.basis.Basis.directions`.
        layer_name: dotted UNet module name that is steered (the SAE's layer).
        stats_dir: the variant's finished timestep statistics.
        channels: channel / feature indices to do.
        out_dir: the priors folder (below ``data_root``).
        config: stage parameters.
        data_root: what the image paths in ``prior.json`` are relative to.
        stop_after_channels: handle only this many unfinished channels (tests simulate a kill).
        lock_wait: ``False`` (fail at once), seconds, or ``True`` (wait without limit) when another
            run holds some of ``channels``.
        lock_owner: free text recorded with the claim (e.g. the Dagster run id).

    Raises:
        IndexError: a channel outside the layer's width / the SAE's features.
        PriorsConfigMismatch: ``out_dir`` holds channels made with other parameters.
        ChannelsLockedError: another live run is writing some of ``channels`` (names it).
    """
    from safetensors.torch import save_file

    from ddr_core.basis import TopKSaeBasis, as_basis
    from ddr_core.families import as_model
    from ddr_core.progress import Progress
    from ddr_core.tensor_files import canonical_metadata

    start = time.monotonic()
    out_dir, stats_dir, data_root = Path(out_dir), Path(stats_dir), Path(data_root).resolve()
    check_output_folder(out_dir, data_root, "priors folder")  # below the data root, not through a link
    model = as_model(pipe)
    width = model.layer_width(layer_name)
    unit_basis = as_basis(basis, width)
    if isinstance(unit_basis, TopKSaeBasis) and unit_basis.sae.d_in != width:
        raise ValueError(f"the SAE reads d_in={unit_basis.sae.d_in} channels but layer {layer_name!r} "
                         f"has {width}; use the SAE trained for this layer")
    n_features = unit_basis.width
    what = f"layer {layer_name!r}" if unit_basis.kind == "raw" else f"the SAE of layer {layer_name!r}"
    basis = unit_basis.kind
    channels = check_channels(channels, n_features, what)
    summary = read_summary(stats_dir)
    if int(summary["width"]) != n_features:
        raise ValueError(f"the statistics in {stats_dir} have width {summary['width']} but {what} has "
                         f"{n_features} channels; they belong to another variant")

    scale = config.resolved_scale(basis)
    height, width_px = config.height or model.default_size[0], config.width or model.default_size[1]
    timesteps = model.scheduler_timesteps(config.num_inference_steps, height, width_px)
    num_train = model.num_train_timesteps
    settings = {
        "format": FORMAT, "basis": basis, "layer": layer_name, "prompt": PRIOR_PROMPT,
        "guidance_scale": PRIOR_GUIDANCE_SCALE, "timesteps_mode": config.timesteps,
        "steer_strength_scale": scale, "num_inference_steps": config.num_inference_steps,
        "height": height, "width": width_px, "seeds": list(config.seeds), **config.option_settings(),
    }
    settings_hash = config_hash(settings)
    base = {**settings, "config_hash": settings_hash, "stats_config_hash": summary.get("config_hash")}

    with claim_channels(out_dir, channels, wait=lock_wait,
                        owner=lock_owner or f"priors {out_dir.name} channels {format_channels(channels)}"):
        result = PriorsResult(out_dir=out_dir)
        todo: list[int] = []
        for channel in channels:
            existing = read_prior(out_dir, channel)
            if existing is None:
                todo.append(channel)
            elif existing.get("config_hash") != settings_hash:
                changed = sorted(k for k in settings if existing.get(k) != settings[k])
                raise PriorsConfigMismatch(
                    f"{channel_dir(out_dir, channel)} was made with different {', '.join(changed) or 'settings'}; "
                    f"use another experiment name (DDR_EXPERIMENT) or delete {out_dir} to start over"
                )
            else:
                result.resumed.append(channel)
        if result.resumed and log:
            log(f"priors: resuming, {len(result.resumed)} of {len(channels)} channels already finished")
        if stop_after_channels is not None:
            todo = todo[:stop_after_channels]
        for channel in todo:  # leftovers of a killed run (these channels are ours alone while claimed)
            remove_temp_files(channel_dir(out_dir, channel), recursive=False)

        def finish(channel: int, record: dict[str, Any]) -> None:
            folder = channel_dir(out_dir, channel)
            atomic_write_json(folder / PRIOR_FILE, {**base, "channel": channel, **record})

        def skip(channel: int, reason: str, message: str) -> None:
            finish(channel, {"status": "skipped", "reason": reason, "message": message, "steered_timesteps": [],
                             "strengths": [], "strength_summary": {"n_steered": 0}, "images": [], "latents": None})
            result.skipped[channel] = reason

        active = channel_is_active(stats_dir, todo) if todo else np.zeros(0, dtype=bool)
        for channel in (c for c, is_active in zip(todo, active, strict=True) if not is_active):
            skip(channel, "inactive", "the channel has no active timesteps in the timestep statistics")
        candidates = [c for c, is_active in zip(todo, active, strict=True) if is_active]

        schedule = steering_schedule(stats_dir, candidates, config.timesteps, scale, num_train,
                                     scheduler_timesteps=timesteps, shape=config.strength_shape)
        steered_mask = schedule[:, timesteps] != 0 if candidates else torch.zeros(0, len(timesteps), dtype=torch.bool)
        to_generate: list[int] = []
        for row, channel in enumerate(candidates):
            if bool(steered_mask[row].any()):
                to_generate.append(channel)
            else:
                skip(channel, "no_steered_timesteps",
                     f"none of the {len(timesteps)} scheduler timesteps gets a nonzero strength in mode "
                     f"{config.timesteps!r} (selected timesteps fall between scheduler steps, or the max "
                     "activation there is 0)")
        row_of = {c: r for r, c in enumerate(candidates)}

        all_directions = unit_basis.directions(to_generate)
        cached: dict[str, Any] = {}

        def unsteered() -> torch.Tensor:  # the unsteered generations of the seeds, once per folder and settings
            if "latents" not in cached:
                cached["latents"] = unsteered_latents(model, layer_name, out_dir, settings_hash, config.seeds,
                                                      num_inference_steps=config.num_inference_steps, height=height,
                                                      width=width_px, batch_size=config.batch_size)
            return cached["latents"]

        def peaks() -> dict[int, int]:
            if "peaks" not in cached:
                cached["peaks"] = top_peaks(stats_dir, to_generate)
            return cached["peaks"]

        # Channels per pipeline call: the fewest whose generations fill whole batches.
        n_seeds = len(config.seeds)
        chunk = max(1, config.batch_size // math.gcd(config.batch_size, n_seeds))
        seeds_tensor = torch.tensor(config.seeds, dtype=torch.int64)
        with Progress(len(to_generate) * n_seeds, f"priors {out_dir.name}", log=log, unit="image") as progress:
            for first in range(0, len(to_generate), chunk):
                group = to_generate[first:first + chunk]
                rows = [row_of[c] for c in group]
                gate_of = None
                if config.steer_positions == "self_top":
                    def gate_of(batch_rows: list[int], group: list[int] = group) -> Callable[[torch.Tensor], torch.Tensor]:
                        return self_gated_positions(unit_basis, [group[r] for r in batch_rows],
                                                    config.position_fraction)
                latents, images = generate_priors(
                    model, layer_name, all_directions[first:first + chunk], schedule[rows], config.seeds,
                    num_inference_steps=config.num_inference_steps, batch_size=config.batch_size,
                    height=height, width=width_px, on_batch=progress.update, position_gate=gate_of,
                )
                for position, channel in enumerate(group):
                    folder = channel_dir(out_dir, channel)
                    folder.mkdir(parents=True, exist_ok=True)
                    remove_temp_files(folder, recursive=False)
                    metadata = {
                        "format": FORMAT, "channel": str(channel), "basis": basis, "layer": layer_name,
                        "timesteps_mode": config.timesteps, "steer_strength_scale": repr(scale),
                        "num_inference_steps": str(config.num_inference_steps), "height": str(height),
                        "width": str(width_px), "config_hash": settings_hash,
                        **{k: str(v) for k, v in config.option_settings().items()},
                    }
                    with atomic_path(folder / LATENTS_FILE) as tmp:
                        save_file({"latents": latents[position].contiguous(), "seeds": seeds_tensor},
                                  str(tmp), metadata=canonical_metadata(metadata))
                    image_paths = []
                    for seed, image in zip(config.seeds, images[position], strict=True):
                        path = folder / f"seed_{seed}.png"
                        with atomic_path(path) as tmp:
                            image.save(tmp, format="PNG")
                        image_paths.append(_relative(path, data_root))
                    activation = {}
                    if config.gain_noise_draws:
                        activation = {ACTIVATION_KEY: measure_prior_activation(
                            model, unit_basis, layer_name, channel, latents[position], unsteered(),
                            peaks().get(channel), config.seeds, config.gain_noise_draws)}
                    row = schedule[row_of[channel]]
                    steered = [t for t in timesteps if float(row[t]) != 0.0]
                    strengths = [float(row[t]) for t in steered]
                    finish(channel, {
                        "status": "done", "reason": None, "message": None,
                        "steered_timesteps": steered, "strengths": strengths,
                        "strength_summary": {
                            "n_steered": len(steered), "min": min(strengths), "max": max(strengths),
                            "mean": sum(strengths) / len(strengths),
                        },
                        "images": image_paths, "latents": _relative(folder / LATENTS_FILE, data_root),
                        **activation,
                    })
                    result.done.append(channel)
                    result.images += n_seeds
        if config.gain_noise_draws and result.resumed:  # priors made before the measurement existed
            record_prior_gain(model, unit_basis, layer_name, stats_dir, out_dir, result.resumed,
                              config.gain_noise_draws, batch_size=config.batch_size)
        result.seconds = time.monotonic() - start
        if log:
            log(f"priors {out_dir.name}: {result.counts()}")
        return result


# --- the stage: one variant of the project configuration --------------------------------------------


def priors_for_variant(
    project: Any,
    layout: Any,
    variant: str,
    channels: Sequence[int] | None,
    config: PriorsConfig,
    device: torch.device | str,
    log: LogFn | None = None,
    stop_after_channels: int | None = None,
    lock_wait: bool | float = False,
    lock_owner: str = "",
    stage: str = "priors",
) -> PriorsResult:
    """Generate the priors of ``channels`` (``None``: all) of one variant of the project config.

    Loads the variant's model (and SAE for an SAE basis), checks the channel indices and the widths,
    reads ``layout.timestep_stats_dir(variant)`` and writes ``layout.stage_dir(stage, variant)`` (``stage``: another
    folder name keeps a benchmark's variant apart from the stage's own outputs, e.g. ``priors_self_top``).

    Raises:
        IndexError: a channel index ``>= width`` (checked before anything is loaded).
        FileNotFoundError: the variant's timestep statistics are missing (names what to materialize).
        ValueError: the config's ``width`` disagrees with the model layer / SAE.
        ChannelsLockedError: another live run is writing some of the channels (see :func:`run_priors`).
        ddr_core.basis.WeightsChangedError: the model / SAE was provisioned again with other weights since
            the variant's capture (its statistics describe the old ones).
    """
    variant_channels = select_variant_channels(project, variant, channels)
    layer_name, selected = variant_channels.layer_name, variant_channels.channels
    stats_dir = layout.timestep_stats_dir(variant)
    require_statistics(stats_dir, variant)  # before loading a model

    out_dir = layout.stage_dir(stage, variant)
    model, basis = load_variant_model(project, layout, variant, out_dir, "priors folder", device, config.dtype)
    return run_priors(model, basis, layer_name, stats_dir, selected, out_dir, config, layout.data_root, log=log,
                      stop_after_channels=stop_after_channels,
                      lock_wait=lock_wait, lock_owner=lock_owner)
