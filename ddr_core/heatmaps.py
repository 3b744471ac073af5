"""Where a feature fires: spatial heatmaps of a channel's top dataset examples, and their toy-world score.

A capture keeps one value per generation, step and unit (the mean over positions), so where in the image a unit
fires is not stored. For each channel, its ``examples_per_channel`` top dataset examples (``timestep_stats``'
``dataset_examples``) are regenerated exactly from their recorded seeds (:func:`ddr_core.regenerate.regenerate_positions`)
while the variant's hook point is read at every denoising step and passed through the variant's basis (raw channels,
or an SAE's feature activations) position by position. Per example this writes:

- ``g<id>_peak.png``: the per-position activation at the **peak step** (the step where the example's mean
  activation over positions, what the statistics measure, is highest), its positive part upsampled (bilinear) to
  the image and overlaid on the regenerated image;
- ``g<id>_steps.png``: an animated PNG, one frame per denoising step, on one colour scale per example;
- one row of ``heatmaps.parquet`` (the union over channels; ``summary.json`` holds the toy-world score).

**Resumable per channel**: a channel's folder is finished when its ``stamp.json`` (written last) holds the stamp of
what it was drawn from (:func:`channel_stamp`: the settings, the stage's format, the caller's ``inputs`` such as
the statistics' and the capture's data versions and the code version, and the channel's top examples with their
dataset activations). A re-run, or a retry after preemption, regenerates only the channels without a matching stamp;
changed inputs or settings redo them (their old images are deleted first).

**Toy-world score** (a model whose prompts carry the toy world's concepts): the share of a channel's heat (the
upsampled positive part at the peak step) that falls on the shape, against chance = the share of the image the
mask covers, and beside it ``ideal_detector``: the share of an ideal shape detector at the layer's resolution
(:func:`ideal_detector_share`), a reference, not a bound (heat on the shape's interior positions only scores
higher). The generated image is not a render, and scenes in the world have random sizes and positions, so the
mask of "the scene the prompt describes" is not pixel-aligned with a generation. The mask scored against is the
renderer's exact mask (:func:`ddr_core.toy_world.shape_coverage`, anti-aliased coverage) of the **world scene
fitted to the generation**: the prompt's colour and background, any shape, radius and centre on a grid (radius in
7 steps over the world's range, centres every pixel), the one whose render is nearest (RMSE) to the generated
image. A generation whose nearest render is farther than :data:`~ddr_core.toy_world.RECOGNISABLE_RMSE` is not a
recognisable picture of the world and is not scored (``mask_source = "unrecognisable"``). Per channel the score is
the mean over its scored examples of ``share - chance``; over channels a bootstrap interval (channels resampled)
and sign-flip p-values both ways (:mod:`ddr_core.benchmark_stats`): a channel can be about the background too.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

from ddr_core.atomic import atomic_write_bytes, atomic_write_json
from ddr_core.benchmark_stats import cluster_bootstrap, sign_flip_test

TABLE_FILE = "heatmaps.parquet"
SUMMARY_FILE = "summary.json"
STAMP_FILE = "stamp.json"
CHANNEL_TABLE_FILE = "examples.parquet"
FORMAT = "ddr.heatmaps/1"
STAGE = "heatmaps"
LogFn = Any


class HeatmapConfig(BaseModel):
    """How the heatmaps are made (the ``heatmaps`` asset's run config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    examples_per_channel: int = Field(4, ge=1, le=64, description="top dataset examples regenerated per channel")
    batch_size: int = Field(16, ge=1, le=256, description="generations regenerated per call")
    frame_size: int = Field(128, ge=16, le=1024, description="side of the written images in pixels")
    overlay_alpha: float = Field(0.55, ge=0.0, le=1.0, description="opacity of the heat over the image")
    frame_ms: int = Field(120, ge=20, le=5000, description="duration of one step in the animation (ms)")
    score_toy_world: bool = Field(True, description="score heat on the shape vs chance where the model draws a "
                                                    "toy world (its prompts are world prompts)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    def config_hash(self) -> str:
        from ddr_core.config import config_hash

        return config_hash(self.model_dump(mode="json"))


# ----------------------------------------------------------------------------------------------- heat and images
def basis_unit_maps(basis: Any, units: Sequence[int], rows: int = 16384):
    """Per-position activations of ``units`` through ``basis``' own :meth:`~ddr_core.basis.Basis.unit_activations`
    (each position as a one-position image, so the mean over positions is the position's value): tokens
    ``(b, N, C)`` -> ``(b, N, len(units))``. ``rows`` bounds the positions per basis call (memory)."""
    import torch

    index = [int(u) for u in units]

    def maps(tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        flat = tokens.reshape(b * n, 1, c)
        columns = []
        for unit in index:
            parts = [basis.unit_activations(flat[i:i + rows], torch.full((len(flat[i:i + rows]),), unit,
                                                                          dtype=torch.long, device=flat.device))
                     for i in range(0, len(flat), rows)]
            columns.append(torch.cat(parts).float().reshape(b, n))
        return torch.stack(columns, dim=2)

    return maps


def peak_step(maps: Any) -> int:
    """The step (axis 0 of ``(steps, h, w)``) whose mean over positions is highest (first on ties)."""
    values = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1).mean(axis=1)
    return int(np.argmax(values))


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` -> ``(H, W)`` bilinear (half-pixel centres), float64."""
    import torch

    tensor = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    up = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    return up[0, 0].double().numpy()


def heat_share(heat: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """``(share, chance)``: the share of ``heat``'s positive part on ``mask`` (coverage in ``[0, 1]``, the image's
    size) and the share of the image the mask covers. ``share`` is NaN when there is no positive heat."""
    positive = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    weights = np.asarray(mask, dtype=np.float64)
    if positive.shape != weights.shape:
        raise ValueError(f"heat {positive.shape} and mask {weights.shape} must have the image's shape")
    total = positive.sum()
    chance = float(weights.mean())
    return (float((positive * weights).sum() / total) if total > 0 else float("nan")), chance


def ideal_detector_share(mask: np.ndarray, grid: tuple[int, int]) -> float:
    """The share of an ideal shape detector at the layer's resolution: heat = the ``mask``'s coverage of each of the
    ``grid`` positions (area average), upsampled back as the heat is, scored against ``mask``. A coarse layer (4x4
    on a 32x32 image) blurs heat over the background: this says how far above chance a detector of the whole shape
    can get there (a reference, not a bound: heat on the shape's interior positions only scores higher)."""
    import torch

    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None],
                                                     tuple(int(g) for g in grid))[0, 0].numpy()
    return heat_share(upsample(pooled, np.asarray(mask).shape), mask)[0]


def _colour(values: np.ndarray) -> np.ndarray:
    """``[0, 1]`` -> RGB uint8 through matplotlib's ``inferno``."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.clip(values, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def overlay(image: Any, heat: np.ndarray, scale: float, size: int, alpha: float) -> Any:
    """The PIL image ``size`` x ``size``: ``image`` with the positive part of ``heat`` (divided by ``scale``,
    upsampled bilinear) blended over it."""
    from PIL import Image

    base = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.NEAREST), dtype=np.float64)
    up = upsample(np.clip(heat, 0.0, None) / scale if scale > 0 else np.zeros_like(heat), (size, size))
    weight = alpha * np.clip(up, 0.0, 1.0)[..., None]
    blended = base * (1 - weight) + _colour(up).astype(np.float64) * weight
    return Image.fromarray(np.round(blended).astype(np.uint8))


def _png(image: Any, frames: Sequence[Any] = (), duration: int = 100) -> bytes:
    import io

    buffer = io.BytesIO()
    if frames:
        image.save(buffer, format="PNG", save_all=True, append_images=list(frames), duration=duration, loop=0,
                   compress_level=3)
    else:
        image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- toy-world masks
@dataclass(frozen=True)
class SceneFit:
    """The world scene nearest to a generated image: its exact ``coverage`` ``(S, S)`` and how near (``rmse``)."""

    coverage: np.ndarray
    rmse: float
    shape: str
    radius: float
    center_x: float
    center_y: float


@functools.lru_cache(maxsize=4)
def _candidates(size: int, radii: int) -> tuple[tuple[str, float, np.ndarray, np.ndarray, np.ndarray], ...]:
    """Every ``(shape, radius, centres x, centres y, coverage (k, size * size))`` :func:`fit_scene_mask` tries (the
    same for every image of a size: computed once)."""
    from ddr_core.toy_world import SHAPES, ToyWorldConfig, shape_coverage

    world = ToyWorldConfig(image_size=max(size, 8))
    out = []
    for shape in SHAPES:
        for radius in np.linspace(world.min_size_fraction, world.max_size_fraction, radii) * size:
            margin = radius + 1.0
            centres = np.arange(math.ceil(margin * 2) / 2, size - margin + 1e-9, 1.0)
            if not len(centres):
                continue
            cy, cx = (a.ravel() for a in np.meshgrid(centres, centres, indexing="ij"))
            cover = shape_coverage(shape, float(radius), cx, cy, size, supersample=2).reshape(len(cx), -1)
            out.append((shape, float(radius), cx, cy, cover.astype(np.float32)))
    return tuple(out)


def fit_scene_mask(image: np.ndarray, prompt: str, radii: int = 7) -> SceneFit:
    """Fit the world scene of ``prompt``'s colour and background (any shape; radius on ``radii`` steps of the
    world's range, centres every pixel) to ``image`` ``(S, S, 3)`` uint8; see the module docstring.

    Raises:
        ValueError: ``prompt`` is not a world prompt; ``image`` is not square RGB.
    """
    from ddr_core.toy_world import (
        BACKGROUND_RGB,
        COLOUR_RGB,
        parse_prompt,
        shape_coverage,
    )

    labels = parse_prompt(prompt)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[0] != array.shape[1] or array.shape[2] != 3:
        raise ValueError(f"fit_scene_mask needs a square (S, S, 3) RGB image, got {array.shape}")
    size = array.shape[0]
    target = array.astype(np.float64).reshape(-1, 3) / 255.0
    background = np.asarray(BACKGROUND_RGB[labels["background"]], dtype=np.float64) / 255.0
    colour = np.asarray(COLOUR_RGB[labels["colour"]], dtype=np.float64) / 255.0
    # a render is background + cover * (colour - background): its squared error per pixel is
    # |d|^2 + 2 cover d.e + cover^2 |e|^2 with d = background - target, e = colour - background
    d = background[None, :] - target
    e = colour - background
    base, cross, square = float((d * d).sum()), (2.0 * (d @ e)).astype(np.float32), float(e @ e)
    best: tuple[float, str, float, float, float] | None = None
    for shape, radius, cx, cy, cover in _candidates(size, radii):
        errors = np.sqrt(np.clip((base + cover @ cross + (cover * cover).sum(axis=1) * square) / (3 * size * size),
                                 0.0, None))
        i = int(np.argmin(errors))
        if best is None or errors[i] < best[0]:
            best = (float(errors[i]), shape, radius, float(cx[i]), float(cy[i]))
    assert best is not None
    rmse, shape, radius, center_x, center_y = best
    coverage = shape_coverage(shape, radius, center_x, center_y, size, supersample=4)
    return SceneFit(coverage, rmse, shape, radius, center_x, center_y)


def is_world_prompt(prompt: str) -> bool:
    from ddr_core.toy_world import parse_prompt

    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- the stage
@dataclass
class HeatmapsResult:
    out_dir: Path
    channels_done: list[int] = field(default_factory=list)
    channels_resumed: list[int] = field(default_factory=list)
    channels_without_examples: list[int] = field(default_factory=list)
    examples: int = 0
    seconds: float = 0.0
    table_path: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def channel_dir(out_dir: Path, channel: int) -> Path:
    return out_dir / f"channel_{int(channel):05d}"


def channel_stamp(config: HeatmapConfig, inputs: dict[str, Any] | None, ranks: Sequence[tuple[int, float]]) -> str:
    """What a channel's heatmaps are drawn from, as one hash: the settings (``batch_size`` left out: it changes no
    output), the stage's format, ``inputs`` (the caller's data versions and code version) and the channel's top
    examples ``(generation id, dataset activation)``."""
    from ddr_core.config import config_hash

    return config_hash({"format": FORMAT, "config": config.model_dump(mode="json", exclude={"batch_size"}),
                        "inputs": inputs or {},
                        "examples": [[int(g), None if not math.isfinite(a) else round(float(a), 6)] for g, a in ranks]})


def channel_is_finished(out_dir: Path, channel: int, stamp: str) -> bool:
    """The channel's folder holds its table and images drawn from ``stamp`` (see the module docstring)."""
    folder = channel_dir(out_dir, channel)
    try:
        found = json.loads((folder / STAMP_FILE).read_text(encoding="utf-8")).get("stamp")
        table = pl.read_parquet(folder / CHANNEL_TABLE_FILE, columns=["peak_image", "steps_image"])
    except (OSError, ValueError, pl.exceptions.PolarsError):
        return False
    return found == stamp and table.height > 0 and all(
        (folder / Path(p).name).is_file() for p in table["peak_image"].to_list() + table["steps_image"].to_list())


def write_channel_heatmaps(out_dir: Path, data_root: Path, channel: int, unit: int, recording: Any,
                           rows_of: dict[int, int], images: dict[int, Any], fits: dict[int, SceneFit | None],
                           ranks: list[tuple[int, float]], config: HeatmapConfig) -> pl.DataFrame:
    """Write one channel's images and table (``channel_xxxxx/examples.parquet``) from a
    :class:`~ddr_core.regenerate.PositionRecording`; ``unit``: the channel's index in its maps, ``rows_of``:
    generation id -> its row, ``ranks``: ``(generation id, dataset activation)`` best first."""
    from ddr_core.paths import relative_to_data_root
    from ddr_core.toy_world import RECOGNISABLE_RMSE

    folder = channel_dir(out_dir, channel)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP_FILE).unlink(missing_ok=True)  # being redrawn: unfinished until the stamp is written again
    # the old table goes before the images it names: a redraw that dies midway leaves no row pointing at deleted
    # images for the union (which other blocks' runs write) to pick up
    (folder / CHANNEL_TABLE_FILE).unlink(missing_ok=True)
    for stale in folder.glob("g*.png"):  # another run's examples (other statistics or settings)
        stale.unlink()
    rows = []
    for rank, (generation_id, dataset_activation) in enumerate(ranks):
        row = rows_of[generation_id]
        maps = recording.maps[row, :, unit].double().numpy()  # (steps, h, w)
        gen = recording.generations[row]
        step = peak_step(maps)
        scale = float(np.clip(maps, 0.0, None).max())
        image = images[generation_id]
        peak_path = folder / f"g{generation_id:06d}_peak.png"
        steps_path = folder / f"g{generation_id:06d}_steps.png"
        atomic_write_bytes(peak_path, _png(overlay(image, maps[step], scale, config.frame_size, config.overlay_alpha)))
        frames = [overlay(image, m, scale, config.frame_size, config.overlay_alpha) for m in maps]
        atomic_write_bytes(steps_path, _png(frames[0], frames[1:], config.frame_ms))
        share = chance = fit_rmse = ideal = float("nan")
        source, fitted_shape = "not scored", None
        fit = fits.get(generation_id)
        if fit is not None:
            fit_rmse, fitted_shape = fit.rmse, fit.shape
            if fit.rmse <= RECOGNISABLE_RMSE:
                share, chance = heat_share(upsample(maps[step], fit.coverage.shape), fit.coverage)
                ideal = ideal_detector_share(fit.coverage, maps.shape[1:])
                source = "fitted world scene"
            else:
                source = "unrecognisable"
        rows.append({
            "channel": int(channel), "rank": rank, "generation_id": int(generation_id), "prompt": gen.prompt,
            "seed": int(gen.seed), "dataset_activation": float(dataset_activation), "peak_step": step,
            "peak_timestep": int(recording.timesteps[step]), "peak_mean_activation": float(maps[step].mean()),
            "peak_max_position_activation": float(maps[step].max()), "grid_h": int(maps.shape[1]),
            "grid_w": int(maps.shape[2]), "steps": int(maps.shape[0]),
            "mean_activation_by_step": [float(v) for v in maps.reshape(len(maps), -1).mean(axis=1)],
            "peak_image": relative_to_data_root(data_root, peak_path),
            "steps_image": relative_to_data_root(data_root, steps_path),
            "captured_image": gen.image_path, "mask_source": source, "fitted_shape": fitted_shape,
            "fit_rmse": fit_rmse, "heat_on_shape": share, "chance": chance, "ideal_detector": ideal,
        })
    np.savez_compressed(folder / "maps.npz", generation_ids=np.asarray([g for g, _ in ranks]),
                        maps=np.stack([recording.maps[rows_of[g], :, unit].numpy() for g, _ in ranks]).astype(np.float16),
                        timesteps=np.asarray(recording.timesteps))
    frame = pl.DataFrame(rows)
    _write_parquet_whole(frame, folder / CHANNEL_TABLE_FILE)
    return frame


def _write_parquet_whole(frame: pl.DataFrame, path: Path) -> None:
    """``frame`` to ``path`` through a temporary file beside it: readers (and ranks of a multi-rank job writing it
    at once) see the old file or the whole new one, never a half-written one."""
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    frame.write_parquet(temporary)
    os.replace(temporary, path)


def score_summary(table: pl.DataFrame, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The toy-world score of a heatmaps table (module docstring): per channel the mean ``share - chance`` over its
    scored examples; over channels the means, a bootstrap interval (channels resampled) and sign-flip p-values."""
    scored = (table.filter(pl.col("heat_on_shape").is_not_nan() & pl.col("chance").is_not_nan())
              if table.height and "heat_on_shape" in table.columns else pl.DataFrame())
    out: dict[str, Any] = {"examples": table.height, "scored_examples": scored.height,
                           "channels": int(table["channel"].n_unique()) if table.height else 0,
                           "unrecognisable_examples": int((table["mask_source"] == "unrecognisable").sum())
                           if table.height else 0}
    if scored.height == 0:
        return {**out, "scored_channels": 0, "heat_on_shape": None, "chance": None, "ideal_detector": None,
                "excess": None,
                "excess_interval": [None, None], "p_shape": None, "p_background": None}
    excess = (scored["heat_on_shape"] - scored["chance"]).to_list()
    per_channel = (scored.with_columns((pl.col("heat_on_shape") - pl.col("chance")).alias("excess"))
                   .group_by("channel").agg(pl.col("excess").mean()).sort("channel"))
    channel_excess = per_channel["excess"].to_list()
    low, high = cluster_bootstrap(excess, scored["channel"].to_list(), resamples=resamples, seed=seed)

    def number(value: float) -> float | None:
        return None if value is None or not math.isfinite(value) else round(float(value), 6)

    return {**out, "scored_channels": per_channel.height,
            "heat_on_shape": number(scored["heat_on_shape"].mean()), "chance": number(scored["chance"].mean()),
            "ideal_detector": number(scored["ideal_detector"].mean()) if "ideal_detector" in scored.columns else None,
            "excess": number(float(np.mean(excess))), "excess_interval": [number(low), number(high)],
            "p_shape": number(sign_flip_test(channel_excess)),
            "p_background": number(sign_flip_test([-v for v in channel_excess])),
            "channels_more_on_shape": int(sum(v > 0 for v in channel_excess)),
            "channels_more_on_background": int(sum(v < 0 for v in channel_excess))}


def _drawn_from(folder: Path) -> dict[str, Any] | None:
    """The ``inputs`` a channel folder's stamp records (``None``: no readable stamp, or one written before stamps
    recorded their inputs)."""
    try:
        found = json.loads((folder / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found.get("inputs") if isinstance(found, dict) else None


def write_union(out_dir: Path, inputs: dict[str, Any] | None = None) -> tuple[pl.DataFrame, dict[str, Any]]:
    """``heatmaps.parquet`` (every channel's table) and ``summary.json`` (its score) in ``out_dir``.

    With ``inputs`` (the run's upstream data versions and code version) only channels drawn from those inputs are
    in the union and its score: a channel another run drew from older statistics is left out and listed in the
    summary's ``stale_channels`` (re-run its block to draw it again), so the score never mixes input versions."""
    tables, stale = sorted(out_dir.glob(f"channel_*/{CHANNEL_TABLE_FILE}")), []
    if inputs is not None:
        current = []
        for path in tables:
            (current if _drawn_from(path.parent) == inputs else stale).append(path)
        tables = current
    parts = [pl.read_parquet(p) for p in tables]
    table = pl.concat(parts, how="diagonal_relaxed").sort(["channel", "rank"]) if parts else pl.DataFrame()
    if parts:  # ranks of a multi-rank job may write it at once: each whole, never a half-written file
        _write_parquet_whole(table, out_dir / TABLE_FILE)
    else:
        (out_dir / TABLE_FILE).unlink(missing_ok=True)
    summary = score_summary(table)
    summary["stale_channels"] = sorted(int(p.parent.name.split("_")[1]) for p in stale)
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return table, summary


def read_heatmaps(out_dir: Path) -> tuple[pl.DataFrame, dict[str, Any]] | None:
    """``(table, summary)`` of a heatmaps folder, or ``None`` when it has none."""
    table_path = out_dir / TABLE_FILE
    if not table_path.is_file():
        return None
    summary_path = out_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return pl.read_parquet(table_path), summary


def heatmaps_for_variant(project: Any, layout: Any, variant: str, channels: Sequence[int] | None,
                         config: HeatmapConfig, device: Any, log: LogFn | None = None,
                         inputs: dict[str, Any] | None = None) -> HeatmapsResult:
    """Heatmaps of ``channels`` of ``variant`` (``None``: all) into ``layout.stage_dir("heatmaps", variant)``;
    resumable per channel (module docstring): a channel already drawn from the same settings, ``inputs`` (the
    caller's upstream data versions and code version) and top examples is not regenerated.

    Raises:
        IndexError: a channel outside the variant's width (before anything loads).
        FileNotFoundError: no ``dataset_examples`` (materialize ``timestep_stats[<variant>]``) or no capture.
    """
    import time

    from ddr_core.regenerate import read_generations, regenerate_positions, top_example_generations
    from ddr_core.variant_inputs import load_variant_model, select_variant_channels

    started = time.perf_counter()
    log = log or (lambda message: None)
    selected = select_variant_channels(project, variant, channels)
    stats_dir = layout.timestep_stats_dir(variant)
    capture_root = layout.activations_dir(project.capture_of(variant))
    if not (stats_dir / "dataset_examples.parquet").is_file():
        raise FileNotFoundError(f"heatmaps regenerate each channel's top dataset examples, but "
                                f"{stats_dir / 'dataset_examples.parquet'} does not exist: materialize "
                                f"timestep_stats[{variant}] first")
    out_dir = layout.stage_dir(STAGE, variant)
    result = HeatmapsResult(out_dir=out_dir)
    tops = {c: top_example_generations(stats_dir, c, config.examples_per_channel) for c in selected.channels}
    result.channels_without_examples = [c for c, ids in tops.items() if not ids]
    ranked = _dataset_activations(stats_dir, tops) if any(tops.values()) else {}
    stamps = {c: channel_stamp(config, inputs, ranked[c]) for c in ranked}
    result.channels_resumed = [c for c in ranked if channel_is_finished(out_dir, c, stamps[c])]
    todo = [c for c in ranked if c not in result.channels_resumed]
    if result.channels_resumed:
        log(f"heatmaps of {variant}: {len(result.channels_resumed)} channel(s) already drawn from the same inputs "
            f"and settings: kept")
    if todo:
        model, basis = load_variant_model(project, layout, variant, out_dir, "heatmaps folder", device, config.dtype)
        ids = sorted({g for c in todo for g in tops[c]})
        generations = read_generations(capture_root, ids)
        log(f"heatmaps of {variant}: regenerating {len(ids)} generation(s) for {len(todo)} channel(s)")
        recording = regenerate_positions(model, generations, model.hook_point(selected.layer_name),
                                         basis_unit_maps(basis, todo), batch_size=config.batch_size)
        decoded = model.decode(recording.latents)
        images = {g: image.convert("RGB") for g, image in zip(ids, decoded, strict=True)}
        rows_of = {g: i for i, g in enumerate(ids)}
        fits: dict[int, SceneFit | None] = {}
        for g, gen in zip(ids, generations, strict=True):
            array = np.asarray(images[g])
            world = config.score_toy_world and is_world_prompt(gen.prompt) and array.shape[0] == array.shape[1]
            fits[g] = fit_scene_mask(array, gen.prompt) if world else None
        for position, channel in enumerate(todo):
            write_channel_heatmaps(out_dir, Path(layout.data_root), channel, position, recording, rows_of, images,
                                   fits, ranked[channel], config)
            atomic_write_json(channel_dir(out_dir, channel) / STAMP_FILE,
                              {"stamp": stamps[channel], "inputs": inputs or {}})
            result.channels_done.append(channel)
            result.examples += len(ranked[channel])
    table, result.summary = (write_union(out_dir, inputs or {}) if out_dir.is_dir()
                             else (pl.DataFrame(), score_summary(pl.DataFrame())))
    if result.summary.get("stale_channels"):
        log(f"heatmaps of {variant}: channel(s) {result.summary['stale_channels']} were drawn from other inputs "
            f"(older statistics or code) and are left out of the table and its score: re-run their blocks")
    result.table_path = out_dir / TABLE_FILE if table.height else None
    result.seconds = time.perf_counter() - started
    return result


def _dataset_activations(stats_dir: Path, tops: dict[int, list[int]]) -> dict[int, list[tuple[int, float]]]:
    """channel -> ``(generation id, its best dataset activation)`` in the order of ``tops``."""
    table = (pl.scan_parquet(stats_dir / "dataset_examples.parquet")
             .filter(pl.col("channel").is_in(list(tops)))
             .group_by(["channel", "generation_id"]).agg(pl.col("activation").max()).collect())
    best = {(int(c), int(g)): float(a) for c, g, a in table.iter_rows()}
    return {c: [(g, best.get((c, g), float("nan"))) for g in ids] for c, ids in tops.items() if ids}
