"""Reading what the upstream stages wrote for a variant: the timestep statistics, priors, dreams and their
quality rows, and the check of the files they reference (:class:`_FileChecker`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from ddr_core.channel_store import read_dream, read_prior
from ddr_core.paths import DataLayout
from ddr_core.representation.files import (
    DREAM_RUNS,
    PRIORS_STAGE,
    MissingStatsError,
    ShardFileError,
    resolve_file,
)
from ddr_core.statistics import read_summary


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
