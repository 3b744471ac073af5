"""Representation: everything known about one channel gathered into one shard, plus a per-variant index.

The inspector (``ddr_core/inspector_app.py``) and the static HTML export (``ddr_core/html_export.py``)
read only what this module writes (or builds in memory the same way). For a variant it joins

- the timestep statistics (``layout.timestep_stats_dir(variant)``): per-channel summary, activity
  profile and maximum activation at the observed timesteps, activity peaks, dataset examples;
- the priors (``layout.stage_dir("priors", variant)/channel_<c:05d>/prior.json``), when present;
- the deep dreams of the ``"noise"`` run (``stage_dir("dreams", variant)``) and the optional
  ``"no_noise"`` run (``stage_dir("dreams_no_noise", variant)``): per (timestep, seed) the final image,
  the latents, the final statistics, the intermediate snapshots (``steps/seed_<s>_step_<n:04d>.png``)
  with the statistics at their step, and the run's ``quality.parquet`` rows; when present.

On disk (``layout.stage_dir("representation", variant)``), JSON and Parquet only, never pickle::

    channel_<c:05d>.json          one shard per channel (format :data:`SHARD_FORMAT`, fields below)
    curves/channel_<c:05d>.parquet  timestep (0..total_timesteps-1), activity, max_activation
    index.parquet                 one row per channel of the variant (:data:`INDEX_COLUMNS`)
    index.json                    summary: total / active channels, observed timesteps, counts

Shard fields: ``format, variant, experiment, channel, total_timesteps, observed_timesteps`` (denoising
order), ``summary`` (the ``channels.parquet`` row), ``observed`` (``timestep, frequency,
max_activation`` lists at the observed timesteps), ``curves`` (relative path of the interpolated
curves), ``peaks`` (``rank, timestep, height, plateau_start, plateau_end, observed_timestep``),
``examples`` (``timestep, rank, generation_id, activation, prompt, image``), ``priors`` (``None`` or
``status, reason, message, seeds, images [{seed, image}], latents, steered_timesteps, strengths``),
``dreams`` (run name -> ``None`` or ``skipped, timesteps, seeds, failures, results [{timestep, seed,
image, latents, stats, final_activation, failed, failure_reason, final_stats, steps [{step, image,
activation, tv, range, moment, loss}]}]``), ``quality`` (run name -> quality rows of the channel),
``visualised_timesteps`` (timesteps with dreams), ``timesteps_with_data`` (with examples or dreams,
descending) and ``errors`` (``[{file, what, problem}]``: referenced files that are missing or unsafe).

Concurrent runs and crashes: every file is written atomically (a reader sees the old or the new file,
never half of one). :func:`build_shards` claims its channels for the run
(:func:`ddr_core.locks.claim_channels`, lock files in ``.<representation dir>.locks/`` beside it): a second
run on any of them fails at once naming the first (or waits ``lock_wait`` seconds), runs on other
channels go on side by side, and a run deletes the temporaries a killed run left for its own channels.
:func:`build_index` writes the index under ``index.lock`` there (waiting for another run's index) and
deletes killed runs' index temporaries.

Every stored path is POSIX and relative to the data root. Readers go through
:func:`resolve_file`, i.e. :func:`ddr_core.paths.resolve_inside`: a crafted shard cannot make a reader
open a file outside the data root.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ddr_core.atomic import atomic_path, atomic_write_json, remove_temporaries_of
from ddr_core.channel_store import channel_dir, channel_file, channel_name, read_dream, read_prior
from ddr_core.locks import claim_channels, partition_lock, stage_locks_dir
from ddr_core.paths import DataLayout, UnsafePathError, check_output_folder, resolve_in_data_root, shown
from ddr_core.statistics import interpolate_profile, read_summary

LogFn = Callable[[str], None]

SHARD_FORMAT = "ddr.representation.shard/1"
INDEX_FORMAT = "ddr.representation.index/1"
REPRESENTATION_STAGE = "representation"
PRIORS_STAGE = "priors"
#: dream run name -> stage folder name
DREAM_RUNS: dict[str, str] = {"noise": "dreams", "no_noise": "dreams_no_noise"}
DREAM_STAT_NAMES: tuple[str, ...] = ("activation", "tv", "range", "moment", "loss")
TOP_PROMPTS_PER_CHANNEL = 5
_STEP_IMAGE_RE = re.compile(r"^seed_(-?\d+)_step_(\d+)\.png$")

INDEX_SCHEMA = pa.schema(
    [
        ("channel", pa.int32()),
        ("is_active", pa.bool_()),
        ("n_active_timesteps", pa.int32()),
        ("total_frequency", pa.float64()),
        ("max_frequency", pa.float64()),
        ("max_activation", pa.float64()),
        ("n_peaks", pa.int32()),
        ("peak_timesteps", pa.list_(pa.int32())),
        ("top_peak_timestep", pa.int32()),
        ("n_examples", pa.int32()),
        ("top_prompts", pa.list_(pa.string())),
        ("top_prompts_text", pa.string()),
        ("has_priors", pa.bool_()),
        ("has_dreams", pa.bool_()),
        ("has_dreams_no_noise", pa.bool_()),
        ("n_dreams", pa.int32()),
        ("n_failed_dreams", pa.int32()),
        ("dream_ratio_mean", pa.float64()),
        ("dream_ratio_max", pa.float64()),
        ("dream_activation_mean", pa.float64()),
        ("has_shard", pa.bool_()),
    ]
)
INDEX_COLUMNS: tuple[str, ...] = tuple(INDEX_SCHEMA.names)


class ShardFileError(FileNotFoundError):
    """A shard references a file that is missing, lies outside the data root or cannot be opened by name.

    ``problem``: ``"missing"``, ``"escapes the data root"`` or ``"unusable name"`` (a NUL byte or control
    character, a name too long for the file system, a non-string).
    """

    def __init__(self, message: str, problem: str = "missing") -> None:
        super().__init__(message)
        self.problem = problem


class BadShardError(ValueError):
    """A shard, curve table or index on disk that cannot be read or does not have the expected format; the
    message names the file, what is wrong and the fix (rebuild it)."""


class MissingStatsError(FileNotFoundError):
    """The variant's timestep statistics are not finished (no ``summary.json``)."""


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


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def representation_dir(layout: DataLayout, variant: str) -> Path:
    return layout.stage_dir(REPRESENTATION_STAGE, variant)


def shard_path(layout: DataLayout, variant: str, channel: int) -> Path:
    return channel_file(representation_dir(layout, variant), channel, ".json")


def curves_path(layout: DataLayout, variant: str, channel: int) -> Path:
    return channel_file(representation_dir(layout, variant) / "curves", channel, ".parquet")


def resolve_file(data_root: str | Path, relative: str | None, what: str = "file") -> Path:
    """The file ``relative`` (a path stored in a shard) under ``data_root``.

    Raises:
        ShardFileError: the path is empty, not a string, has a NUL byte or control character, escapes the
            data root (``..``, absolute, a link out), cannot be looked up (a name too long for the file
            system, ...) or the file does not exist; the message names the path (escaped, shortened).
    """
    if not relative:
        raise ShardFileError(f"{what}: no path given")
    if not isinstance(relative, str):
        raise ShardFileError(f"{what} {shown(relative, 200)} refused: not a path but a {type(relative).__name__}",
                             "unusable name")
    if any(ord(c) < 32 or ord(c) == 127 for c in relative):
        raise ShardFileError(f"{what} {shown(relative, 200)} refused: it contains a NUL byte or a control character",
                             "unusable name")
    try:
        path = resolve_in_data_root(data_root, relative)
        found = path.is_file()
    except UnsafePathError as error:
        raise ShardFileError(f"{what} {shown(relative, 200)} refused: it escapes the data root {data_root}",
                             "escapes the data root") from error
    except OSError as error:  # ENAMETOOLONG, ELOOP, EACCES on a folder on the way, ...
        raise ShardFileError(f"{what} {shown(relative, 200)} cannot be looked up: {error.strerror or error}",
                             "unusable name") from error
    if not found:
        raise ShardFileError(f"{what} {shown(relative, 200)} is missing (expected at {display_path(str(path))})")
    return path


def display_path(value: Any) -> str:
    """A path from the data for a page: as it is when printable and short, else escaped and shortened."""
    if isinstance(value, str) and value.isprintable() and len(value) <= 160:
        return value
    return shown(value)


def check_image(data: bytes) -> str | None:
    """``None`` when ``data`` is an image PIL can decode the header and checksums of, else the reason."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"not a readable image ({type(error).__name__}: {str(error)[:120]})"
    return None


def try_resolve_file(data_root: str | Path, relative: str | None) -> Path | None:
    """:func:`resolve_file`, or ``None`` instead of raising."""
    try:
        return resolve_file(data_root, relative)
    except ShardFileError:
        return None


def list_variants(layout: DataLayout) -> list[str]:
    """Variants of the experiment that have finished timestep statistics or a representation index."""
    found: set[str] = set()
    for stage, marker in (("timestep_stats", "summary.json"), (REPRESENTATION_STAGE, "index.json")):
        stage_root = layout.outputs_dir / stage
        if stage_root.is_dir():
            found.update(p.parent.name for p in stage_root.glob(f"*/{marker}"))
    return sorted(found)


# --------------------------------------------------------------------------------------------------
# Reading the upstream stages
# --------------------------------------------------------------------------------------------------


def _read_stats_summary(layout: DataLayout, variant: str) -> dict[str, Any]:
    stats_dir = layout.timestep_stats_dir(variant)
    try:
        return read_summary(stats_dir)
    except FileNotFoundError:
        raise MissingStatsError(
            f"the timestep statistics of variant {variant!r} are not finished ({stats_dir}/summary.json is "
            f"missing): materialize timestep_stats[{variant}] first"
        ) from None


def _stats_rows(stats_dir: Path, table: str, channels: Sequence[int]) -> pl.DataFrame:
    path = stats_dir / f"{table}.parquet"
    if not path.is_file():
        raise MissingStatsError(f"{path} is missing: rerun timestep_stats for this variant")
    return pl.scan_parquet(path).filter(pl.col("channel").is_in(list(channels))).collect()


def _group(frame: pl.DataFrame) -> dict[int, pl.DataFrame]:
    if frame.height == 0:
        return {}
    return {int(key[0]): part for key, part in frame.group_by("channel", maintain_order=True)}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _read_prior(layout: DataLayout, variant: str, channel: int) -> dict[str, Any] | None:
    return read_prior(layout.stage_dir(PRIORS_STAGE, variant), channel)


def _read_dream(layout: DataLayout, variant: str, run: str, channel: int) -> dict[str, Any] | None:
    return read_dream(layout.stage_dir(DREAM_RUNS[run], variant), channel)


def _read_quality(layout: DataLayout, variant: str, run: str, channels: Sequence[int] | None) -> pl.DataFrame | None:
    path = layout.stage_dir(DREAM_RUNS[run], variant) / "quality.parquet"
    if not path.is_file():
        return None
    frame = pl.read_parquet(path)
    if channels is not None:
        frame = frame.filter(pl.col("channel").is_in(list(channels)))
    return frame


class _FileChecker:
    """Collects references to missing or unsafe files (or raises at the first one when ``strict``)."""

    def __init__(self, data_root: Path, channel: int, strict: bool) -> None:
        self.data_root, self.channel, self.strict = data_root, channel, strict
        self.errors: list[dict[str, str]] = []

    def check(self, relative: str | None, what: str) -> str | None:
        if relative is None:
            return None
        try:
            resolve_file(self.data_root, relative, what)
        except ShardFileError as error:
            if self.strict:
                raise ShardFileError(f"channel {self.channel}: {error}", error.problem) from error
            self.errors.append({"file": str(relative), "what": what, "problem": error.problem})
        return relative


def _relative_to_root(layout: DataLayout, path: Path) -> str:
    return layout.relative(path)


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


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
    layout: DataLayout, variant: str, run: str, channel: int, checker: _FileChecker
) -> dict[str, Any] | None:
    dream = _read_dream(layout, variant, run, channel)
    if dream is None:
        return None
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
            })
    return {
        "run": run,
        "skipped": dream.get("skipped"),
        "timesteps": [int(t) for t in dream.get("timesteps", [])],
        "seeds": [int(s) for s in dream.get("seeds", [])],
        "failures": list(failures.values()),
        "results": results,
    }


def _priors_section(layout: DataLayout, variant: str, channel: int, checker: _FileChecker) -> dict[str, Any] | None:
    prior = _read_prior(layout, variant, channel)
    if prior is None:
        return None
    seeds = [int(s) for s in prior.get("seeds", [])]
    images = prior.get("images") or []
    return {
        "status": prior.get("status"),
        "reason": prior.get("reason"),
        "message": prior.get("message"),
        "seeds": seeds,
        "images": [
            {"seed": seeds[i] if i < len(seeds) else None, "image": checker.check(rel, "prior image")}
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
    dreams = {run: _dream_section(layout, variant, run, channel, checker) for run in DREAM_RUNS}
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


class _Part(BaseModel):
    """A part of a shard: the fields the readers use, typed; other fields are kept as they are."""

    model_config = ConfigDict(extra="allow")


class _Peak(_Part):
    rank: int
    timestep: int
    height: float
    plateau_start: int | None = None
    plateau_end: int | None = None
    observed_timestep: int | None = None


class _Example(_Part):
    timestep: int
    rank: int
    generation_id: int | None = None
    activation: float | None = None
    prompt: str | None = None
    image: str | None = None


class _Stats(_Part):
    stats_step: int | None = None
    activation: float | None = None
    tv: float | None = None
    range: float | None = None
    moment: float | None = None
    loss: float | None = None


class _Step(_Stats):
    step: int
    image: str | None = None


class _DreamResult(_Part):
    timestep: int
    seed: int
    image: str | None = None
    latents: str | None = None
    stats: str | None = None
    final_activation: float | None = None
    failed: bool = False
    failure_reason: str | None = None
    final_stats: _Stats = Field(default_factory=_Stats)
    steps: list[_Step] = Field(default_factory=list)


class _DreamSection(_Part):
    results: list[_DreamResult] = Field(default_factory=list)
    timesteps: list[int] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    failures: list[dict[str, Any]] = Field(default_factory=list)


class _PriorImage(_Part):
    seed: int | None = None
    image: str | None = None


class _Priors(_Part):
    status: str | None = None
    reason: str | None = None
    message: str | None = None
    seeds: list[int] = Field(default_factory=list)
    images: list[_PriorImage] = Field(default_factory=list)
    latents: str | None = None
    steered_timesteps: list[int] = Field(default_factory=list)
    strengths: list[float] = Field(default_factory=list)


class _Observed(_Part):
    timestep: list[int]
    frequency: list[float]
    max_activation: list[float | None]

    @model_validator(mode="after")
    def _same_lengths(self) -> _Observed:
        if not len(self.timestep) == len(self.frequency) == len(self.max_activation):
            raise ValueError(f"timestep, frequency and max_activation have {len(self.timestep)}, "
                             f"{len(self.frequency)} and {len(self.max_activation)} entries (must be equal)")
        return self


class _Summary(_Part):
    is_active: bool | None = None
    total_frequency: float | None = None
    n_active_timesteps: int | None = None
    max_activation: float | None = None


class _QualityRow(_Part):
    timestep: int
    seed: int
    ratio: float | None = None


class _FileProblem(_Part):
    file: str
    what: str
    problem: str


class _Shard(_Part):
    """What :func:`_make_shard` writes (the module docstring lists the fields)."""

    format: str
    channel: int
    total_timesteps: int = Field(ge=1)
    observed_timesteps: list[int] = Field(default_factory=list)
    summary: _Summary = Field(default_factory=_Summary)
    observed: _Observed
    curves: str | None = None
    peaks: list[_Peak] = Field(default_factory=list)
    examples: list[_Example] = Field(default_factory=list)
    priors: _Priors | None = None
    dreams: dict[str, _DreamSection | None] = Field(default_factory=dict)
    quality: dict[str, list[_QualityRow]] = Field(default_factory=dict)
    visualised_timesteps: list[int] = Field(default_factory=list)
    timesteps_with_data: list[int] = Field(default_factory=list)
    errors: list[_FileProblem] = Field(default_factory=list)


def _validation_text(error: ValidationError, limit: int = 3) -> str:
    parts = []
    for item in error.errors()[:limit]:
        where = ".".join(str(part) for part in item["loc"]) or "the shard"
        parts.append(f"{where}: {item['msg']} (found {shown(item.get('input'))})")
    more = error.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def check_shard(shard: Any, source: str = "shard", channel: int | None = None) -> dict[str, Any]:
    """``shard`` checked against the shard format and with its fields typed (numbers as numbers, lists as
    lists), so that a reader can use it without further checks.

    Raises:
        BadShardError: (a ``ValueError``) the format marker, a field's type or the channel (when given) is
            wrong; the message names ``source`` (e.g. the file), the first wrong fields and the fix.
    """
    fix = "rebuild it with build_shards (`ddr build-shards` or materialize representation_shards)"
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
        found = shard.get("format") if isinstance(shard, dict) else type(shard).__name__
        raise BadShardError(f"{source} is not a representation shard of format {SHARD_FORMAT!r} (found "
                            f"{shown(found)}): {fix}")
    try:
        checked = _Shard.model_validate(shard).model_dump()
    except ValidationError as error:
        raise BadShardError(f"{source} has fields of the wrong type: {_validation_text(error)}; {fix}") from None
    if channel is not None and checked["channel"] != int(channel):
        raise BadShardError(f"{source} holds channel {checked['channel']}, not channel {int(channel)}: {fix}")
    return checked


def load_shard(layout: DataLayout, variant: str, channel: int, build_if_missing: bool = True) -> dict[str, Any]:
    """The shard of ``channel``: read from disk (checked with :func:`check_shard`), else
    (``build_if_missing``) built in memory.

    Raises:
        BadShardError: the file cannot be read, is not UTF-8 JSON, or is not a shard of ``channel`` (names
            the file, the reason and the fix).
    """
    path = shard_path(layout, variant, channel)
    if path.is_file():
        try:
            shard = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            reason = "is not valid JSON (truncated?)" if isinstance(error, json.JSONDecodeError) else \
                "is not UTF-8" if isinstance(error, UnicodeDecodeError) else "cannot be read"
            raise BadShardError(f"shard {path} {reason}: {error}; rebuild it with build_shards (`ddr build-shards` "
                                "or materialize representation_shards)") from None
        return check_shard(shard, f"shard {path}", channel)
    if not build_if_missing:
        raise FileNotFoundError(f"{path} is missing: run build_shards (materialize representation_shards)")
    return make_shards(layout, variant, [channel])[int(channel)]


def observed_curves(shard: dict[str, Any]) -> pl.DataFrame:
    """The curves of a shard interpolated from its observed points (what a curve table holds)."""
    observed = shard["observed"]
    return interpolated_curves(
        observed["timestep"], observed["frequency"],
        [np.nan if v is None else v for v in observed["max_activation"]], int(shard["total_timesteps"]),
    )


def load_curves(layout: DataLayout, shard: dict[str, Any]) -> pl.DataFrame:
    """``timestep, activity, max_activation`` on ``0..total_timesteps-1`` for a shard.

    Reads the shard's curve table through :func:`resolve_file` when it has one; otherwise (shards
    built in memory) interpolates the observed points the same way.

    Raises:
        ShardFileError: the table's path is missing or refused.
        BadShardError: the table cannot be read (truncated, not Parquet) or lacks the columns / rows.
    """
    if not shard.get("curves"):
        return observed_curves(shard)
    path = resolve_file(layout.data_root, shard["curves"], "curve table")
    try:
        frame = pl.read_parquet(path, columns=["timestep", "activity", "max_activation"])
        frame = frame.cast({"timestep": pl.Int32, "activity": pl.Float64, "max_activation": pl.Float64})
    except Exception as error:  # polars / pyarrow / OS errors: all mean an unreadable table
        raise BadShardError(f"curve table {path} cannot be read ({type(error).__name__}: "
                            f"{str(error)[:200]}): rebuild the shards with build_shards") from None
    if frame.height != int(shard["total_timesteps"]):
        raise BadShardError(f"curve table {path} has {frame.height} rows, not one per timestep "
                            f"({shard['total_timesteps']}): rebuild the shards with build_shards")
    return frame


def curves_or_observed(layout: DataLayout, shard: dict[str, Any]) -> tuple[pl.DataFrame, str | None]:
    """:func:`load_curves`, or where the curve table is unusable the curves interpolated from the shard's
    observed points (the same numbers) and the reason, for a warning."""
    try:
        return load_curves(layout, shard), None
    except (ShardFileError, BadShardError) as error:
        return observed_curves(shard), f"{error} (the charts are drawn from the shard's observed points)"


# --------------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------------


def make_index_table(layout: DataLayout, variant: str) -> pl.DataFrame:
    """One row per channel of ``variant`` (columns :data:`INDEX_COLUMNS`), from the statistics, the
    priors / dreams folders and the quality tables; built in memory."""
    summary = _read_stats_summary(layout, variant)
    stats_dir = layout.timestep_stats_dir(variant)
    con = duckdb.connect()
    try:
        def table(name: str) -> str:
            path = stats_dir / f"{name}.parquet"
            if not path.is_file():
                raise MissingStatsError(f"{path} is missing: rerun timestep_stats for this variant")
            return "read_parquet('" + str(path).replace("'", "''") + "')"

        base = con.sql(f"""
            WITH peaks AS (
                SELECT channel, list(timestep ORDER BY peak_rank)::INTEGER[] AS peak_timesteps,
                       arg_min(timestep, peak_rank)::INTEGER AS top_peak_timestep
                FROM {table('activity_peaks')} GROUP BY channel
            ), examples AS (
                SELECT channel, count(*)::INTEGER AS n_examples FROM {table('dataset_examples')} GROUP BY channel
            ), prompts AS (
                SELECT channel, list(prompt ORDER BY best DESC, prompt)[1:{TOP_PROMPTS_PER_CHANNEL}] AS top_prompts
                FROM (SELECT channel, prompt, max(activation) AS best FROM {table('dataset_examples')}
                      WHERE prompt IS NOT NULL GROUP BY channel, prompt)
                GROUP BY channel
            )
            SELECT c.channel::INTEGER AS channel, c.is_active, c.n_active_timesteps::INTEGER AS n_active_timesteps,
                   c.total_frequency::DOUBLE AS total_frequency, c.max_frequency::DOUBLE AS max_frequency,
                   c.max_activation::DOUBLE AS max_activation, c.n_peaks::INTEGER AS n_peaks,
                   coalesce(p.peak_timesteps, []::INTEGER[]) AS peak_timesteps, p.top_peak_timestep,
                   coalesce(e.n_examples, 0)::INTEGER AS n_examples,
                   coalesce(t.top_prompts, []::VARCHAR[]) AS top_prompts,
                   array_to_string(coalesce(t.top_prompts, []::VARCHAR[]), ' | ') AS top_prompts_text
            FROM {table('channels')} c
            LEFT JOIN peaks p USING (channel) LEFT JOIN examples e USING (channel) LEFT JOIN prompts t USING (channel)
            ORDER BY c.channel
        """).pl()
    finally:
        con.close()
    channels = base["channel"].to_list()
    priors_root = layout.stage_dir(PRIORS_STAGE, variant)
    has_priors = []
    for c in channels:
        prior = read_prior(priors_root, c)
        has_priors.append(bool(prior and prior.get("status") == "done"))
    dream_flags: dict[str, list[bool]] = {}
    for run, stage in DREAM_RUNS.items():
        root = layout.stage_dir(stage, variant)
        flags = []
        for c in channels:
            dream = read_dream(root, c) if root.is_dir() else None
            flags.append(bool(dream and dream.get("results")))
        dream_flags[run] = flags
    quality = _read_quality(layout, variant, "noise", None)
    if quality is not None and quality.height:
        quality_summary = quality.group_by("channel").agg(
            pl.len().cast(pl.Int32).alias("n_dreams"),
            pl.col("failed").cast(pl.Int32).sum().cast(pl.Int32).alias("n_failed_dreams"),
            pl.col("ratio").filter(pl.col("ratio").is_finite()).mean().alias("dream_ratio_mean"),
            pl.col("ratio").filter(pl.col("ratio").is_finite()).max().alias("dream_ratio_max"),
            pl.col("dream_activation").filter(pl.col("dream_activation").is_finite()).mean()
            .alias("dream_activation_mean"),
        ).with_columns(pl.col("channel").cast(pl.Int32))
    else:
        quality_summary = pl.DataFrame(schema={
            "channel": pl.Int32, "n_dreams": pl.Int32, "n_failed_dreams": pl.Int32, "dream_ratio_mean": pl.Float64,
            "dream_ratio_max": pl.Float64, "dream_activation_mean": pl.Float64,
        })
    rep = representation_dir(layout, variant)
    frame = base.with_columns(
        pl.Series("has_priors", has_priors, dtype=pl.Boolean),
        pl.Series("has_dreams", dream_flags["noise"], dtype=pl.Boolean),
        pl.Series("has_dreams_no_noise", dream_flags["no_noise"], dtype=pl.Boolean),
        pl.Series("has_shard", [channel_file(rep, c, ".json").is_file() for c in channels], dtype=pl.Boolean),
    ).join(quality_summary, on="channel", how="left").with_columns(
        pl.col("n_dreams").fill_null(0), pl.col("n_failed_dreams").fill_null(0),
    )
    frame = pl.from_arrow(frame.select(list(INDEX_COLUMNS)).to_arrow().cast(INDEX_SCHEMA))
    if int(summary["width"]) != frame.height:
        raise ValueError(f"channels.parquet of {variant!r} has {frame.height} rows but the width is {summary['width']}")
    return frame


def build_index(layout: DataLayout, variant: str, out_dir: str | Path | None = None, lock_owner: str = "") -> Path:
    """Write ``index.parquet`` and ``index.json`` for ``variant`` (under the index lock, waiting for another
    run's index); returns the Parquet path.

    Query it with DuckDB, e.g. ``select channel, top_prompts_text from 'index.parquet' where is_active
    and top_prompts_text ilike '%cat%' order by total_frequency desc``.
    """
    out = Path(out_dir) if out_dir is not None else representation_dir(layout, variant)
    out.mkdir(parents=True, exist_ok=True)
    with partition_lock(stage_locks_dir(out) / "index.lock", wait=True, owner=lock_owner or f"index {variant}"):
        remove_temporaries_of(out, ["index.parquet", "index.json"])
        return _write_index(layout, variant, out)


def _write_index(layout: DataLayout, variant: str, out: Path) -> Path:
    summary = _read_stats_summary(layout, variant)
    frame = make_index_table(layout, variant)
    index_file = out / "index.parquet"
    with atomic_path(index_file) as tmp:
        pq.write_table(frame.to_arrow().cast(INDEX_SCHEMA), tmp, compression="zstd")
    atomic_write_json(out / "index.json", {
        "format": INDEX_FORMAT,
        "variant": variant,
        "experiment": layout.experiment,
        "total_channels": frame.height,
        "active_channels": int(frame["is_active"].sum()),
        "timesteps": [int(t) for t in summary["timesteps"]],
        "total_timesteps": int(summary["config"]["total_timesteps"]),
        "n_generations": summary.get("n_generations"),
        "channels_with_shards": int(frame["has_shard"].sum()),
        "channels_with_priors": int(frame["has_priors"].sum()),
        "channels_with_dreams": int(frame["has_dreams"].sum()),
        "channels_with_dreams_no_noise": int(frame["has_dreams_no_noise"].sum()),
        "index": "index.parquet",
        "built_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    })
    return index_file


def check_index(frame: pl.DataFrame, source: str = "index") -> pl.DataFrame:
    """``frame`` with the columns of :data:`INDEX_SCHEMA` in their types, checked: one row per channel.

    Raises:
        BadShardError: a column is missing or cannot take its type, or a channel is null or repeated.
    """
    fix = "rebuild it with build_index (`ddr build-shards` or materialize representation_shards)"
    missing = [c for c in INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise BadShardError(f"{source} lacks the column(s) {missing}: {fix}")
    try:
        frame = pl.from_arrow(frame.select(list(INDEX_COLUMNS)).to_arrow().cast(INDEX_SCHEMA))
    except (pa.ArrowException, ValueError, TypeError) as error:
        raise BadShardError(f"{source} has columns of the wrong type ({str(error)[:200]}): {fix}") from None
    channels = frame["channel"]
    if channels.null_count() or channels.n_unique() != frame.height:
        raise BadShardError(f"{source} has null or repeated channels: {fix}")
    return frame


def load_index(layout: DataLayout, variant: str) -> pl.DataFrame:
    """``index.parquet`` of ``variant`` when written (checked with :func:`check_index`), else built in memory
    from the statistics.

    Raises:
        BadShardError: ``index.parquet`` cannot be read or has the wrong columns (names the file and the fix).
    """
    path = representation_dir(layout, variant) / "index.parquet"
    if path.is_file():
        try:
            frame = pl.read_parquet(path)
        except Exception as error:  # polars / pyarrow / OS errors: all mean an unreadable table
            raise BadShardError(f"index {path} cannot be read ({type(error).__name__}: {str(error)[:200]}): "
                                "rebuild it with build_index (`ddr build-shards`)") from None
        return check_index(frame, f"index {path}")
    return make_index_table(layout, variant)


def load_index_or_rebuild(layout: DataLayout, variant: str) -> tuple[pl.DataFrame, str | None]:
    """:func:`load_index`, or where ``index.parquet`` is unusable the index built in memory from the upstream
    stages and the reason, for a warning."""
    try:
        return load_index(layout, variant), None
    except BadShardError as error:
        return make_index_table(layout, variant), f"{error} (the index was rebuilt in memory from the statistics)"


def search_channels(
    layout: DataLayout, variant: str, text: str, limit: int = 200, active_only: bool = True
) -> pl.DataFrame:
    """Channels whose dataset examples have a prompt containing ``text`` (case-insensitive ``ILIKE``).

    Returns ``channel, matches, best_activation, prompt`` (the best matching prompt), most matches
    first. ``%`` and ``_`` in ``text`` match literally.
    """
    path = layout.timestep_stats_dir(variant) / "dataset_examples.parquet"
    if not path.is_file():
        raise MissingStatsError(f"{path} is missing: materialize timestep_stats[{variant}] first")
    pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    active_filter = ""
    params: list[Any] = [str(path), pattern]
    if active_only:
        channels_path = layout.timestep_stats_dir(variant) / "channels.parquet"
        active_filter = "AND channel IN (SELECT channel FROM read_parquet(?) WHERE is_active)"
        params.append(str(channels_path))
    params.append(int(limit))
    con = duckdb.connect()
    try:
        return con.sql(
            f"""
            SELECT channel::INTEGER AS channel, count(*)::INTEGER AS matches, max(activation) AS best_activation,
                   arg_max(prompt, activation) AS prompt
            FROM read_parquet(?)
            WHERE prompt ILIKE ? ESCAPE '\\' {active_filter}
            GROUP BY channel ORDER BY matches DESC, best_activation DESC, channel LIMIT ?
            """,
            params=params,
        ).pl()
    finally:
        con.close()


def representation_for_variant(
    layout: DataLayout, variant: str, channels: Iterable[int] | None = None, log: LogFn | None = None,
    lock_wait: bool | float = False, lock_owner: str = "",
) -> tuple[ShardsSummary, Path]:
    """The stage: :func:`build_shards` for ``channels`` then :func:`build_index` for the whole variant."""
    summary = build_shards(layout, variant, channels, log=log, lock_wait=lock_wait, lock_owner=lock_owner)
    return summary, build_index(layout, variant, lock_owner=lock_owner)
