"""Dose-response of steering: what a channel *causes*, by strength and by timestep window.

For each channel of a variant, empty-prompt generations from fixed seeds (the priors' generation,
:func:`ddr_core.priors.generate_priors`) on a **strength x timestep-window** grid:

- windows (:mod:`ddr_core.steering`): ``none`` (unsteered, once per seed), ``inside`` (the channel's activity
  window: train timesteps within ``window_half_width`` of its highest activity peak), ``outside`` (a window
  of the same width at the far end of the schedule, disjoint from it) and ``all`` (every timestep);
- strengths: a **constant** offset ``multiple x scale x max_activation(channel, peak)`` added along the
  channel's direction at every steered step (``scale``: the variant's priors ``steer_strength_scale``).
  Constant, not the priors' ``max_activation(t)`` profile, so that ``inside`` and ``outside`` push equally
  hard and differ only in *when*.

Per generation it records the channel's **re-measured activation**: the final latent, noised to the
channel's peak timestep with ``measure_draws`` seeded noise draws shared by every cell of the same (channel,
seed) (paired), forwarded to the layer (:func:`ddr_core.dreams.measure_activations`, the dream quality check's
measurement), reported also relative to ``max_activation(channel, peak)`` (``activation_rel``); and, when a
concept classifier and the channel's significant concepts (``feature_concepts``: BH ``q < alpha``) are given,
the classifier's probability of each of those concepts (``concept_prob``: their mean; ``concept_hit``: the
share of them predicted).

The causal test (:func:`dose_effects`): per strength, the paired differences ``inside - outside``,
``inside - none``, ``outside - none`` and ``all - none`` of ``concept_prob`` (channels with a concept) and of
``activation_rel`` (every channel), with a 95% percentile bootstrap resampling **whole channels** (a
channel's seeds and concepts stay together) and a one-sided sign-flip p-value over the channels' mean
differences (:mod:`ddr_core.benchmark_stats`).

On-disk format (``out_dir/channel_<c:05d>/``): ``<window>_x<multiple>_seed<seed>.png`` per cell,
``grid.parquet`` (:data:`GRID_SCHEMA`, one row per generation) and ``dose_response.json`` (written last: the
channel is finished iff it exists; its ``config_hash`` decides whether a rerun redoes it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ddr_core.lazy_imports import lazy_module
from ddr_core.steering import (
    DEFAULT_WINDOW_HALF_WIDTH,
    TimestepWindow,
    activity_window,
    outside_window,
    steering_schedule,
    top_peaks,
)

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

FORMAT = "ddr.dose_response/1"
GRID_FILE = "grid.parquet"
RECORD_FILE = "dose_response.json"
WINDOWS: tuple[str, ...] = ("none", "inside", "outside", "all")
CONTRASTS: tuple[tuple[str, str], ...] = (("inside", "outside"), ("inside", "none"), ("outside", "none"),
                                          ("all", "none"))
LogFn = Callable[[str], None]
Concepts = dict[int, list[tuple[str, str]]]

GRID_SCHEMA: dict[str, Any] = {
    "channel": pl.Int32, "window": pl.String, "window_low": pl.Int32, "window_high": pl.Int32,
    "multiple": pl.Float64, "strength": pl.Float64, "seed": pl.Int64, "steered_steps": pl.Int32,
    "peak": pl.Int32, "peak_max_activation": pl.Float64, "activation": pl.Float64, "activation_rel": pl.Float64,
    "concepts": pl.String, "concept_prob": pl.Float64, "concept_hit": pl.Float64, "image": pl.String,
}
EFFECT_SCHEMA: dict[str, Any] = {
    "metric": pl.String, "contrast": pl.String, "multiple": pl.Float64, "value": pl.Float64, "low": pl.Float64,
    "high": pl.Float64, "p_value": pl.Float64, "n_channels": pl.Int64, "n_pairs": pl.Int64,
    "channels_positive": pl.Int64,
}


class DoseResponseConfig(BaseModel):
    """Parameters of the dose-response grid (validated; errors name the field)."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field(default_factory=lambda: [1024, 1111, 4359, 3248],
                             description="fixed seeds; every cell of the grid is generated from each")
    strength_multiples: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0],
        description="the strength axis, in multiples of scale x max_activation(channel, peak)")
    steer_strength_scale: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="scale of one multiple; None: the variant's priors steer_strength_scale (its override, else "
                    "the basis default)")
    window_half_width: int = Field(DEFAULT_WINDOW_HALF_WIDTH, ge=0, le=249,
                                   description="train timesteps either side of the channel's top peak")
    num_inference_steps: int = Field(25, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=1024, description="generations per forward batch")
    measure_draws: int = Field(2, ge=1, le=16, description="noise draws of the re-measured activation")
    random_seed: int = Field(0, ge=0, description="seed of the re-measurement's noise draws")
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, >= 0 and at least one, got {seeds}")
        return seeds

    @field_validator("strength_multiples")
    @classmethod
    def _positive_multiples(cls, values: list[float]) -> list[float]:
        if not values or any(not math.isfinite(v) or v <= 0 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"strength_multiples must be distinct finite numbers > 0, got {values} (the "
                             "unsteered cell is always generated)")
        return sorted(values)


@dataclass
class DoseResponseResult:
    """What :func:`run_dose_response` did: channels done / resumed / skipped (channel -> reason), seconds, images."""

    out_dir: Path
    done: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0
    config_hash: str | None = None  # of this run's settings and inputs: what the pooled summary keeps

    def counts(self) -> dict[str, Any]:
        return {"done": len(self.done), "resumed": len(self.resumed), "skipped": len(self.skipped),
                "images": self.images, "seconds": round(self.seconds, 3)}


def channel_folder(out_dir: str | Path, channel: int) -> Path:
    return Path(out_dir) / f"channel_{int(channel):05d}"


def grid_cells(multiples: Sequence[float]) -> list[tuple[str, float]]:
    """``(window, multiple)`` of every cell: the unsteered one first, then each window at each multiple."""
    return [("none", 0.0)] + [(w, float(m)) for m in multiples for w in WINDOWS[1:]]


def cell_schedule(window: str, multiple: float, strength_unit: float, inside: TimestepWindow,
                  outside: TimestepWindow, num_train_timesteps: int) -> tuple[torch.Tensor, TimestepWindow | None]:
    """The ``(num_train_timesteps,)`` strength table of one cell (constant inside its window) and the window."""
    chosen = {"none": None, "inside": inside, "outside": outside,
              "all": TimestepWindow(0, num_train_timesteps - 1)}[window]
    table = torch.zeros(num_train_timesteps)
    if chosen is not None and multiple > 0:
        table[torch.from_numpy(chosen.mask(num_train_timesteps))] = float(multiple * strength_unit)
    return table, chosen


def concept_probabilities(classifier: Any, images: Sequence[np.ndarray],
                          concepts: Sequence[tuple[str, str]]) -> tuple[list[float | None], list[float | None]]:
    """Per image: the mean classifier probability of ``concepts`` ((family, value) pairs) and the share of
    them predicted (argmax). ``None`` without concepts or classifier."""
    if classifier is None or not concepts or not images:
        return [None] * len(images), [None] * len(images)
    from ddr_core.concept_classifier import predict_concept_probabilities

    heads = classifier.config.heads
    for family, value in concepts:
        if family not in heads or value not in heads[family]:
            raise ValueError(f"the concept classifier has no label {value!r} in head {family!r} "
                             f"(heads: {sorted(heads)}); it does not belong to this variant's world")
    probs = predict_concept_probabilities(classifier, np.stack([np.asarray(i) for i in images]))
    mean, hit = [], []
    for index in range(len(images)):
        values = [float(probs[f][index, list(heads[f]).index(v)]) for f, v in concepts]
        hits = [float(int(probs[f][index].argmax()) == list(heads[f]).index(v)) for f, v in concepts]
        mean.append(sum(values) / len(values))
        hit.append(sum(hits) / len(hits))
    return mean, hit


def run_dose_response(
    pipe: Any, basis: Any, layer_name: str, stats_dir: str | Path, channels: Sequence[int], out_dir: str | Path,
    config: DoseResponseConfig, data_root: str | Path, scale: float, *, concepts: Concepts | None = None,
    classifier: Any = None, log: LogFn | None = None, inputs: dict[str, Any] | None = None,
) -> DoseResponseResult:
    """Generate and measure the grid of ``channels`` into ``out_dir`` (see the module docstring); resumable per
    channel. ``scale``: one strength multiple (``config.steer_strength_scale`` wins when set). ``inputs``: what
    the grid is made from beyond the settings (the caller's upstream data versions and code version): part of the
    ``config_hash``, so a channel made from other statistics or concepts is redone, one made from the same is kept."""
    from ddr_core.atomic import atomic_path, atomic_write_json, remove_temp_files
    from ddr_core.basis import as_basis
    from ddr_core.config import config_hash
    from ddr_core.dreams import DreamObjective, element_generators, measure_activations
    from ddr_core.families import as_model
    from ddr_core.paths import check_output_folder, relative_to_data_root
    from ddr_core.priors import generate_priors
    from ddr_core.random_baseline import derived_seed
    from ddr_core.variant_inputs import check_channels

    start = time.monotonic()
    out_dir, data_root = Path(out_dir), Path(data_root).resolve()
    check_output_folder(out_dir, data_root, "dose_response folder")
    model = as_model(pipe)
    width = model.layer_width(layer_name)
    unit_basis = as_basis(basis, width)
    channels = check_channels(channels, unit_basis.width, f"layer {layer_name!r}")
    scale = float(config.steer_strength_scale or scale)
    height, width_px = config.height or model.default_size[0], config.width or model.default_size[1]
    num_train = model.num_train_timesteps
    timesteps = model.scheduler_timesteps(config.num_inference_steps, height, width_px)
    settings = {"format": FORMAT, "basis": unit_basis.kind, "layer": layer_name, "scale": scale,
                "height": height, "width": width_px, **config.model_dump(mode="json", exclude={"batch_size"}),
                "inputs": dict(inputs or {})}
    settings_hash = config_hash(settings)
    result = DoseResponseResult(out_dir=out_dir, config_hash=settings_hash)
    peaks = top_peaks(stats_dir, channels)
    todo = []
    for channel in channels:
        record_path = channel_folder(out_dir, channel) / RECORD_FILE
        if record_path.is_file() and json.loads(record_path.read_text())["config_hash"] == settings_hash:
            result.resumed.append(channel)
        elif channel not in peaks:
            result.skipped[channel] = "no activity peak in the timestep statistics"
        else:
            todo.append(channel)
    unit = steering_schedule(stats_dir, todo, "all_timesteps", 1.0, num_train) if todo else torch.zeros(0, num_train)
    cells = grid_cells(config.strength_multiples)
    seeds = list(config.seeds)
    directions = unit_basis.directions(todo) if todo else torch.zeros(0, width)
    for row, channel in enumerate(todo):
        peak = peaks[channel]
        peak_max = float(unit[row, peak])
        inside = activity_window(peak, num_train, config.window_half_width)
        outside = outside_window(inside, num_train)
        tables, windows = zip(*(cell_schedule(w, m, scale * peak_max, inside, outside, num_train)
                                for w, m in cells), strict=True)
        latents, images = generate_priors(
            model, layer_name, directions[row:row + 1].repeat(len(cells), 1), torch.stack(tables), seeds,
            num_inference_steps=config.num_inference_steps, batch_size=config.batch_size, height=height,
            width=width_px)
        flat = latents.reshape(len(cells) * len(seeds), *latents.shape[2:])
        draws = [element_generators([derived_seed(config.random_seed, channel, s, d) for _ in cells for s in seeds])
                 for d in range(config.measure_draws)]
        objective = DreamObjective(torch.full((flat.shape[0],), channel, dtype=torch.long), unit_basis)
        activation = measure_activations(model, model.hook_point(layer_name), objective, flat,
                                         [peak] * flat.shape[0], draws).tolist()
        arrays = [np.asarray(image) for row_images in images for image in row_images]
        mine = (concepts or {}).get(channel, [])
        probability, hit = concept_probabilities(classifier, arrays, mine)
        folder = channel_folder(out_dir, channel)
        folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(folder, recursive=False)
        (folder / RECORD_FILE).unlink(missing_ok=True)  # redone with other settings: unfinished until written
        for stale in folder.glob("*.png"):  # another grid's cells (other strengths / seeds)
            stale.unlink()
        rows = []
        for c, ((window, multiple), chosen, table) in enumerate(zip(cells, windows, tables, strict=True)):
            steered = sum(1 for t in timesteps if float(table[t]) != 0.0)
            for s, seed in enumerate(seeds):
                index = c * len(seeds) + s
                path = folder / f"{window}_x{multiple:g}_seed{seed}.png"
                with atomic_path(path) as tmp:
                    images[c][s].save(tmp, format="PNG")
                rows.append({
                    "channel": channel, "window": window, "window_low": chosen.low if chosen else None,
                    "window_high": chosen.high if chosen else None, "multiple": multiple,
                    "strength": multiple * scale * peak_max, "seed": seed, "steered_steps": steered, "peak": peak,
                    "peak_max_activation": peak_max, "activation": activation[index],
                    "activation_rel": activation[index] / peak_max if peak_max else None,
                    "concepts": "; ".join(f"{f}={v}" for f, v in mine) or None,
                    "concept_prob": probability[index], "concept_hit": hit[index],
                    "image": relative_to_data_root(data_root, path),
                })
        with atomic_path(folder / GRID_FILE) as tmp:
            pl.DataFrame(rows, schema=GRID_SCHEMA, orient="row").write_parquet(tmp)
        atomic_write_json(folder / RECORD_FILE, {**settings, "config_hash": settings_hash, "channel": channel,
                                                 "peak": peak, "inside": [inside.low, inside.high],
                                                 "outside": [outside.low, outside.high]})
        result.done.append(channel)
        result.images += len(rows)
        if log:
            log(f"dose_response: channel {channel} done ({len(rows)} generations)")
    result.seconds = time.monotonic() - start
    return result


def _record_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / RECORD_FILE).read_text()).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None


def read_grid(out_dir: str | Path, channels: Sequence[int] | None = None,
              config_hash: str | None = None) -> pl.DataFrame:
    """The finished channels' grids of ``out_dir`` (``channels``: only these; ``config_hash``: only channels made
    from these settings and inputs), one table."""
    folders = sorted(Path(out_dir).glob("channel_*")) if Path(out_dir).is_dir() else []
    wanted = None if channels is None else {int(c) for c in channels}
    frames = [pl.read_parquet(f / GRID_FILE) for f in folders
              if (f / RECORD_FILE).is_file() and (wanted is None or int(f.name.split("_")[1]) in wanted)
              and (config_hash is None or _record_hash(f) == config_hash)]
    return pl.concat(frames) if frames else pl.DataFrame(schema=GRID_SCHEMA)


def paired_differences(grid: pl.DataFrame, metric: str, a: str, b: str, multiple: float) -> pl.DataFrame:
    """``channel, seed, diff``: ``metric`` of window ``a`` minus window ``b`` (``none`` is the unsteered cell,
    whatever the multiple) for the same channel and seed, at ``multiple``."""
    def side(window: str) -> pl.DataFrame:
        rows = grid.filter(pl.col("window") == window)
        if window != "none":
            rows = rows.filter(pl.col("multiple") == multiple)
        return rows.select("channel", "seed", pl.col(metric).alias(window))

    if a == b:
        raise ValueError(f"a contrast needs two different windows, got {a!r} twice")
    joined = side(a).join(side(b), on=["channel", "seed"]).drop_nulls()
    return joined.select("channel", "seed", (pl.col(a) - pl.col(b)).alias("diff")).sort("channel", "seed")


def dose_effects(grid: pl.DataFrame, *, level: float = 0.95, resamples: int = 2000, permutations: int = 10000,
                 seed: int = 0) -> pl.DataFrame:
    """The causal test's effects (:data:`EFFECT_SCHEMA`): per metric (``concept_prob``, ``activation_rel``),
    contrast and multiple, the mean paired difference, its channel-cluster bootstrap interval and the
    one-sided sign-flip p-value over channel means (``mean > 0``)."""
    from ddr_core.benchmark_stats import cluster_bootstrap, sign_flip_test

    rows = []
    multiples = sorted({float(m) for m in grid.filter(pl.col("window") != "none")["multiple"].to_list()})
    for metric in ("concept_prob", "activation_rel"):
        if metric not in grid.columns or grid[metric].is_null().all():
            continue
        for a, b in CONTRASTS:
            for multiple in multiples:
                diffs = paired_differences(grid, metric, a, b, multiple)
                if diffs.height == 0:
                    continue
                means = diffs.group_by("channel").agg(pl.col("diff").mean()).sort("channel")["diff"].to_list()
                low, high = cluster_bootstrap(diffs["diff"].to_list(), diffs["channel"].to_list(), level=level,
                                              resamples=resamples, seed=seed)
                rows.append({"metric": metric, "contrast": f"{a}-{b}", "multiple": multiple,
                             "value": float(diffs["diff"].mean()), "low": low, "high": high,
                             "p_value": sign_flip_test(means, permutations=permutations, seed=seed),
                             "n_channels": len(means), "n_pairs": diffs.height,
                             "channels_positive": sum(1 for m in means if m > 0)})
    return pl.DataFrame(rows, schema=EFFECT_SCHEMA, orient="row")


def cell_means(grid: pl.DataFrame) -> pl.DataFrame:
    """Mean ``activation_rel``, ``concept_prob`` and ``concept_hit`` per (window, multiple) over channels and seeds:
    the dose-response curves."""
    if grid.height == 0:
        return pl.DataFrame()
    return (grid.group_by("window", "multiple")
            .agg(pl.col("activation_rel").mean(), pl.col("concept_prob").mean(), pl.col("concept_hit").mean(),
                 pl.col("steered_steps").mean(), pl.len().alias("n"))
            .with_columns(pl.col("window").replace_strict({w: i for i, w in enumerate(WINDOWS)},
                                                          return_dtype=pl.Int32).alias("_order"))
            .sort("multiple", "_order").drop("_order"))


def write_dose_sheet(path: str | Path, data_root: str | Path, grid: pl.DataFrame, *, channels: int = 8,
                     cell: int = 48, title: str = "") -> Path:
    """A contact sheet of the grid: one row per channel (with its concepts), per window a group of columns by
    strength, each image captioned with its ``concept_prob`` (or activation). Labels are plain text
    (:func:`ddr_core.contact_sheet.plain_label`)."""
    from PIL import Image, ImageDraw, ImageFont

    from ddr_core.contact_sheet import CHAR, LINE, plain_label
    from ddr_core.feature_concepts import load_images

    font = ImageFont.load_default()
    chosen = sorted({int(c) for c in grid["channel"].to_list()})[:channels] if grid.height else []
    cells = grid_cells(sorted({float(m) for m in grid.filter(pl.col("window") != "none")["multiple"].to_list()}))
    label_width = 120
    row_height = cell + 2 * LINE + 6
    width = label_width + len(cells) * (cell + 4)
    height = 3 * LINE + 8 + max(len(chosen), 1) * row_height
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max((cell + 2) // CHAR, 4)
    draw.text((4, 2), plain_label(title, width // CHAR), fill="black", font=font)
    for c, (window, multiple) in enumerate(cells):
        x = label_width + c * (cell + 4)
        draw.text((x, 2 + LINE), plain_label(window, chars), fill="black", font=font)
        draw.text((x, 2 + 2 * LINE), plain_label(f"x{multiple:g}" if multiple else "-", chars), fill="black",
                  font=font)
    if not chosen:
        draw.text((4, 3 * LINE + 8), "no channel has a finished dose-response grid", fill="black", font=font)
    for r, channel in enumerate(chosen):
        top = 3 * LINE + 8 + r * row_height
        mine = grid.filter(pl.col("channel") == channel).sort("seed")
        first_seed = mine["seed"][0]
        draw.text((4, top), f"channel {channel}", fill="black", font=font)
        draw.text((4, top + LINE), plain_label(mine["concepts"][0] or "no concept", label_width // CHAR - 1),
                  fill=(60, 60, 60), font=font)
        draw.text((4, top + 2 * LINE), f"peak t={mine['peak'][0]}", fill=(60, 60, 60), font=font)
        for c, (window, multiple) in enumerate(cells):
            entry = mine.filter((pl.col("window") == window) & (pl.col("multiple") == multiple)
                                & (pl.col("seed") == first_seed))
            if entry.height == 0:
                continue
            x = label_width + c * (cell + 4)
            array = load_images(data_root, [entry["image"][0]])[0]
            sheet.paste(Image.fromarray(np.asarray(array, dtype=np.uint8)).resize((cell, cell), Image.NEAREST),
                        (x, top))
            prob = entry["concept_prob"][0]
            caption = f"p={prob:.2f}" if prob is not None else f"a={entry['activation_rel'][0]:.2f}"
            draw.text((x, top + cell + 1), plain_label(caption, chars), fill="black", font=font)
    out = Path(path)
    sheet.save(out, format="PNG")
    return out


# --- the stage: one variant of the project configuration --------------------------------------------


def channel_concepts(feature_concepts_dir: str | Path) -> Concepts | None:
    """channel -> its significant ``(family, value)`` concepts (``q_<family> < alpha`` of ``feature_concepts``;
    channels without one are absent), or ``None`` when the folder holds no finished scores."""
    from ddr_core.feature_concepts import read_feature_concepts

    found = read_feature_concepts(feature_concepts_dir)
    if found is None:
        return None
    table, summary = found
    alpha = float(summary["config"]["alpha"])
    concepts: Concepts = {}
    for row in table.iter_rows(named=True):
        chosen = [(f, str(row[f"dominant_{f}"])) for f in summary["families"]
                  if row.get(f"q_{f}") is not None and row[f"q_{f}"] < alpha and row.get(f"dominant_{f}") is not None]
        if chosen:
            concepts[int(row["channel"])] = chosen
    return concepts


def variant_classifier(project: Any, layout: Any, variant: str) -> Any:
    """The concept classifier of the variant's model (:func:`ddr_core.concept_classifier.model_concept_classifier`),
    or ``None``."""
    from ddr_core.concept_classifier import model_concept_classifier

    return model_concept_classifier(project, layout, project.variants[variant].model)


def dose_response_for_variant(project: Any, layout: Any, variant: str, channels: Sequence[int] | None,
                              config: DoseResponseConfig, device: torch.device | str,
                              log: LogFn | None = None, inputs: dict[str, Any] | None = None) -> DoseResponseResult:
    """The grid of ``channels`` (``None``: all) of one variant of the project config, into
    ``layout.stage_dir("dose_response", variant)``. One strength multiple is the variant's priors
    ``steer_strength_scale`` (its ``overrides.priors``, else the basis default) unless the config sets one; the
    concepts come from ``feature_concepts[variant]`` when it is finished (none otherwise: activation only).
    ``inputs``: as :func:`run_dose_response` (channels made from the same are kept).

    Raises:
        FileNotFoundError: the variant's timestep statistics are missing (names what to materialize).
    """
    from ddr_core.basis import basis_class
    from ddr_core.feature_concepts import feature_concepts_dir
    from ddr_core.statistics import require_statistics
    from ddr_core.variant_inputs import load_variant_model, select_variant_channels

    variant_channels = select_variant_channels(project, variant, channels)
    stats_dir = layout.timestep_stats_dir(variant)
    require_statistics(stats_dir, variant)  # before loading a model
    spec = project.variants[variant]
    scale = (spec.overrides.get("priors", {}).get("steer_strength_scale")
             or basis_class(spec.basis).default_steer_scale)
    out_dir = layout.stage_dir("dose_response", variant)
    concepts = channel_concepts(feature_concepts_dir(layout, variant))
    classifier = variant_classifier(project, layout, variant) if concepts else None
    if log and concepts is None:
        log(f"dose_response {variant}: no feature_concepts scores: the concept probabilities are not measured")
    model, basis = load_variant_model(project, layout, variant, out_dir, "dose_response folder", device, config.dtype)
    result = run_dose_response(model, basis, variant_channels.layer_name, stats_dir, variant_channels.channels,
                               out_dir, config, layout.data_root, float(scale), concepts=concepts,
                               classifier=classifier, log=log, inputs=inputs)
    summarise_dose_response(out_dir, layout.data_root, variant, seed=config.random_seed,
                            config_hash=result.config_hash)
    return result


EFFECTS_FILE = "effects.parquet"
CELLS_FILE = "cells.parquet"
SUMMARY_FILE = "summary.json"
CONTACT_SHEET_FILE = "contact_sheet.png"


def summarise_dose_response(out_dir: str | Path, data_root: str | Path, variant: str, *, seed: int = 0,
                            config_hash: str | None = None) -> dict:
    """Pool every finished channel of ``out_dir`` (all blocks of the variant): write ``effects.parquet``
    (:func:`dose_effects`), ``cells.parquet`` (:func:`cell_means`), ``contact_sheet.png`` and ``summary.json``;
    return the summary. With ``config_hash`` (the run's settings and inputs) a channel another run made from other
    settings or older statistics is left out of the pool and listed in ``stale_channels``: the effects never mix
    grids of different inputs."""
    from ddr_core.atomic import atomic_path, atomic_write_json

    out = Path(out_dir)
    grid = read_grid(out, config_hash=config_hash)
    finished = {int(f.name.split("_")[1]) for f in out.glob("channel_*") if (f / RECORD_FILE).is_file()}
    effects = dose_effects(grid, seed=seed) if grid.height else pl.DataFrame(schema=EFFECT_SCHEMA)
    with atomic_path(out / EFFECTS_FILE) as tmp:
        effects.write_parquet(tmp)
    with atomic_path(out / CELLS_FILE) as tmp:
        cell_means(grid).write_parquet(tmp)
    with atomic_path(out / CONTACT_SHEET_FILE) as tmp:
        write_dose_sheet(tmp, data_root, grid, title=f"{variant}: steering dose-response x timestep window")
    channels = sorted({int(c) for c in grid["channel"].to_list()}) if grid.height else []
    with_concept = (sorted({int(c) for c in grid.filter(pl.col("concept_prob").is_not_null())["channel"].to_list()})
                    if grid.height else [])
    summary = {"format": FORMAT, "variant": variant, "channels": channels,
               "stale_channels": sorted(finished - set(channels)), "channels_with_concept": with_concept,
               "generations": grid.height,
               "effects": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                           for row in effects.to_dicts()]}
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def read_dose_response(out_dir: str | Path) -> tuple[pl.DataFrame, pl.DataFrame, dict] | None:
    """``(effects, cells, summary)`` of a summarised folder, or ``None``."""
    out = Path(out_dir)
    if not (out / SUMMARY_FILE).is_file() or not (out / EFFECTS_FILE).is_file():
        return None
    cells = pl.read_parquet(out / CELLS_FILE) if (out / CELLS_FILE).is_file() else pl.DataFrame()
    return pl.read_parquet(out / EFFECTS_FILE), cells, json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))


def effect_lines(effects: pl.DataFrame) -> list[dict[str, Any]]:
    """The effects as display rows (metric, contrast, strength, mean difference, 95% interval, p, channels up)."""
    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    return [{"metric": r["metric"], "contrast": r["contrast"], "strength": f"x{r['multiple']:g}",
             "difference": number(r["value"]), "interval": f"[{number(r['low'])}, {number(r['high'])}]",
             "p": number(r["p_value"], 4), "channels up": f"{r['channels_positive']}/{r['n_channels']}",
             "pairs": r["n_pairs"]} for r in effects.iter_rows(named=True)]
