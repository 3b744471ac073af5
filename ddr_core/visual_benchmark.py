"""The visualisation benchmark: methods x variants x metrics on a world with ground truth (the toy world).

Does a visualisation method show what its channel stands for? For each method (``priors``: steered
generation, and its variants ``priors_self_top`` / ``priors_profile``; ``dreams``: latent optimisation with the schedule's noise; ``dreams_no_noise``,
``dreams_pre_activation``, ``dreams_example``, ``dreams_x0``, ``dreams_sampler``, ``dreams_maco``
(:data:`METHODS`) where they ran) and
variant, from what the stages wrote (no model is run here):

- ``agreement_selective``: over the (channel, family) pairs a channel is significantly selective for
  (``feature_concepts``: BH ``q < alpha``, labels permuted among prompts), the share of the method's images
  of that channel the concept classifier predicts as the channel's value. Chance: per image (the share of
  *all* the method's images of the variant predicted as that value); p: values permuted among channels
  within a family, each channel keeping its images (:func:`ddr_core.concept_stats.agreement_permutation_test`).
- ``recognisable``: share of the method's images within ``recognisable_rmse`` of a render of the world
  (the per-image RMSE ``feature_concepts`` saved); reference: the capture's own generations.
- ``gain_over_unsteered`` / ``raised_over_unsteered_share`` / ``channels_gaining`` (priors): each prior's
  activation of its channel minus the unsteered empty-prompt generation of the same seed (recorded by the priors
  stage, :mod:`ddr_core.prior_gain`); p: sign flips of the channels' mean gains; raised: the gain exceeds the
  unsteered activation's noise (the dreams' definition); channels gaining: k of n with a mean gain above 0.
- ``gain_over_start`` (dreams): dream activation minus the activation of the latent it started from (the
  prior, seeded noise or the dataset example), both re-measured by the dream stage's quality check; p: sign flips of the channels' mean gains.
  ``raised_share`` / ``no_op_dreams``: a dream is **raised** when its gain exceeds the noise of its start
  (``noise_sd_multiple`` x ``noise_sd``: the start activations' spread over the seeds and schedule-noise draws of
  the same channel and timestep; :func:`ddr_core.dream_verdict.with_raised`, the one definition). A dream that is not raised (e.g. every dream at t >= 959 of
  a zero-terminal-SNR schedule, whose gradient is 0) is counted as a no-op, never as a success, and its
  images are left out of the agreement, recognisability and diversity scores. ``gain_over_best_random`` /
  ``beats_best_random``: the dream's activation minus (above) the best of a few seeded random latents at its
  timestep (:mod:`ddr_core.random_baseline`, measured by the caller with the model; not measured without).
- ``seed_diversity`` / ``seed_disagreement``: per channel (and timestep), the mean pairwise pixel RMSE (0-1)
  of its images across seeds, and the share of image pairs whose predicted labels differ; reference: the
  RMSE between images of the *same seed* for two different channels (how much the channel, rather than the
  seed, sets the picture).
- ``coverage``: channels visualised of those that should be (the selective ones), each missing one listed
  with its reason in ``coverage.parquet``.
- ``agreement_selective_start`` / ``distance_to_start`` (dreams that started from dataset examples,
  ``start: example``, when the caller passes the capture's ``generation_images``): the agreement of the
  scored dreams' *start* images (the captured examples, classified the same way), i.e. what the dream
  inherits from its start, and the mean pixel RMSE (0-1) between each scored dream and its start image.

Intervals are 95% percentile bootstraps over **channels** (a channel's images and dreams stay together:
its seeds share a prompt-free start and its families share images). Outputs (``out_dir``, replaced as a
whole): ``benchmark.parquet`` (:data:`BENCHMARK_SCHEMA`), ``coverage.parquet``, ``images.parquet`` (the
per-image table scored), ``random_baseline.parquet`` (when measured), ``summary.json`` and ``contact_sheet.png`` (:mod:`ddr_core.contact_sheet`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from ddr_core.benchmark_stats import cluster_bootstrap, pairwise_rmse, sign_flip_test
from ddr_core.config import config_hash

FORMAT = "ddr.visual_benchmark/1"
BENCHMARK_FILE = "benchmark.parquet"
COVERAGE_FILE = "coverage.parquet"
IMAGES_FILE = "images.parquet"
RANDOM_BASELINE_FILE = "random_baseline.parquet"
SUMMARY_FILE = "summary.json"
CONTACT_SHEET_FILE = "contact_sheet.png"
NO_OP_TIMESTEP = 959  # at and above it the toy schedule's sqrt(alpha_bar) < 0.02: no gradient reaches the latent
LogFn = Callable[[str], None]
RandomBaseline = Callable[[list[tuple[int, int]], dict[str, Any], tuple[int, int]], pl.DataFrame]
Classify = Callable[[list[str], list[str]], pl.DataFrame]


@dataclass(frozen=True)
class Method:
    """A visualisation method: the stage folder it wrote, its record file, and the ``feature_concepts``
    predictions of its images (``None``: none saved)."""

    name: str
    stage: str
    kind: str  # "prior" | "dream"
    predictions: str | None


METHODS: tuple[Method, ...] = (
    Method("priors", "priors", "prior", "prior_predictions.parquet"),
    Method("dreams", "dreams", "dream", "dream_predictions.parquet"),
    Method("dreams_no_noise", "dreams_no_noise", "dream", None),
    Method("dreams_pre_activation", "dreams_pre_activation", "dream", None),
    Method("dreams_example", "dreams_example", "dream", None),
    Method("dreams_x0", "dreams_x0", "dream", None),
    Method("dreams_sampler", "dreams_sampler", "dream", None),
    Method("dreams_maco", "dreams_maco", "dream", None),
    Method("priors_self_top", "priors_self_top", "prior", None),
    Method("priors_profile", "priors_profile", "prior", None),
)
"""The methods scored where their stage folder exists. ``priors_self_top`` / ``priors_profile``: priors steered only
at the positions where the channel fires most (``steer_positions: self_top``) / with the strength shaped by the
activity profile (``strength_shape: activity_profile``), :mod:`ddr_core.priors` (``benchmarks/prior_steering.py``). ``dreams_pre_activation``: dreams maximising an SAE
feature's pre-activation (``objective: pre_activation``); ``dreams_example``: dreams started from the channel's
top dataset examples (``start: example``, feature accentuation). ``dreams_x0`` / ``dreams_sampler`` /
``dreams_maco``: the manifold parameterisations (``parameterisation: x0_prediction`` / ``sampler`` / ``maco``,
:mod:`ddr_core.dreams.parameterisations`). Their images are classified by the caller's
``classify`` (``feature_concepts`` scores only priors and dreams)."""

BENCHMARK_SCHEMA: dict[str, Any] = {
    "variant": pl.String, "method": pl.String, "metric": pl.String, "value": pl.Float64, "low": pl.Float64,
    "high": pl.Float64, "p_value": pl.Float64, "n": pl.Int64, "chance": pl.Float64, "null": pl.String,
    "note": pl.String, "settings": pl.String,
}
COVERAGE_SCHEMA: dict[str, Any] = {"variant": pl.String, "method": pl.String, "channel": pl.Int32,
                                   "concept": pl.String, "visualised": pl.Boolean, "reason": pl.String}


class VisualBenchmarkConfig(BaseModel):
    """Parameters of :func:`compute_visual_benchmark`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    permutations: int = Field(10000, ge=100, description="channel-label permutations / sign flips of the p-values")
    bootstrap_resamples: int = Field(2000, ge=100, description="channel resamples of the bootstrap intervals")
    level: float = Field(0.95, gt=0.0, lt=1.0, description="level of the bootstrap intervals")
    seed: int = Field(0, ge=0, description="seed of the permutations and resamples")
    noise_sd_multiple: float = Field(
        1.0, ge=0.0, description="a dream is raised when its gain over its start exceeds this many standard "
                                 "deviations of the start activation across seeds and schedule-noise draws (same "
                                 "channel and timestep; ddr_core.dream_verdict.with_raised)")
    random_latents: int = Field(
        8, ge=0, le=64, description="seeded random latents per dreamed (channel, timestep) for the best-random "
                                    "baseline (measured with the variant's model by the asset); 0: not measured")
    contact_rows: int = Field(16, ge=1, le=64, description="selective channels shown in the contact sheet")
    contact_columns: int = Field(4, ge=1, le=8, description="images per method and channel in the contact sheet")
    contact_cell: int = Field(64, ge=16, le=256, description="pixel side of an image in the contact sheet")

    def config_hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------------
# Reading what the stages wrote
# --------------------------------------------------------------------------------------------------


def _settings(record: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    if not record:
        return {}
    if kind == "prior":
        keys = ("num_inference_steps", "steer_strength_scale", "guidance_scale", "timesteps_mode", "strength_shape",
                "steer_positions", "position_fraction", "config_hash")
        return {k: record.get(k) for k in keys}
    config = record.get("config") or {}
    keys = ("num_steps", "learning_rate", "see_through_schedule_noise", "use_prior", "start", "objective",
            "parameterisation", "sampler_steps", "x0_projection_timestep", "maco_reference_samples",
            "timesteps", "n_results", "quality_noise_draws", "random_seed")
    return {**{k: config.get(k) for k in keys}, "config_hash": record.get("config_hash")}


def method_images(method: Method, stage_dir: Path, channels: Sequence[int]) -> tuple[pl.DataFrame, dict[int, str], dict]:
    """``(images, problems, settings)``: one row per image of ``channels`` (``channel, timestep, seed, image``;
    timestep null for priors), per channel without images the reason, and the method's settings (of the
    first finished channel)."""
    from ddr_core.channel_store import read_dream, read_prior
    from ddr_core.prior_gain import GAIN_COLUMNS, activation_rows

    rows: list[dict[str, Any]] = []
    problems: dict[int, str] = {}
    settings: dict[str, Any] = {}
    for channel in channels:
        record = (read_prior if method.kind == "prior" else read_dream)(stage_dir, channel)
        if record is None:
            problems[channel] = f"not run: no {method.stage} record (channel not in the run's channels)"
            continue
        settings = settings or _settings(record, method.kind)
        if method.kind == "prior":
            if record.get("status") != "done":
                problems[channel] = f"prior {record.get('status')}: {record.get('reason') or record.get('message')}"
                continue
            gains = activation_rows(channel, record)
            for seed, image, gain in zip(record.get("seeds") or [], record.get("images") or [], gains, strict=False):
                rows.append({"channel": channel, "timestep": None, "seed": int(seed), "image": str(image), **gain})
        else:
            results = record.get("results") or {}
            if not results:
                failures = record.get("failures") or []
                why = record.get("reason") or record.get("skipped") or f"{len(failures)} failure(s), no timestep"
                problems[channel] = f"no dream: {why}"
            for timestep, result in results.items():
                for seed, image in zip(result.get("seeds") or [], result.get("images") or [], strict=False):
                    rows.append({"channel": channel, "timestep": int(timestep), "seed": int(seed), "image": str(image)})
    schema = {"channel": pl.Int32, "timestep": pl.Int64, "seed": pl.Int64, "image": pl.String,
              **(GAIN_COLUMNS if method.kind == "prior" else {})}
    return pl.DataFrame(rows, schema=schema, orient="row"), problems, settings


def skipped_dream_timesteps(stage_dir: Path, channels: Sequence[int]) -> list[tuple[int, int]]:
    """``(channel, timestep)`` pairs the dream run skipped for lack of signal (``dream.json``'s
    ``skipped_timesteps``)."""
    from ddr_core.channel_store import read_dream

    return [(int(channel), int(item.get("timestep", -1))) for channel in channels
            for item in ((read_dream(stage_dir, channel) or {}).get("skipped_timesteps") or [])]


def mark_raised(images: pl.DataFrame, quality: pl.DataFrame | None, multiple: float) -> pl.DataFrame:
    """Dream images with ``start_activation, final_activation, gain, noise_sd, raised`` from the dream quality
    table: the verdict of :func:`ddr_core.dream_verdict.with_raised` (the one definition; ``noise_sd`` pools the
    start's spread over seeds and schedule-noise draws). A dream without a quality row is not raised."""
    from ddr_core.dream_verdict import with_raised

    if quality is None or quality.height == 0:
        return images.with_columns(pl.lit(None, pl.Float64).alias(c) for c in
                                   ("start_activation", "final_activation", "gain", "noise_sd")
                                   ).with_columns(pl.lit(False).alias("raised"))
    q = with_raised(quality, multiple).select(
        pl.col("channel").cast(pl.Int32), pl.col("timestep").cast(pl.Int64), pl.col("seed").cast(pl.Int64),
        pl.col("prior_activation").alias("start_activation"), pl.col("dream_activation").alias("final_activation"),
        "gain", "noise_sd", "raised")
    out = images.join(q, on=["channel", "timestep", "seed"], how="left", maintain_order="left")
    return out.with_columns(pl.col("raised").fill_null(False))


# --------------------------------------------------------------------------------------------------
# The metrics of one method
# --------------------------------------------------------------------------------------------------


def _row(metric: str, value: float | None, *, interval: tuple[float, float] = (math.nan, math.nan),
         p_value: float | None = None, n: int = 0, chance: float | None = None, null: str = "",
         note: str = "") -> dict[str, Any]:
    def clean(x: float | None) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    return {"metric": metric, "value": clean(value), "low": clean(interval[0]), "high": clean(interval[1]),
            "p_value": clean(p_value), "n": int(n), "chance": clean(chance), "null": null, "note": note}


def selective_units(table: pl.DataFrame, families: Sequence[str], alpha: float) -> list[tuple[int, str, str]]:
    """``(channel, family, value)`` of every (channel, family) pair of a ``feature_concepts`` table with
    ``q_<family> < alpha`` (the channel's dominant value of that family)."""
    units = []
    for row in table.iter_rows(named=True):
        for family in families:
            q = row.get(f"q_{family}")
            if q is not None and not math.isnan(q) and q < alpha and row.get(f"dominant_{family}") is not None:
                units.append((int(row["channel"]), family, str(row[f"dominant_{family}"])))
    return units


def agreement_rows(scored: pl.DataFrame, units: list[tuple[int, str, str]], families: Sequence[str],
                   config: VisualBenchmarkConfig) -> list[dict[str, Any]]:
    """``agreement_selective`` of the scored images (``channel`` + one predicted column per family)."""
    from ddr_core.concept_stats import agreement_permutation_test

    null = ("per-image chance: share of all the method's scored images predicted as the value; p: values "
            "permuted among channels within a family (channels keep their images)")
    if scored.height == 0 or not all(f in scored.columns for f in families):
        return [_row("agreement_selective", None, null=null, note="not measured: no classified images")]
    groups = {int(k[0]): g for k, g in scored.group_by("channel")}
    kept = [(c, f, v) for c, f, v in units if c in groups]
    if not kept:
        return [_row("agreement_selective", None, null=null, note="no selective channel has scored images")]
    predictions = [groups[c][f].to_list() for c, f, _ in kept]
    result = agreement_permutation_test(
        predictions, [v for _, _, v in kept], strata=[f for _, f, _ in kept],
        reference={f: scored[f].to_list() for f in families}, permutations=config.permutations, seed=config.seed)
    shares = [sum(p == v for p in pred) / len(pred) for pred, (_, _, v) in zip(predictions, kept, strict=True)]
    interval = cluster_bootstrap(shares, [c for c, _, _ in kept], level=config.level,
                                 resamples=config.bootstrap_resamples, seed=config.seed)
    return [_row("agreement_selective", result["rate"], interval=interval, p_value=result["p_value"],
                 n=len(kept), chance=result["chance_per_image"], null=null,
                 note=f"{len({c for c, _, _ in kept})} channel(s), {result['images']} image-family pairs; the smallest "
                      f"p these pairs allow: {result['p_floor']:.2g}")]


def recognisable_row(scored: pl.DataFrame, threshold: float, reference: float | None,
                     config: VisualBenchmarkConfig) -> dict[str, Any]:
    null = f"reference: the capture's generations ({'-' if reference is None else f'{reference:.3f}'})"
    if "world_rmse" not in scored.columns or scored["world_rmse"].is_null().all():
        return _row("recognisable", None, null=null, note="not measured: no world RMSE for these images")
    frame = scored.filter(pl.col("world_rmse").is_not_null())
    hits = (frame["world_rmse"] < threshold).cast(pl.Float64).to_list()
    interval = cluster_bootstrap(hits, frame["channel"].to_list(), level=config.level,
                                 resamples=config.bootstrap_resamples, seed=config.seed)
    return _row("recognisable", float(np.mean(hits)), interval=interval, n=len(hits), chance=reference, null=null,
                note=f"RMSE < {threshold:g} to the nearest render of the world")


def gain_rows(dreams: pl.DataFrame, config: VisualBenchmarkConfig,
              baseline: pl.DataFrame | None = None) -> list[dict[str, Any]]:
    """``gain_over_start``, ``raised_share``, ``no_op_dreams``, ``no_op_dreams_t959`` and, with a random-latent
    ``baseline`` (:mod:`ddr_core.random_baseline`), ``gain_over_best_random`` / ``beats_best_random``."""
    boot = {"level": config.level, "resamples": config.bootstrap_resamples, "seed": config.seed}
    measured = dreams.filter(pl.col("gain").is_not_null() & pl.col("gain").is_finite())
    rows = []
    if measured.height:
        gains, channels = measured["gain"].to_list(), measured["channel"].to_list()
        per_channel = measured.group_by("channel").agg(pl.col("gain").mean()).sort("channel")["gain"].to_list()
        rows.append(_row("gain_over_start", float(np.mean(gains)), interval=cluster_bootstrap(gains, channels, **boot),
                         p_value=sign_flip_test(per_channel, permutations=config.permutations, seed=config.seed),
                         n=len(gains), chance=0.0, null="0; p: signs of the channels' mean gains flipped",
                         note="dream activation minus its start's (the prior), quality re-measurement"))
    else:
        rows.append(_row("gain_over_start", None, note="not measured: no dream quality rows"))
    raised = dreams["raised"].cast(pl.Float64).to_list()
    noise = (f"gain > {config.noise_sd_multiple:g} x sd of the start activation over seeds and schedule-noise "
             f"draws (ddr_core.dream_verdict)")
    rows.append(_row("raised_share", float(np.mean(raised)) if raised else None, n=len(raised), null=noise,
                     interval=cluster_bootstrap(raised, dreams["channel"].to_list(), **boot),
                     note="dreams whose activation the optimiser raised above their start's noise"))
    no_op = dreams.filter(~pl.col("raised"))
    late = dreams.filter(pl.col("timestep") >= NO_OP_TIMESTEP)
    rows.append(_row("no_op_dreams", float(no_op.height), n=dreams.height, null=noise,
                     note="count (not a share): dreams not raised above their start's noise; not scored, not shown"))
    rows.append(_row("no_op_dreams_t959", float(late.filter(~pl.col("raised")).height), n=late.height, null=noise,
                     note=f"count of no-ops among the {late.height} dreams at t >= {NO_OP_TIMESTEP} "
                          f"(zero-terminal-SNR: no gradient)"))
    if baseline is None or baseline.height == 0:
        rows.append(_row("gain_over_best_random", None, n=0,
                         note="not measured: no random-latent baseline (random_latents = 0 or no model)"))
        return rows
    versus = (dreams.join(baseline.select("channel", "timestep", "best_random", "n_random"),
                          on=["channel", "timestep"], how="inner")
              .filter(pl.col("final_activation").is_not_null() & pl.col("best_random").is_not_null())
              .with_columns((pl.col("final_activation") - pl.col("best_random")).alias("over_random")))
    if versus.height == 0:
        rows.append(_row("gain_over_best_random", None, note="not measured: no dream has a baseline"))
        return rows
    over, channels = versus["over_random"].to_list(), versus["channel"].to_list()
    per_channel = versus.group_by("channel").agg(pl.col("over_random").mean()).sort("channel")["over_random"].to_list()
    drawn = f"best of {int(versus['n_random'].max())} seeded random latents at the dream's timestep"
    rows.append(_row("gain_over_best_random", float(np.mean(over)), interval=cluster_bootstrap(over, channels, **boot),
                     p_value=sign_flip_test(per_channel, permutations=config.permutations, seed=config.seed),
                     n=len(over), chance=0.0, null="0; p: signs of the channels' mean differences flipped",
                     note=f"dream activation minus the {drawn} (all dreams, no-ops included)"))
    beats = [float(v > 0) for v in over]
    rows.append(_row("beats_best_random", float(np.mean(beats)), interval=cluster_bootstrap(beats, channels, **boot),
                     n=len(beats), note=f"share of dreams above the {drawn}"))
    return rows


def diversity_rows(scored: pl.DataFrame, families: Sequence[str], loader: Callable[[str], np.ndarray],
                   config: VisualBenchmarkConfig) -> list[dict[str, Any]]:
    """``seed_diversity`` (pixels) and ``seed_disagreement`` (predicted labels) over a channel's seeds."""
    boot = {"level": config.level, "resamples": config.bootstrap_resamples, "seed": config.seed}
    keys = ["channel", "timestep"]
    pixel, labels, pixel_channels, label_channels = [], [], [], []
    images = {path: loader(path) for path in scored["image"].to_list()}
    for (channel, _), group in scored.group_by(keys, maintain_order=True):
        if group.height < 2:
            continue
        distances = pairwise_rmse([images[p] for p in group["image"].to_list()])
        pixel.append(float(np.mean(distances)))
        pixel_channels.append(channel)
        if all(f in group.columns for f in families):
            joint = ["|".join(str(v) for v in row) for row in group.select(families).iter_rows()]
            labels.append(float(np.mean([a != b for a, b in combinations(joint, 2)])))
            label_channels.append(channel)
    same_seed = []
    for (_, _), group in scored.group_by(["seed", "timestep"], maintain_order=True):
        if group.height >= 2:
            same_seed += pairwise_rmse([images[p] for p in group["image"].to_list()])
    reference = float(np.mean(same_seed)) if same_seed else None
    return [
        _row("seed_diversity", float(np.mean(pixel)) if pixel else None, n=len(pixel),
             interval=cluster_bootstrap(pixel, pixel_channels, **boot), chance=reference,
             null="reference: RMSE between the same seed's images of two channels",
             note="mean pairwise pixel RMSE (0-1) across a channel's seeds"),
        _row("seed_disagreement", float(np.mean(labels)) if labels else None, n=len(labels),
             interval=cluster_bootstrap(labels, label_channels, **boot),
             note="share of a channel's image pairs with different predicted labels (all families)"),
    ]


# --------------------------------------------------------------------------------------------------
# One variant
# --------------------------------------------------------------------------------------------------


def coverage_rows(variant: str, method: Method, expected: dict[int, str], images: pl.DataFrame,
                  problems: dict[int, str]) -> list[dict[str, Any]]:
    """Per channel that should be visualised (``expected``: channel -> concept): visualised or the reason not.
    A dream channel counts only with a raised dream."""
    rows = []
    for channel, concept in sorted(expected.items()):
        mine = images.filter(pl.col("channel") == channel)
        shown = mine.filter(pl.col("raised")) if "raised" in mine.columns else mine
        if channel in problems:
            reason = problems[channel]
        elif mine.height == 0:
            reason = "no images recorded"
        elif shown.height == 0:
            reason = f"every dream a no-op: {mine.height} dream(s), none raised above its start's noise"
        else:
            reason = ""
        rows.append({"variant": variant, "method": method.name, "channel": channel, "concept": concept,
                     "visualised": not reason, "reason": reason})
    return rows


@dataclass
class VisualBenchmarkResult:
    table: pl.DataFrame
    coverage: pl.DataFrame
    images: pl.DataFrame
    summary: dict[str, Any]
    out_dir: Path


def start_rows(scored: pl.DataFrame, generation_images: dict[int, str], units: list[tuple[int, str, str]],
               families: Sequence[str], classify: Classify | None, loader: Callable[[str], np.ndarray],
               config: VisualBenchmarkConfig) -> list[dict[str, Any]]:
    """``agreement_selective_start`` and ``distance_to_start`` of dreams started from dataset examples (their
    seed is the example's generation id; ``generation_images``: generation id -> its captured image)."""
    boot = {"level": config.level, "resamples": config.bootstrap_resamples, "seed": config.seed}
    pairs = scored.select("channel", "timestep", "seed", pl.col("image").alias("dream_image")).with_columns(
        pl.col("seed").replace_strict(generation_images, default=None, return_dtype=pl.String).alias("image"))
    pairs = pairs.drop_nulls("image")
    note = "the scored dreams' start images (their dataset examples): what a dream inherits from its start"
    if pairs.height == 0:
        return [_row("agreement_selective_start", None, note="not measured: no start image found")]
    rows = []
    if classify is not None:
        starts = pairs.join(classify(sorted(set(pairs["image"].to_list())), list(families)), on="image", how="left")
        rows += [{**r, "metric": "agreement_selective_start", "note": f"{r['note']}; {note}"}
                 for r in agreement_rows(starts.drop_nulls([f for f in families if f in starts.columns]),
                                         units, families, config)]
    else:
        rows.append(_row("agreement_selective_start", None, note="not measured: no classifier for the start images"))
    distances = [pairwise_rmse([loader(a), loader(b)])[0] if loader(a).shape == loader(b).shape else math.nan
                 for a, b in pairs.select("dream_image", "image").iter_rows()]
    kept = [(d, c) for d, c in zip(distances, pairs["channel"].to_list(), strict=True) if not math.isnan(d)]
    rows.append(_row("distance_to_start", float(np.mean([d for d, _ in kept])) if kept else None, n=len(kept),
                     interval=cluster_bootstrap([d for d, _ in kept], [c for _, c in kept], **boot),
                     note="mean pixel RMSE (0-1) between a scored dream and its start image"))
    return rows


def compute_visual_benchmark(
    variant: str, data_root: str | Path, feature_concepts_dir: str | Path, stage_dirs: dict[str, Path],
    out_dir: str | Path, config: VisualBenchmarkConfig | None = None, log: LogFn | None = None,
    random_baseline: RandomBaseline | None = None, classify: Classify | None = None,
    generation_images: dict[int, str] | None = None,
) -> VisualBenchmarkResult:
    """Score every method with outputs in ``stage_dirs`` (stage name -> its folder for ``variant``; a missing
    folder skips the method) against ``feature_concepts_dir``'s verdicts and write ``out_dir``.

    ``random_baseline(pairs, settings, image_size)``: the random-latent activations
    (:func:`ddr_core.random_baseline.random_latent_activations`) of a dream method's ``(channel, timestep)``
    pairs under its recorded settings; ``None``: ``gain_over_best_random`` is reported as not measured.
    ``classify(image paths, families)``: ``image`` + one predicted column per family (+ ``world_rmse``) for a
    method ``feature_concepts`` did not classify (``dreams_no_noise``); ``None``: its agreement and
    recognisability are reported as not measured. ``generation_images``: generation id -> data-root relative
    image of the variant's capture (the start images of ``start: example`` dreams); ``None``: their
    ``agreement_selective_start`` / ``distance_to_start`` are not reported.

    Raises:
        FileNotFoundError: ``feature_concepts_dir`` holds no finished scores (names what to materialize).
    """
    from ddr_core.atomic import atomic_dir, atomic_write_json
    from ddr_core.contact_sheet import write_contact_sheet
    from ddr_core.feature_concepts import load_images, read_feature_concepts
    from ddr_core.prior_gain import prior_gain_rows, with_prior_gain

    config = config or VisualBenchmarkConfig()
    say = log or (lambda _message: None)
    found = read_feature_concepts(feature_concepts_dir)
    if found is None:
        raise FileNotFoundError(f"no feature_concepts scores in {feature_concepts_dir}: materialize "
                                f"feature_concepts[{variant}] first")
    table, fc_summary = found
    families = list(fc_summary["families"])
    alpha = float(fc_summary["config"]["alpha"])
    threshold = float(fc_summary["config"].get("recognisable_rmse", 0.15))
    reference = ((fc_summary.get("world") or {}).get("generations") or {}).get("recognisable")
    units = selective_units(table, families, alpha)
    expected = {int(r["channel"]): r["concept"] for r in table.filter(pl.col("n_concepts") > 0).iter_rows(named=True)}
    cache: dict[str, np.ndarray] = {}

    def loader(path: str) -> np.ndarray:
        if path not in cache:
            cache[path] = load_images(data_root, [path])[0]
        return cache[path]

    rows, coverage, all_images, baselines, settings_of = [], [], [], [], {}
    for method in METHODS:
        stage_dir = stage_dirs.get(method.stage)
        if stage_dir is None or not Path(stage_dir).is_dir():
            continue
        channels = sorted(int(c) for c in table["channel"].to_list())
        images, problems, settings = method_images(method, Path(stage_dir), channels)
        if images.height == 0:
            continue
        settings_of[method.name] = settings
        if method.kind == "dream":
            quality_path = Path(stage_dir) / "quality.parquet"
            images = mark_raised(images, pl.read_parquet(quality_path) if quality_path.is_file() else None,
                                 config.noise_sd_multiple)
        else:
            images = with_prior_gain(images, config.noise_sd_multiple)
        predictions_path = Path(feature_concepts_dir) / method.predictions if method.predictions else None
        if predictions_path is not None and predictions_path.is_file():
            images = images.join(pl.read_parquet(predictions_path).drop("channel"), on="image", how="left")
        elif classify is not None:
            images = images.join(classify(images["image"].to_list(), families), on="image", how="left")
        scored = images.filter(pl.col("raised")) if method.kind == "dream" else images
        classified = scored.drop_nulls([f for f in families if f in scored.columns]) if all(
            f in scored.columns for f in families) else scored.head(0)
        method_rows = agreement_rows(classified, units, families, config)
        if method.kind == "dream":  # today's figure: every image shown, the no-ops included
            every = images.drop_nulls([f for f in families if f in images.columns]) if all(
                f in images.columns for f in families) else images.head(0)
            method_rows += [{**r, "metric": "agreement_selective_all_images",
                             "note": r["note"] + "; no-op dreams included"}
                            for r in agreement_rows(every, units, families, config)]
        method_rows.append(recognisable_row(scored, threshold, reference, config))
        if method.kind == "dream" and settings.get("start") == "example" and generation_images is not None:
            method_rows += start_rows(scored, generation_images, units, families, classify, loader, config)
        if method.kind == "dream":
            skipped = skipped_dream_timesteps(Path(stage_dir), channels)
            method_rows.append(_row("skipped_timesteps", float(len(skipped)),
                                    n=len(skipped) + images.select("channel", "timestep").n_unique(),
                                    note="count of (channel, timestep) pairs not dreamed: signal fraction below "
                                         "min_signal (DreamConfig), the objective's gradient ~0 there"))
            baseline = None
            if random_baseline is not None:
                size = loader(images["image"][0]).shape[:2]
                pairs = sorted(set(images.select("channel", "timestep").iter_rows()))
                baseline = random_baseline(pairs, settings, (int(size[0]), int(size[1])))
                baselines.append(baseline.with_columns(pl.lit(method.name).alias("method")))
            method_rows += gain_rows(images, config, baseline)
        if method.kind == "prior":
            method_rows += prior_gain_rows(images, config)
        method_rows += diversity_rows(scored, families, loader, config)
        cover = coverage_rows(variant, method, expected, images, problems)
        shown = sum(r["visualised"] for r in cover)
        reasons: dict[str, int] = {}
        for r in cover:
            if r["reason"]:
                key = r["reason"].split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
        method_rows.append(_row("coverage", shown / len(cover) if cover else None, n=len(cover),
                                null="channels with a concept verdict (BH q < alpha)",
                                note="; ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "all visualised"))
        text = json.dumps(settings, sort_keys=True, default=str)
        rows += [{"variant": variant, "method": method.name, **r, "settings": text} for r in method_rows]
        coverage += cover
        all_images.append(images.with_columns(pl.lit(method.name).alias("method")))
        say(f"visual benchmark {variant}: {method.name} scored ({images.height} image(s), "
            f"{shown} of {len(cover)} selective channel(s) visualised)")
    benchmark = pl.DataFrame(rows, schema=BENCHMARK_SCHEMA, orient="row") if rows else pl.DataFrame(
        schema=BENCHMARK_SCHEMA)
    coverage_frame = pl.DataFrame(coverage, schema=COVERAGE_SCHEMA, orient="row")
    images_frame = pl.concat(all_images, how="diagonal_relaxed") if all_images else pl.DataFrame()
    summary = {"format": FORMAT, "variant": variant, "config": config.model_dump(mode="json"),
               "config_hash": config.config_hash(), "families": families, "alpha": alpha,
               "selective_channels": len(expected), "methods": sorted(settings_of), "settings": settings_of,
               "feature_concepts_config_hash": fc_summary.get("config_hash")}
    out = Path(out_dir)
    with atomic_dir(out) as staging:
        benchmark.write_parquet(staging / BENCHMARK_FILE)
        coverage_frame.write_parquet(staging / COVERAGE_FILE)
        images_frame.write_parquet(staging / IMAGES_FILE)
        if baselines:
            pl.concat(baselines).write_parquet(staging / RANDOM_BASELINE_FILE)
        write_contact_sheet(staging / CONTACT_SHEET_FILE, data_root, table, images_frame, families,
                            rows=config.contact_rows, columns=config.contact_columns, cell=config.contact_cell,
                            title=f"{variant}: selective channels x methods",
                            method_order=[m.name for m in METHODS])
        atomic_write_json(staging / SUMMARY_FILE, summary)
    return VisualBenchmarkResult(benchmark, coverage_frame, images_frame, summary, out)


def read_visual_benchmark(out_dir: str | Path) -> tuple[pl.DataFrame, dict[str, Any]] | None:
    """``(benchmark table, summary)`` of a finished output folder, or ``None``."""
    out = Path(out_dir)
    if not (out / SUMMARY_FILE).is_file() or not (out / BENCHMARK_FILE).is_file():
        return None
    return pl.read_parquet(out / BENCHMARK_FILE), json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))


def benchmark_rows(table: pl.DataFrame) -> list[dict[str, Any]]:
    """The table as display rows (value, ``[low, high]``, p, n, chance), for Markdown and the demo."""
    rows = []
    for r in table.iter_rows(named=True):
        interval = None if r["low"] is None else f"[{r['low']:.3f}, {r['high']:.3f}]"
        rows.append({"variant": r["variant"], "method": r["method"], "metric": r["metric"], "value": r["value"],
                     "95% interval": interval, "p": r["p_value"], "n": r["n"], "chance / reference": r["chance"],
                     "note": r["note"]})
    return rows


def benchmark_lines(table: pl.DataFrame) -> list[str]:
    """One line per (variant, method): the figures a reader needs, unflattering ones included."""
    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def p(value: float | None) -> str:
        return "-" if value is None else (f"{value:.1g}" if value < 0.01 else f"{value:.2f}")

    lines = []
    for (variant, method), group in table.group_by(["variant", "method"], maintain_order=True):
        m = {r["metric"]: r for r in group.iter_rows(named=True)}
        parts = []
        if "agreement_selective" in m:
            r = m["agreement_selective"]
            parts.append(f"agreement {fmt(r['value'])} [{fmt(r['low'])}, {fmt(r['high'])}] vs chance "
                         f"{fmt(r['chance'])} (p {p(r['p_value'])}, {r['n']} pairs)")
        if (m.get("agreement_selective_start") or {}).get("value") is not None:
            r = m["agreement_selective_start"]
            parts.append(f"(its start images {fmt(r['value'])} [{fmt(r['low'])}, {fmt(r['high'])}]; dream-to-start "
                         f"RMSE {fmt((m.get('distance_to_start') or {}).get('value'), 3)})")
        if "recognisable" in m:
            parts.append(f"recognisable {fmt(m['recognisable']['value'])}")
        if "gain_over_start" in m and m["gain_over_start"]["value"] is not None:
            r = m["gain_over_start"]
            parts.append(f"gain {fmt(r['value'], 3)} [{fmt(r['low'], 3)}, {fmt(r['high'], 3)}] (p {p(r['p_value'])})")
        if (m.get("gain_over_unsteered") or {}).get("value") is not None:
            r, raised, gaining = m["gain_over_unsteered"], m.get("raised_over_unsteered_share") or {}, \
                m.get("channels_gaining") or {}
            parts.append(f"gain over unsteered {fmt(r['value'], 3)} [{fmt(r['low'], 3)}, {fmt(r['high'], 3)}] "
                         f"(p {p(r['p_value'])}), raised above its noise {fmt(raised.get('value'))}, channels gaining "
                         f"{int(gaining.get('value') or 0)} of {gaining.get('n', 0)}")
        if "no_op_dreams" in m:
            r, late = m["no_op_dreams"], m.get("no_op_dreams_t959") or {}
            parts.append(f"no-ops {int(r['value'])} of {r['n']} ({int(late.get('value') or 0)} of "
                         f"{late.get('n', 0)} at t>={NO_OP_TIMESTEP})")
        if (m.get("skipped_timesteps") or {}).get("value"):
            r = m["skipped_timesteps"]
            parts.append(f"{int(r['value'])} of {r['n']} (channel, timestep) pairs skipped: no signal")
        if (m.get("beats_best_random") or {}).get("value") is not None:
            r = m["beats_best_random"]
            parts.append(f"above the best random latent {fmt(r['value'])} [{fmt(r['low'])}, {fmt(r['high'])}]")
        if "seed_diversity" in m:
            r = m["seed_diversity"]
            parts.append(f"seed diversity {fmt(r['value'], 3)} (same seed, other channel {fmt(r['chance'], 3)})")
        if "coverage" in m:
            r = m["coverage"]
            shown = round((r["value"] or 0) * r["n"])
            parts.append(f"coverage {shown}/{r['n']}")
        lines.append(f"  {variant} {method}: " + "; ".join(parts))
    return lines
