"""Building one shard (and its interpolated curves) per channel of a variant: :func:`make_shards` in
memory, :func:`build_shards` on disk (atomic, claimed per channel).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ddr_core.atomic import atomic_path, atomic_write_json, remove_temporaries_of
from ddr_core.channel_store import channel_dir, channel_file, channel_name
from ddr_core.dream_verdict import VERDICT_SCHEMA, verdict_text, with_raised
from ddr_core.locks import claim_channels
from ddr_core.paths import DataLayout, check_output_folder
from ddr_core.prior_gain import prior_verdicts
from ddr_core.representation.files import DREAM_RUNS, DREAM_STAT_NAMES, SHARD_FORMAT, representation_dir
from ddr_core.representation.upstream import (
    _FileChecker,
    _finite,
    _group,
    _read_dream,
    _read_prior,
    _read_quality,
    _read_stats_summary,
    _relative_to_root,
    _stats_rows,
)
from ddr_core.statistics import interpolate_profile

LogFn = Callable[[str], None]
_STEP_IMAGE_RE = re.compile(r"^seed_(-?\d+)_step_(\d+)\.png$")


@dataclass
class ShardsSummary:
    """What :func:`build_shards` wrote."""

    variant: str
    out_dir: str
    channels: list[int] = field(default_factory=list)
    active_channels: list[int] = field(default_factory=list)
    with_priors: list[int] = field(default_factory=list)
    with_dreams: dict[str, list[int]] = field(default_factory=dict)
    errors: dict[int, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def n_errors(self) -> int:
        return sum(len(v) for v in self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = {str(k): v for k, v in self.errors.items()}
        data["n_errors"] = self.n_errors
        return data


@dataclass
class _VariantInputs:
    """The statistics rows of a set of channels, read once per :func:`build_shards` call."""

    summary: dict[str, Any]
    observed: np.ndarray  # (T,) denoising order
    total_timesteps: int
    channels: dict[int, dict[str, Any]]
    frequency: dict[int, pl.DataFrame]
    maxima: dict[int, pl.DataFrame]
    peaks: dict[int, pl.DataFrame]
    examples: dict[int, pl.DataFrame]
    quality: dict[str, dict[int, pl.DataFrame]]


def _variant_inputs(layout: DataLayout, variant: str, channels: Sequence[int]) -> _VariantInputs:
    summary = _read_stats_summary(layout, variant)
    stats_dir = layout.timestep_stats_dir(variant)
    width = int(summary["width"])
    bad = [c for c in channels if not 0 <= c < width]
    if bad:
        raise IndexError(f"channel(s) {bad[:10]} outside 0..{width - 1} of variant {variant!r}")
    channel_rows = _stats_rows(stats_dir, "channels", channels)
    quality: dict[str, dict[int, pl.DataFrame]] = {}
    for run in DREAM_RUNS:
        frame = _read_quality(layout, variant, run, channels)
        if frame is not None and frame.height:
            if not all(c in frame.columns for c in VERDICT_SCHEMA):  # a table written before the verdict
                frame = with_raised(frame)
        quality[run] = _group(frame) if frame is not None else {}
    return _VariantInputs(
        summary=summary,
        observed=np.asarray(summary["timesteps"], dtype=np.int64),
        total_timesteps=int(summary["config"]["total_timesteps"]),
        channels={int(r["channel"]): r for r in channel_rows.iter_rows(named=True)},
        frequency=_group(_stats_rows(stats_dir, "frequency", channels)),
        maxima=_group(_stats_rows(stats_dir, "max_activation", channels)),
        peaks=_group(_stats_rows(stats_dir, "activity_peaks", channels).sort("channel", "peak_rank")),
        examples=_group(
            _stats_rows(stats_dir, "dataset_examples", channels).sort(
                "channel", "timestep", "rank", descending=[False, True, False]
            )
        ),
        quality=quality,
    )


def _observed_curves(inputs: _VariantInputs, channel: int) -> tuple[np.ndarray, np.ndarray]:
    """``(frequency (T,), max_activation (T,))`` at ``inputs.observed`` (missing frequency = 0)."""
    frequency_rows = inputs.frequency.get(channel)
    by_t: dict[int, float] = {}
    if frequency_rows is not None:
        by_t = dict(zip(frequency_rows["timestep"].to_list(), frequency_rows["frequency"].to_list(), strict=True))
    frequency = np.array([by_t.get(int(t), 0.0) for t in inputs.observed], dtype=np.float64)
    max_rows = inputs.maxima.get(channel)
    max_by_t: dict[int, float] = {}
    if max_rows is not None:
        max_by_t = dict(zip(max_rows["timestep"].to_list(), max_rows["max_activation"].to_list(), strict=True))
    maxima = np.array([max_by_t.get(int(t), np.nan) for t in inputs.observed], dtype=np.float64)
    return frequency, maxima


def interpolated_curves(
    observed_timesteps: Sequence[int], frequency: Sequence[float], max_activation: Sequence[float],
    total_timesteps: int,
) -> pl.DataFrame:
    """Activity profile and maximum activation on ``0..total_timesteps-1`` (``np.interp``, edges held).

    Returns a frame with ``timestep`` (int32), ``activity`` and ``max_activation`` (float64), one row per
    timestep. Non-finite maxima are left out of the interpolation (all missing: zeros).
    """
    observed = np.asarray(observed_timesteps, dtype=np.int64)
    maxima = np.asarray(max_activation, dtype=np.float64)
    finite = np.isfinite(maxima)
    activity = interpolate_profile(observed, np.asarray(frequency, dtype=np.float64), total_timesteps)
    if finite.any():
        max_curve = interpolate_profile(observed[finite], maxima[finite], total_timesteps)
    else:
        max_curve = np.zeros(total_timesteps)
    return pl.DataFrame({
        "timestep": np.arange(total_timesteps, dtype=np.int32),
        "activity": activity,
        "max_activation": max_curve,
    })


def _dream_section(
    layout: DataLayout, variant: str, run: str, channel: int, checker: _FileChecker,
    quality: pl.DataFrame | None = None,
) -> dict[str, Any] | None:
    """A channel's dreams of one run. ``results`` holds only the **raised** dreams (the quality table's verdict,
    :func:`ddr_core.dreams.quality.with_raised`): an image whose activation the optimiser did not raise above
    its start's noise is not a picture of the channel. The others are in ``not_raised`` as numbers and a plain
    text ``verdict`` (no image), the timesteps not dreamed for lack of signal in ``skipped_timesteps``."""
    dream = _read_dream(layout, variant, run, channel)
    if dream is None:
        return None
    verdicts: dict[tuple[int, int], dict[str, Any]] = {}
    if quality is not None and quality.height:
        frame = quality if all(c in quality.columns for c in VERDICT_SCHEMA) else with_raised(quality)
        verdicts = {(int(r["timestep"]), int(r["seed"])): r for r in frame.iter_rows(named=True)}
    not_raised: list[dict[str, Any]] = []
    channel_folder = channel_dir(layout.stage_dir(DREAM_RUNS[run], variant), channel)
    failures = {(int(f["timestep"]), int(f["seed"])): f for f in dream.get("failures", [])}
    results: list[dict[str, Any]] = []
    for key, per_t in sorted(dream.get("results", {}).items(), key=lambda kv: -int(kv[0])):
        timestep = int(key)
        folder = channel_folder / f"t_{timestep:04d}"
        stats_file = folder / "stats.parquet"
        stats = pl.read_parquet(stats_file) if stats_file.is_file() else None
        stats_rel = checker.check(_relative_to_root(layout, stats_file), "dream statistics")
        snapshots: dict[int, list[tuple[int, str]]] = {}
        steps_folder = folder / "steps"
        if steps_folder.is_dir():
            for path in steps_folder.iterdir():
                match = _STEP_IMAGE_RE.match(path.name)
                if match:
                    snapshots.setdefault(int(match.group(1)), []).append(
                        (int(match.group(2)), _relative_to_root(layout, path))
                    )
        latents = checker.check(per_t.get("latents"), "dream latents")
        images = per_t.get("images", [])
        activations = per_t.get("final_activation", [])
        for position, seed in enumerate(per_t.get("seeds", [])):
            seed = int(seed)
            seed_stats = (
                stats.filter(pl.col("seed") == seed).sort("step") if stats is not None else pl.DataFrame()
            )

            def stats_at(step: int, seed_stats: pl.DataFrame = seed_stats) -> dict[str, float | None]:
                if seed_stats.height == 0:
                    return {}
                rows = seed_stats.filter(pl.col("step") <= step)
                row = (rows if rows.height else seed_stats).row(-1 if rows.height else 0, named=True)
                return {"stats_step": int(row["step"]),
                        **{name: _finite(row.get(name)) for name in DREAM_STAT_NAMES}}

            steps = [
                {"step": step, "image": checker.check(rel, "dream snapshot image"), **stats_at(step)}
                for step, rel in sorted(snapshots.get(seed, []))
            ]
            final_stats = stats_at(10**9)
            failure = failures.get((timestep, seed))
            verdict = verdicts.get((timestep, seed))
            if verdict is None or not verdict.get("raised"):
                text = ("failed: " + str(failure.get("reason")) if failure is not None else
                        verdict_text(verdict) if verdict is not None else
                        "not measured: no quality row (run the dream quality check)")
                not_raised.append({
                    "timestep": timestep, "seed": seed,
                    "start_activation": _finite(verdict.get("prior_activation")) if verdict else None,
                    "final_activation": _finite(verdict.get("dream_activation")) if verdict else None,
                    "gain": _finite(verdict.get("gain")) if verdict else None,
                    "noise_sd": _finite(verdict.get("noise_sd")) if verdict else None,
                    "failed": failure is not None,
                    "verdict": text,
                })
                continue
            results.append({
                "timestep": timestep,
                "seed": seed,
                "image": checker.check(images[position] if position < len(images) else None, "dream image"),
                "latents": latents,
                "stats": stats_rel,
                "final_activation": _finite(activations[position]) if position < len(activations) else None,
                "failed": failure is not None,
                "failure_reason": failure.get("reason") if failure else None,
                "final_stats": final_stats,
                "steps": steps,
                "start_activation": _finite(verdict.get("prior_activation")),
                "gain": _finite(verdict.get("gain")),
                "noise_sd": _finite(verdict.get("noise_sd")),
                "verdict": verdict_text(verdict),
            })
    return {
        "run": run,
        "skipped": dream.get("skipped"),
        "timesteps": [int(t) for t in dream.get("timesteps", [])],
        "seeds": [int(s) for s in dream.get("seeds", [])],
        "failures": list(failures.values()),
        "results": results,
        "not_raised": not_raised,
        "skipped_timesteps": [
            {"timestep": int(item.get("timestep", -1)), "signal": _finite(item.get("signal")),
             "reason": str(item.get("reason", ""))}
            for item in dream.get("skipped_timesteps") or []
        ],
    }


def _priors_section(layout: DataLayout, variant: str, channel: int, checker: _FileChecker) -> dict[str, Any] | None:
    prior = _read_prior(layout, variant, channel)
    if prior is None:
        return None
    seeds = [int(s) for s in prior.get("seeds", [])]
    images = prior.get("images") or []
    verdicts = prior_verdicts(prior)  # each prior against the unsteered generation of its seed (plain text)
    return {
        "status": prior.get("status"),
        "reason": prior.get("reason"),
        "message": prior.get("message"),
        "seeds": seeds,
        "images": [
            {"seed": seeds[i] if i < len(seeds) else None, "image": checker.check(rel, "prior image"),
             "verdict": verdicts[i] if i < len(verdicts) else None}
            for i, rel in enumerate(images)
        ],
        "latents": checker.check(prior.get("latents"), "prior latents"),
        "steered_timesteps": [int(t) for t in prior.get("steered_timesteps", [])],
        "strengths": [float(s) for s in prior.get("strengths", [])],
    }


def _make_shard(
    layout: DataLayout, variant: str, channel: int, inputs: _VariantInputs, strict: bool
) -> dict[str, Any]:
    checker = _FileChecker(layout.data_root, channel, strict)
    frequency, maxima = _observed_curves(inputs, channel)
    summary_row = inputs.channels.get(channel, {"channel": channel, "is_active": False})
    peaks = inputs.peaks.get(channel)
    peak_rows = []
    if peaks is not None:
        for row in peaks.iter_rows(named=True):
            peak_rows.append({
                "rank": int(row["peak_rank"]), "timestep": int(row["timestep"]), "height": float(row["height"]),
                "plateau_start": int(row["plateau_start"]), "plateau_end": int(row["plateau_end"]),
                "observed_timestep": int(row["observed_timestep"]),
            })
    examples = []
    example_rows = inputs.examples.get(channel)
    if example_rows is not None:
        for row in example_rows.iter_rows(named=True):
            examples.append({
                "timestep": int(row["timestep"]), "rank": int(row["rank"]),
                "generation_id": int(row["generation_id"]), "activation": _finite(row["activation"]),
                "prompt": row.get("prompt"),
                "image": checker.check(row.get("image_path"), "dataset example image"),
            })
    dreams = {run: _dream_section(layout, variant, run, channel, checker, inputs.quality.get(run, {}).get(channel))
              for run in DREAM_RUNS}
    quality = {
        run: [
            {k: (_finite(v) if isinstance(v, float) else v) for k, v in row.items() if k != "channel"}
            for row in frame.iter_rows(named=True)
        ]
        for run, groups in inputs.quality.items()
        if (frame := groups.get(channel)) is not None
    }
    visualised = sorted({r["timestep"] for d in dreams.values() if d for r in d["results"]}, reverse=True)
    with_data = sorted({e["timestep"] for e in examples} | set(visualised), reverse=True)
    return {
        "format": SHARD_FORMAT,
        "variant": variant,
        "experiment": layout.experiment,
        "channel": int(channel),
        "total_timesteps": inputs.total_timesteps,
        "observed_timesteps": [int(t) for t in inputs.observed],
        "summary": {k: (_finite(v) if isinstance(v, float) else v) for k, v in summary_row.items()},
        "observed": {
            "timestep": [int(t) for t in inputs.observed],
            "frequency": [float(v) for v in frequency],
            "max_activation": [_finite(v) for v in maxima],
        },
        "curves": None,
        "peaks": peak_rows,
        "examples": examples,
        "priors": _priors_section(layout, variant, channel, checker),
        "dreams": dreams,
        "quality": quality,
        "visualised_timesteps": visualised,
        "timesteps_with_data": with_data,
        "errors": checker.errors,
    }


def make_shards(
    layout: DataLayout, variant: str, channels: Iterable[int], strict: bool = False
) -> dict[int, dict[str, Any]]:
    """Shards of ``channels`` built in memory (nothing written; ``curves`` is ``None``).

    Raises:
        MissingStatsError: the variant's statistics are not finished.
        ShardFileError: with ``strict``, at the first referenced file that is missing or unsafe.
    """
    channels = sorted({int(c) for c in channels})
    inputs = _variant_inputs(layout, variant, channels)
    return {c: _make_shard(layout, variant, c, inputs, strict) for c in channels}


def build_shards(
    layout: DataLayout,
    variant: str,
    channels: Iterable[int] | None = None,
    out_dir: str | Path | None = None,
    strict: bool = False,
    log: LogFn | None = None,
    lock_wait: bool | float = False,
    lock_owner: str = "",
) -> ShardsSummary:
    """Write the shards (and curve tables) of ``channels`` of ``variant``, holding a claim on them.

    Args:
        layout: data root + experiment.
        variant: a variant with finished timestep statistics.
        channels: channel indices; ``None``: every channel of the variant.
        out_dir: where to write; defaults to ``layout.stage_dir("representation", variant)``. Must be
            below the data root (shards store paths relative to it).
        strict: raise :class:`ShardFileError` at the first missing/unsafe referenced file instead of
            recording it in the shard's ``errors``.
        log: progress callback.
        lock_wait: ``False`` (default): fail at once with :class:`~ddr_core.locks.ChannelsLockedError`
            when another live run holds some of the channels; seconds (or ``True``) to wait for them.
        lock_owner: who this run is, shown to a run that finds the channels held (e.g. a Dagster run id).

    Returns:
        A :class:`ShardsSummary`; ``errors`` maps channels to their missing/unsafe files.
    """
    if channels is None:
        channels = range(int(_read_stats_summary(layout, variant)["width"]))
    out = Path(out_dir) if out_dir is not None else representation_dir(layout, variant)
    check_output_folder(out, layout.data_root, "representation folder")  # below the data root, no link
    check_output_folder(out / "curves", None, "curves folder")
    (out / "curves").mkdir(parents=True, exist_ok=True)
    channels = [int(c) for c in channels]
    with claim_channels(out, channels, wait=lock_wait, owner=lock_owner or f"representation {variant}"):
        remove_temporaries_of(out, [f"{channel_name(c)}.json" for c in channels])
        remove_temporaries_of(out / "curves", [f"{channel_name(c)}.parquet" for c in channels])
        return _write_shards(layout, variant, channels, out, strict, log)


def _write_shards(layout: DataLayout, variant: str, channels: list[int], out: Path, strict: bool,
                  log: LogFn | None) -> ShardsSummary:
    shards = make_shards(layout, variant, channels, strict=strict)
    summary = ShardsSummary(variant=variant, out_dir=str(out), with_dreams={run: [] for run in DREAM_RUNS})
    for channel, shard in shards.items():
        curves = interpolated_curves(
            shard["observed"]["timestep"], shard["observed"]["frequency"],
            [np.nan if v is None else v for v in shard["observed"]["max_activation"]], shard["total_timesteps"],
        )
        curve_file = channel_file(out / "curves", channel, ".parquet")
        with atomic_path(curve_file) as tmp:
            curves.write_parquet(tmp, compression="zstd")
        shard["curves"] = layout.relative(curve_file)
        atomic_write_json(channel_file(out, channel, ".json"), shard, indent=None)
        summary.channels.append(channel)
        if shard["summary"].get("is_active"):
            summary.active_channels.append(channel)
        if shard["priors"] and shard["priors"]["status"] == "done":
            summary.with_priors.append(channel)
        for run, section in shard["dreams"].items():
            if section and section["results"]:
                summary.with_dreams[run].append(channel)
        if shard["errors"]:
            summary.errors[channel] = shard["errors"]
    if log:
        log(f"representation {variant}: {len(summary.channels)} shards, {len(summary.active_channels)} active, "
            f"{summary.n_errors} missing/unsafe files")
    return summary
