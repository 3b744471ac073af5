"""Steering schedules: how strongly each channel is pushed at each timestep, and *where in time*.

One module for every stage that steers a channel during generation (``priors``, ``dose_response``):

- :func:`steering_schedule` turns the timestep statistics into a ``(channels, num_train_timesteps)`` strength
  table (``scale x max_activation(channel, t)`` at the selected timesteps, 0 elsewhere; the selection modes are
  described in :mod:`ddr_core.priors`);
- :func:`activity_window` gives a channel's **activity window**: the train timesteps within ``half_width`` of
  its highest activity peak (``activity_peaks.parquet``); :func:`outside_window` a window of the same width as
  far from the peak as the range allows (the control of the causal test);
- :func:`restrict_to_window` zeroes a schedule outside a window, so a channel is steered **only inside** it;
- **strength shape** (``shape`` of :func:`steering_schedule`): ``max_activation`` (the default, the thesis'
  ``scale x max_activation(channel, t)``: nearly flat over a channel's active timesteps on the toy world) or
  ``activity_profile``: ``scale x max_t max_activation(channel) x profile(t) / max_t profile`` where ``profile`` is
  the channel's activity profile (its interpolated top-k frequency, ``active_timesteps.parquet``), so the push is
  strongest where the channel is most often active and fades with its activity;
- **where in space** (:func:`self_gated_positions`, ``steer_positions: self_top`` of the priors stage): at each
  steered step only the ``ceil(fraction x positions)`` positions where the unit itself fires most in the
  current, unsteered activation are pushed (:func:`top_positions`); every other position is left bit-identical.

:func:`ddr_core.hooks.steer_layer` reads the table at the current scheduler timestep and leaves every element
whose strength there is 0 bit-identical, so steering outside a window is exactly a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from ddr_core.lazy_imports import lazy_module
from ddr_core.statistics import interpolate_profile, nearest_observed_timestep, read_summary
from ddr_core.variant_inputs import channel_list

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

TimestepSelection = Literal["active_timesteps", "all_timesteps", "activity_peaks", "activity_window"]
TIMESTEP_MODES: tuple[str, ...] = ("active_timesteps", "all_timesteps", "activity_peaks", "activity_window")
StrengthShape = Literal["max_activation", "activity_profile"]
STRENGTH_SHAPES: tuple[str, ...] = ("max_activation", "activity_profile")
SteerPositions = Literal["everywhere", "self_top"]
DEFAULT_WINDOW_HALF_WIDTH = 100
"""Train timesteps either side of the top peak in an activity window (201 of 1000: 5 of 25 DDIM steps)."""


@dataclass(frozen=True)
class TimestepWindow:
    """Train timesteps ``low..high`` (inclusive) in which a channel is steered."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low > self.high or self.low < 0:
            raise ValueError(f"a timestep window needs 0 <= low <= high, got low={self.low}, high={self.high}")

    @property
    def width(self) -> int:
        return self.high - self.low + 1

    def mask(self, num_train_timesteps: int) -> np.ndarray:
        """``(num_train_timesteps,)`` bool: inside the window."""
        steps = np.arange(num_train_timesteps)
        return (steps >= self.low) & (steps <= self.high)

    def contains(self, timestep: int) -> bool:
        return self.low <= int(timestep) <= self.high


def check_stats_channels(summary: dict[str, Any], stats_dir: Path, channels: list[int]) -> int:
    width = int(summary["width"])
    bad = [c for c in channels if not 0 <= c < width]
    if bad:
        raise ValueError(
            f"channel(s) {bad} are out of range: the timestep statistics in {stats_dir} cover "
            f"channels 0..{width - 1}"
        )
    return width


def top_peaks(stats_dir: str | Path, channels: Sequence[int]) -> dict[int, int]:
    """channel -> the train timestep of its highest activity peak (``peak_rank`` 0 of
    ``activity_peaks.parquet``); channels without a peak are absent."""
    stats_dir = Path(stats_dir)
    channels = channel_list(channels)
    check_stats_channels(read_summary(stats_dir), stats_dir, channels)
    peaks = (pl.scan_parquet(stats_dir / "activity_peaks.parquet")
             .filter(pl.col("channel").is_in(channels) & (pl.col("peak_rank") == 0))
             .select("channel", "timestep").collect())
    return {int(c): int(t) for c, t in peaks.iter_rows()}


def activity_window(peak: int, num_train_timesteps: int,
                    half_width: int = DEFAULT_WINDOW_HALF_WIDTH) -> TimestepWindow:
    """The train timesteps within ``half_width`` of ``peak``, clipped to ``0..num_train_timesteps-1``."""
    if half_width < 0:
        raise ValueError(f"half_width must be >= 0, got {half_width}")
    return TimestepWindow(max(0, int(peak) - half_width), min(num_train_timesteps - 1, int(peak) + half_width))


def outside_window(inside: TimestepWindow, num_train_timesteps: int) -> TimestepWindow:
    """A window of ``inside``'s width at the end of ``0..num_train_timesteps-1`` farther from it (disjoint).

    Raises:
        ValueError: the window covers more than half the range (no disjoint window of its width fits).
    """
    width = inside.width
    if 2 * width > num_train_timesteps:
        raise ValueError(f"the window {inside.low}..{inside.high} covers more than half of the "
                         f"{num_train_timesteps} timesteps: no disjoint window of its width; use a smaller half_width")
    center = (inside.low + inside.high) / 2
    if center >= (num_train_timesteps - 1) / 2:
        candidate = TimestepWindow(0, width - 1)
        if candidate.high >= inside.low:
            candidate = TimestepWindow(num_train_timesteps - width, num_train_timesteps - 1)
    else:
        candidate = TimestepWindow(num_train_timesteps - width, num_train_timesteps - 1)
        if candidate.low <= inside.high:
            candidate = TimestepWindow(0, width - 1)
    return candidate


def restrict_to_window(schedule: torch.Tensor, windows: Sequence[TimestepWindow | None]) -> torch.Tensor:
    """``schedule`` ``(rows, num_train_timesteps)`` with every entry outside its row's window set to 0 (a
    ``None`` window keeps the row)."""
    if schedule.ndim != 2 or schedule.shape[0] != len(windows):
        raise ValueError(f"schedule must be (rows={len(windows)}, timesteps), got {tuple(schedule.shape)}")
    out = schedule.clone()
    for row, window in enumerate(windows):
        if window is not None:
            out[row, ~torch.from_numpy(window.mask(schedule.shape[1]))] = 0.0
    return out


def steering_schedule(
    stats_dir: str | Path,
    channels: Sequence[int],
    mode: TimestepSelection,
    scale: float,
    num_train_timesteps: int = 1000,
    *,
    scheduler_timesteps: Sequence[int] | None = None,
    window_half_width: int = DEFAULT_WINDOW_HALF_WIDTH,
    shape: StrengthShape = "max_activation",
) -> torch.Tensor:
    """Steering strengths ``(len(channels), num_train_timesteps)`` float32 from the statistics tables.

    Entry ``[i, t]`` is ``scale * max_activation(channels[i], t)`` (interpolated onto every train
    timestep, see :mod:`ddr_core.priors`) where ``t`` is selected by ``mode`` and 0 elsewhere. Only the
    rows of ``channels`` are read from ``max_activation.parquet``, ``active_timesteps.parquet`` and
    ``activity_peaks.parquet``.

    Args:
        stats_dir: a finished timestep statistics folder (``summary.json`` present).
        channels: channel indices (raw channels or SAE features of the variant).
        mode: ``"active_timesteps"``, ``"all_timesteps"``, ``"activity_peaks"`` or ``"activity_window"`` (every
            train timestep of the channel's :func:`activity_window`, none for a channel without a peak).
        scale: multiplier of the max activation.
        num_train_timesteps: the scheduler's train timesteps; must equal the statistics' profile length.
        scheduler_timesteps: the generation's scheduler timesteps, used by ``activity_peaks`` to pick
            the one nearest each peak; ``None`` means the statistics' observed timesteps.
        window_half_width: half width of the ``activity_window`` mode's window (train timesteps).
        shape: ``"max_activation"`` (entry ``scale * max_activation(c, t)``) or ``"activity_profile"`` (entry
            ``scale * max_t max_activation(c) * profile(c, t) / max_t profile(c)``, the module docstring; 0 where
            the channel is inactive), at the timesteps ``mode`` selects either way.

    Raises:
        ValueError: an unknown mode or shape, a channel outside the statistics' width, or a profile length
            other than ``num_train_timesteps``.
    """
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"unknown timesteps mode {mode!r}; use one of {', '.join(map(repr, TIMESTEP_MODES))}")
    if shape not in STRENGTH_SHAPES:
        raise ValueError(f"unknown strength shape {shape!r}; use one of {', '.join(map(repr, STRENGTH_SHAPES))}")
    stats_dir = Path(stats_dir)
    summary = read_summary(stats_dir)
    channels = channel_list(channels)
    check_stats_channels(summary, stats_dir, channels)
    profile_length = int(summary["config"]["total_timesteps"])
    if profile_length != num_train_timesteps:
        raise ValueError(
            f"the statistics in {stats_dir} were computed on {profile_length} timesteps but the scheduler "
            f"has num_train_timesteps={num_train_timesteps}; recompute the statistics with "
            f"total_timesteps={num_train_timesteps}"
        )
    observed = np.asarray(summary["timesteps"], dtype=np.int64)
    row_of = {channel: row for row, channel in enumerate(channels)}
    n_rows = len(channels)
    if n_rows == 0:
        return torch.zeros(0, num_train_timesteps)

    maxima = (
        pl.scan_parquet(stats_dir / "max_activation.parquet")
        .filter(pl.col("channel").is_in(channels))
        .select("channel", "timestep", "max_activation")
        .collect()
    )
    column_of = {int(t): i for i, t in enumerate(observed)}
    recorded = np.full((n_rows, observed.size), np.nan, dtype=np.float64)
    for channel, timestep, value in maxima.iter_rows():
        if int(timestep) in column_of:
            recorded[row_of[int(channel)], column_of[int(timestep)]] = value
    missing = sorted({channels[r] for r in np.nonzero(np.isnan(recorded).any(axis=1))[0]})
    if missing:
        raise ValueError(
            f"max_activation.parquet in {stats_dir} lacks observed timesteps for channel(s) {missing[:10]}; "
            "the statistics are incomplete, recompute them"
        )
    if shape == "activity_profile":
        profiles = activity_profiles(stats_dir, channels, num_train_timesteps)
        peak = profiles.max(axis=1, keepdims=True)
        relative = np.divide(profiles, peak, out=np.zeros_like(profiles), where=peak > 0)
        strengths = recorded.max(axis=1, keepdims=True) * relative * float(scale)
    else:
        strengths = np.stack(
            [interpolate_profile(observed, recorded[r], num_train_timesteps) for r in range(n_rows)]
        ) * float(scale)

    selected = np.zeros((n_rows, num_train_timesteps), dtype=bool)
    if mode == "all_timesteps":
        selected[:] = True
    elif mode == "active_timesteps":
        active = (
            pl.scan_parquet(stats_dir / "active_timesteps.parquet")
            .filter(pl.col("channel").is_in(channels))
            .select("channel", "timestep")
            .collect()
        )
        rows = np.array([row_of[int(c)] for c in active["channel"].to_list()], dtype=np.int64)
        selected[rows, active["timestep"].to_numpy().astype(np.int64)] = True
    elif mode == "activity_window":
        for channel, peak in top_peaks(stats_dir, channels).items():
            selected[row_of[channel]] = activity_window(peak, num_train_timesteps, window_half_width).mask(
                num_train_timesteps)
    else:
        targets = np.asarray(
            observed if scheduler_timesteps is None else list(scheduler_timesteps), dtype=np.int64
        )
        peaks = (
            pl.scan_parquet(stats_dir / "activity_peaks.parquet")
            .filter(pl.col("channel").is_in(channels))
            .select("channel", "timestep")
            .collect()
        )
        for channel, timestep in peaks.iter_rows():
            selected[row_of[int(channel)], nearest_observed_timestep(targets, int(timestep))] = True
    return torch.from_numpy(np.where(selected, strengths, 0.0).astype(np.float32))


def activity_profiles(stats_dir: str | Path, channels: Sequence[int], num_train_timesteps: int) -> np.ndarray:
    """``(len(channels), num_train_timesteps)`` float64: each channel's activity profile (its top-k frequency
    interpolated onto every train timestep, as ``active_timesteps.parquet`` records it; 0 where inactive)."""
    stats_dir = Path(stats_dir)
    channels = channel_list(channels)
    check_stats_channels(read_summary(stats_dir), stats_dir, channels)
    row_of = {channel: row for row, channel in enumerate(channels)}
    profiles = np.zeros((len(channels), num_train_timesteps), dtype=np.float64)
    active = (pl.scan_parquet(stats_dir / "active_timesteps.parquet").filter(pl.col("channel").is_in(channels))
              .select("channel", "timestep", "frequency").collect())
    for channel, timestep, frequency in active.iter_rows():
        if not 0 <= int(timestep) < num_train_timesteps:
            raise ValueError(f"active_timesteps.parquet in {stats_dir} has timestep {timestep} outside "
                             f"0..{num_train_timesteps - 1}; recompute the statistics")
        profiles[row_of[int(channel)], int(timestep)] = float(frequency)
    return profiles


def top_positions(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(n, positions)`` bool: per row the ``ceil(fraction x positions)`` positions of largest value (at least
    one; ties to the lower position)."""
    if maps.ndim != 2:
        raise ValueError(f"maps must be (rows, positions), got shape {tuple(maps.shape)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    count = max(1, math.ceil(fraction * maps.shape[1] - 1e-9))
    order = torch.argsort(maps.float(), dim=1, descending=True, stable=True)[:, :count]
    mask = torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)
    return mask.scatter_(1, order, True)


def self_gated_positions(basis: Any, units: Sequence[int] | torch.Tensor,
                         fraction: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A position gate (:func:`ddr_core.hooks.steer_layer`'s ``positions``) steering element ``b`` only where unit
    ``units[b]`` fires most in the current unsteered activation: the :func:`top_positions` of its map
    (:meth:`ddr_core.basis.Basis.unit_maps`; a raw channel's own values, an SAE feature's ReLU activation). A layer
    batch that is a multiple of ``len(units)`` (CFG halves) gates each part by its own map."""
    index = torch.as_tensor(units, dtype=torch.long).flatten()
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")

    def gate(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] % max(1, index.numel()):
            raise ValueError(f"layer batch {tokens.shape[0]} is not a multiple of the {index.numel()} steered units")
        repeated = index.repeat(tokens.shape[0] // index.numel())
        return top_positions(basis.unit_maps(tokens.float(), repeated), fraction)

    return gate
