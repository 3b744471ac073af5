"""Activity figures of one channel: when in denoising it is active, how strongly, and on what.

A frame shows, for one channel and one of its activity peaks:

- top left: the activity profile, i.e. frequency in top-k at the observed timesteps (dots), its linear
  interpolation over all timesteps (line, area = active timesteps) and the peaks (crosses);
- bottom left: the maximum activation at each observed timestep;
- right: the dataset example (generated image and its prompt) that activates the channel most at the
  observed timestep nearest to the current peak.

The timestep axes run from ``total_timesteps`` down to 0, the direction of denoising; the current peak
is a vertical line on both plots. :func:`render_channel_figure` gives one frame per peak (one frame
without an example when the channel has no peak) and :func:`save_activity_figure` writes a looping GIF
(several frames) or a PNG (one frame). Rendering uses the Agg backend through ``matplotlib.figure``
(no pyplot state, safe in threads).

:func:`write_channel_figures` is the stage: it claims the channels in the output folder
(:func:`ddr_core.locks.claim_channels`; a second run on any of them fails at once naming the first, runs
on other channels go on side by side), deletes the temporaries a killed run left for them, writes each
figure atomically and removes a channel's figure of the other kind (a GIF that is now a PNG).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from ddr_core.atomic import atomic_path, atomic_write_text, remove_temporaries_of
from ddr_core.channel_store import channel_file, channel_name
from ddr_core.paths import UnsafePathError, check_output_folder, resolve_in_data_root
from ddr_core.statistics import interpolate_profile, read_summary

PROFILE_COLOR = "#2ecc71"
PEAK_COLOR = "#e74c3c"
MAX_COLOR = "#3498db"
CURRENT_COLOR = "#8e44ad"


def _as_peak_list(peaks: Sequence[int] | Sequence[tuple[int, float]] | None) -> list[int]:
    result = []
    for peak in peaks or []:
        result.append(int(peak[0]) if isinstance(peak, tuple | list) else int(peak))
    return result


def plot_channel_activity(
    channel: int,
    profile_points: tuple[Sequence[int] | np.ndarray, Sequence[float] | np.ndarray],
    interpolated: Sequence[float] | np.ndarray,
    peaks: Sequence[int] | Sequence[tuple[int, float]] | None,
    max_activation_curve: tuple[Sequence[int] | np.ndarray, Sequence[float] | np.ndarray],
    current_peak: int | None = None,
    example_image: Image.Image | None = None,
    example_prompt: str | None = None,
    title: str | None = None,
    dpi: int = 80,
) -> Image.Image:
    """Render one frame of a channel's activity figure.

    Args:
        channel: channel index (for titles).
        profile_points: ``(timesteps (T,), frequency (T,))`` at the observed timesteps, any order.
        interpolated: ``(total_timesteps,)`` profile over timesteps ``0..total_timesteps-1``.
        peaks: peak timesteps (or ``(timestep, height)`` pairs), marked on the profile.
        max_activation_curve: ``(timesteps (T,), max_activation (T,))``.
        current_peak: the peak this frame is about (vertical line), or ``None``.
        example_image: the dataset example for ``current_peak`` (shown right), or ``None``.
        example_prompt: its prompt.
        title: figure title; defaults to ``"Channel <channel>"``.

    Returns:
        An RGB ``PIL.Image``.
    """
    observed_t = np.asarray(profile_points[0], dtype=np.float64)
    observed_f = np.asarray(profile_points[1], dtype=np.float64)
    profile = np.asarray(interpolated, dtype=np.float64)
    max_t = np.asarray(max_activation_curve[0], dtype=np.float64)
    max_v = np.asarray(max_activation_curve[1], dtype=np.float64)
    peak_timesteps = _as_peak_list(peaks)
    total = len(profile)
    x_full = np.arange(total)

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: loading the definitions stays light
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 8), dpi=dpi)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, width_ratios=[1.6, 1.0])
    ax_profile = figure.add_subplot(grid[0, 0])
    ax_max = figure.add_subplot(grid[1, 0])
    ax_image = figure.add_subplot(grid[:, 1])

    ax_profile.plot(x_full, profile, "-", color=PROFILE_COLOR, linewidth=2, label="interpolated")
    ax_profile.fill_between(x_full, 0, profile, where=profile > 0, color=PROFILE_COLOR, alpha=0.15,
                            label="active timesteps")
    ax_profile.plot(observed_t, observed_f, "o", color="gray", alpha=0.6, markersize=4, label="observed")
    for index, peak in enumerate(peak_timesteps):
        if 0 <= peak < total:
            ax_profile.plot(peak, profile[peak], "x", color=PEAK_COLOR, markersize=10, markeredgewidth=3,
                            label="peak" if index == 0 else None)
            ax_profile.annotate(f"T={peak}", (peak, profile[peak]), textcoords="offset points", xytext=(4, 6),
                                fontsize=9, fontweight="bold")
    ax_profile.set_ylabel("frequency in top-k")
    ax_profile.set_title(f"activity profile{'' if peak_timesteps else ' (no peaks)'}")

    order = np.argsort(max_t)
    ax_max.plot(max_t[order], max_v[order], "-o", color=MAX_COLOR, markersize=3, label="max activation")
    ax_max.set_ylabel("max activation")
    ax_max.set_title("maximum activation over the dataset")

    for ax in (ax_profile, ax_max):
        ax.set_xlim(total, 0)  # denoising runs from high to low timesteps
        ax.axhline(0, color="black", linewidth=1, alpha=0.3)
        ax.grid(True, alpha=0.2)
        ax.set_xlabel("timestep")
    if current_peak is not None:
        for ax in (ax_profile, ax_max):
            ax.axvline(current_peak, color=CURRENT_COLOR, linestyle="--", linewidth=1.5, label="current peak")
        if max_t.size:
            value = float(np.interp(current_peak, max_t[order], max_v[order]))
            ax_max.plot(current_peak, value, "*", color=CURRENT_COLOR, markersize=16)
    top = max(float(profile.max(initial=0.0)), float(observed_f.max(initial=0.0)))
    ax_profile.set_ylim(-0.02 * (top or 1.0), 1.25 * (top or 1.0))  # headroom for labels and legend
    ax_profile.legend(loc="best", fontsize=8, framealpha=0.7)
    ax_max.legend(loc="best", fontsize=8, framealpha=0.7)

    ax_image.axis("off")
    if example_image is not None:
        ax_image.imshow(np.asarray(example_image.convert("RGB")))
    else:
        message = "no activity peak" if current_peak is None else "no example image"
        ax_image.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="gray",
                      transform=ax_image.transAxes)
    caption = []
    if current_peak is not None:
        caption.append(f"dataset example at peak T={current_peak}")
    if example_prompt:
        caption.append(textwrap.fill(f'"{example_prompt}"', width=48))
    ax_image.set_title("\n".join(caption), fontsize=10)

    figure.suptitle(title or f"Channel {channel}", fontsize=14)
    figure.tight_layout()
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))


def _load_image(image_root: Path, relative: str | None) -> Image.Image | None:
    """The image, or ``None`` (drawn as a placeholder) when the path is empty, escapes ``image_root``, cannot
    be a file name (a NUL byte, too long), or the file is missing or not a decodable image."""
    if not relative or not isinstance(relative, str):
        return None
    try:
        path = resolve_in_data_root(image_root, relative)
        if not path.is_file():
            return None
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnsafePathError, OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        return None


def render_channel_figure(
    stats_dir: str | os.PathLike[str],
    channel: int,
    image_root: str | os.PathLike[str],
    dpi: int = 80,
) -> list[Image.Image]:
    """Frames of ``channel``'s activity figure from a finished statistics folder, one per peak.

    Args:
        stats_dir: output folder of :func:`ddr_core.statistics.compute_timestep_stats`.
        channel: channel index.
        image_root: folder that the ``image_path`` of the dataset examples is relative to (the data
            root); a missing image is shown as a placeholder.

    Returns:
        One frame per activity peak, highest first; a single frame without example if there is none.
    """
    stats_dir = Path(stats_dir)
    summary = read_summary(stats_dir)
    width = int(summary["width"])
    if not 0 <= channel < width:
        raise ValueError(f"channel {channel} is outside 0..{width - 1} of variant {summary['variant']!r}")
    total = int(summary["config"]["total_timesteps"])
    observed = np.asarray(summary["timesteps"], dtype=np.int64)

    def rows(table: str) -> pl.DataFrame:
        return pl.scan_parquet(stats_dir / f"{table}.parquet").filter(pl.col("channel") == channel).collect()

    frequency_rows = rows("frequency")
    frequency_by_t = dict(zip(frequency_rows["timestep"].to_list(), frequency_rows["frequency"].to_list(),
                              strict=True))
    frequency = np.array([frequency_by_t.get(int(t), 0.0) for t in observed])
    profile = interpolate_profile(observed, frequency, total)
    maxima = rows("max_activation").sort("timestep")
    peaks = rows("activity_peaks").sort("peak_rank")
    examples = rows("dataset_examples").filter(pl.col("rank") == 0)
    peak_list = list(zip(peaks["timestep"].to_list(), peaks["height"].to_list(), strict=True))
    common = {
        "channel": channel,
        "profile_points": (observed, frequency),
        "interpolated": profile,
        "peaks": peak_list,
        "max_activation_curve": (maxima["timestep"].to_numpy(), maxima["max_activation"].to_numpy()),
        "title": f"{summary['variant']} - channel {channel}",
        "dpi": dpi,
    }
    if not peak_list:
        return [plot_channel_activity(**common)]
    frames = []
    for peak in peaks.iter_rows(named=True):
        example = examples.filter(pl.col("timestep") == peak["observed_timestep"])
        image, prompt = None, None
        if example.height:
            image = _load_image(Path(image_root), example["image_path"][0])
            prompt = example["prompt"][0]
        frames.append(
            plot_channel_activity(**common, current_peak=int(peak["timestep"]), example_image=image,
                                  example_prompt=prompt)
        )
    return frames


def save_activity_figure(
    frames: Sequence[Image.Image], path_without_suffix: str | os.PathLike[str], duration_ms: int = 2000
) -> Path:
    """Write ``frames`` as a looping GIF (several frames, ``duration_ms`` each) or a PNG (one frame).

    The suffix is added to ``path_without_suffix``; the write is atomic. Returns the written path.
    """
    if not frames:
        raise ValueError("no frames to save: render at least one with render_channel_figure")
    if duration_ms <= 0:
        raise ValueError(f"duration_ms must be > 0, got {duration_ms}")
    base = Path(path_without_suffix)
    if len(frames) == 1:
        destination = base.with_name(base.name + ".png")
        with atomic_path(destination) as tmp:
            frames[0].save(tmp, format="PNG", optimize=True)
    else:
        destination = base.with_name(base.name + ".gif")
        with atomic_path(destination) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=list(frames[1:]), loop=0,
                           duration=duration_ms, disposal=1)
    return destination


def figure_names(channel: int) -> tuple[str, str]:
    """The two possible figure files of a channel: ``channel_<c:05d>.png`` and ``.gif``."""
    return channel_file("", channel, ".png").name, channel_file("", channel, ".gif").name


def write_channel_figures(
    stats_dir: str | os.PathLike[str],
    channels: Sequence[int],
    out_dir: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    *,
    dpi: int = 80,
    duration_ms: int = 2000,
    lock_wait: bool | float = False,
    lock_owner: str = "",
    stamp: str | None = None,
) -> list[Path]:
    """Render and save the figure of every channel in ``channels`` into ``out_dir``, holding a claim on them.

    With ``stamp`` (what the figure is drawn from: the statistics' data version, the settings, the code version),
    a channel whose figure exists and was drawn from the same stamp (``.channel_<c>.stamp``, written after the
    figure) is not drawn again: a re-run with everything present redraws nothing.

    Args:
        stats_dir: finished timestep statistics.
        channels: the channels to draw.
        out_dir: the figures folder (created).
        image_root: what the dataset examples' image paths are relative to (the data root).
        dpi, duration_ms: as :func:`render_channel_figure` / :func:`save_activity_figure`.
        lock_wait: ``False``: fail at once with :class:`~ddr_core.locks.ChannelsLockedError` when another live
            run holds some of the channels; seconds (or ``True``) to wait.
        lock_owner: who this run is (shown to a run that finds the channels held).

    Returns:
        The written figure paths, in channel order.
    """
    from ddr_core.locks import claim_channels

    out = check_output_folder(Path(out_dir), None, "figures folder")  # not a link, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    channels = [int(c) for c in channels]
    written = []
    with claim_channels(out, channels, wait=lock_wait, owner=lock_owner or "activity plots"):
        remove_temporaries_of(out, [name for c in channels for name in figure_names(c)])
        for channel in channels:
            stamp_path = out / f".{channel_name(channel)}.stamp"
            if stamp is not None and stamp_path.is_file() and stamp_path.read_text(encoding="utf-8") == stamp:
                existing = [out / name for name in figure_names(channel) if (out / name).is_file()]
                if len(existing) == 1:  # drawn from the same inputs: kept as it is
                    written.append(existing[0])
                    continue
            stamp_path.unlink(missing_ok=True)  # a figure being redrawn is not stamped until it is written
            frames = render_channel_figure(stats_dir, channel, image_root, dpi=dpi)
            path = save_activity_figure(frames, out / channel_name(channel), duration_ms=duration_ms)
            for name in figure_names(channel):
                if name != path.name:
                    (out / name).unlink(missing_ok=True)
            if stamp is not None:
                atomic_write_text(stamp_path, stamp)
            written.append(path)
    return written
