"""The shard schema, checked whenever a shard is read (:func:`check_shard`), and the readers of shards and
curves (:func:`load_shard`, :func:`load_curves`, :func:`curves_or_observed`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ddr_core.paths import DataLayout, shown
from ddr_core.representation.files import (
    SHARD_FORMAT,
    BadShardError,
    ShardFileError,
    resolve_file,
    shard_path,
)
from ddr_core.representation.shards import interpolated_curves, make_shards


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
    verdict: str | None = None  # against the unsteered generation (ddr_core.prior_gain.prior_verdicts), plain text


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
