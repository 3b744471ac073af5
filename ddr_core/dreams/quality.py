"""The quality check of finished dreams: each dream re-measured against its start latent and the dataset's
best example (:func:`measure_dream_quality`), cached per channel and united in ``quality.parquet``, with each
dream's **raised** verdict (:func:`with_raised`, the one definition every reader uses).

**Raised.** The verdict columns (``gain``, ``noise_sd``, ``noise_samples``, ``raised``) of the union table come
from :func:`ddr_core.dream_verdict.with_raised` (defined there, free of torch, so the inspector can read it;
re-exported here): the one definition of a raised dream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ddr_core.atomic import TEMP_MARKER, atomic_path
from ddr_core.basis import Basis, as_basis
from ddr_core.channel_store import DREAM_FILE, channel_dir, timestep_dir_name
from ddr_core.dream_verdict import NOISE_SD_MULTIPLE, VERDICT_SCHEMA, verdict_text, with_raised
from ddr_core.dreams.channel_files import finished_channels, load_file
from ddr_core.dreams.config import DreamConfig, DreamObjective
from ddr_core.dreams.optimise import element_generators, element_seed, measure_activations
from ddr_core.lazy_imports import lazy_module
from ddr_core.locks import partition_lock, stage_locks_dir

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")

__all__ = ["NOISE_SD_MULTIPLE", "QUALITY_FILE", "QUALITY_LOCK_FILE", "QUALITY_SCHEMA", "VERDICT_SCHEMA",
           "measure_dream_quality", "verdict_text", "with_raised", "write_quality_table"]

QUALITY_FILE = "quality.parquet"
QUALITY_LOCK_FILE = "quality.lock"
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
    "prior_draw_sd": pl.Float64,
    "noise_draws": pl.Int32,
}
"""What the measurement writes per dream (each channel's cached ``quality.parquet``): ``prior_draw_sd`` is the
standard deviation of the start activation over the ``noise_draws`` schedule-noise draws (0 with one draw)."""


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
        The rows of ``channels`` (columns of :data:`QUALITY_SCHEMA` and the verdict's :data:`VERDICT_SCHEMA`).
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
            stacked = torch.stack(source[first: first + batch_size])
            if sink is dream_values:
                sink.extend(measure_activations(model, layer, objective, stacked, timesteps, draws).tolist())
                continue
            # the start: one measurement per draw, so its spread over draws is known (the noise of a raised verdict)
            per_draw = [measure_activations(model, layer, objective, stacked, timesteps, [d] if d else None)
                        for d in (draws or [None])]
            total = torch.zeros_like(per_draw[0])
            for values in per_draw:
                total += values
            sink.extend((total / len(per_draw)).tolist())
            spread = (torch.stack(per_draw).std(dim=0, unbiased=True) if len(per_draw) > 1
                      else torch.zeros_like(per_draw[0]))
            for offset, value in enumerate(spread.tolist()):
                chunk[offset]["prior_draw_sd"] = value if np.isfinite(value) else None
                chunk[offset]["noise_draws"] = len(per_draw)

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
    frames = [_measured_columns(pl.read_parquet(path)) for path in cached if path.is_file()]
    table = with_raised(pl.concat(frames, how="vertical") if frames else _quality_frame([]))
    with atomic_path(dreams_dir / QUALITY_FILE) as tmp:
        table.write_parquet(tmp)
    return table


def _measured_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """The measurement columns of a cached table (a cache written before a column existed gets it null)."""
    return frame.with_columns(pl.lit(None, dtype).alias(name) for name, dtype in QUALITY_SCHEMA.items()
                              if name not in frame.columns).select(
        pl.col(name).cast(dtype) for name, dtype in QUALITY_SCHEMA.items())


def write_quality_table(dreams_dir: str | Path) -> pl.DataFrame:
    """Rewrite ``dreams_dir/quality.parquet`` from the channels' cached quality rows; measure nothing.

    What :func:`measure_dream_quality` writes last, without a model: rank 0 of a multi-GPU job calls
    it once every rank has measured its channels, so the table is the union of all of them whatever
    order the ranks finished in. Takes the quality lock (waited for).

    Returns:
        The whole table (columns of :data:`QUALITY_SCHEMA` and :data:`VERDICT_SCHEMA`).
    """
    dreams_dir = Path(dreams_dir)
    with partition_lock(stage_locks_dir(dreams_dir) / QUALITY_LOCK_FILE, wait=True,
                        owner=f"dream quality {dreams_dir.name}"):
        return _write_quality_union(dreams_dir, finished_channels(dreams_dir))


def _quality_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    rows = [{name: row.get(name) for name in QUALITY_SCHEMA} for row in rows]
    frame = pl.DataFrame(rows, schema=QUALITY_SCHEMA) if rows else pl.DataFrame(schema=QUALITY_SCHEMA)
    return frame.select(list(QUALITY_SCHEMA))
