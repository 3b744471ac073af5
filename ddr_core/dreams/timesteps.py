"""The timesteps a channel is dreamed at: integers of the config and the keywords ``activity_peaks`` /
``active_timesteps`` expanded from the timestep statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from ddr_core.dreams.config import KEYWORD_TABLES, TIMESTEP_KEYWORDS, DreamConfig


@functools.lru_cache(maxsize=8)
def _timestep_table(path: str, mtime_ns: int, kind: str) -> dict[int, list[int]]:
    frame = pl.read_parquet(path)
    if kind == "observed_peaks":  # the observed timestep nearest each peak (a step the model really ran)
        frame = frame.sort(["channel", "peak_rank"]).select("channel", pl.col("observed_timestep").alias("timestep"))
    elif kind == "activity_peaks":
        frame = frame.sort(["channel", "peak_rank"])
    else:
        frame = frame.sort(["channel", "timestep"])
    grouped = frame.group_by("channel", maintain_order=True).agg(pl.col("timestep"))
    return {int(c): [int(t) for t in ts] for c, ts in zip(grouped["channel"], grouped["timestep"], strict=True)}


def _load_timestep_table(stats_dir: Path, kind: str) -> dict[int, list[int]]:
    path = Path(stats_dir) / f"{KEYWORD_TABLES.get(kind, kind)}.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the dream timesteps use {kind!r}, which comes from the timestep statistics; "
            f"compute the timestep_stats stage for this variant first, or use integer timesteps only"
        )
    return _timestep_table(str(path.resolve()), path.stat().st_mtime_ns, kind)


def resolve_dream_timesteps(
    stats_dir: str | Path | None, channel: int, spec: Sequence[int | str]
) -> list[int]:
    """The timesteps to dream ``channel`` at: ``spec``'s integers plus its keywords expanded.

    ``activity_peaks`` adds the channel's peaks (highest first), ``observed_peaks`` the observed (capture)
    timestep nearest each peak (highest peak first; for a few-step model such as FLUX.1-schnell, whose profile
    is interpolated between 1-4 observed timesteps, a plateau's middle is often a timestep the model never ran
    at), ``active_timesteps`` every timestep where its activity profile is > 0 (ascending). Order follows
    ``spec``; duplicates are dropped.
    A channel without peaks / active timesteps contributes none for that keyword.

    Raises:
        FileNotFoundError: a keyword is used but its table is missing from ``stats_dir``.
        ValueError: an unknown keyword.
    """
    resolved: list[int] = []
    for item in spec:
        if isinstance(item, str):
            if item not in TIMESTEP_KEYWORDS:
                raise ValueError(f"unknown timestep keyword {item!r}; use one of {list(TIMESTEP_KEYWORDS)}")
            if stats_dir is None:
                raise FileNotFoundError(f"timestep keyword {item!r} needs the timestep statistics folder")
            values = _load_timestep_table(Path(stats_dir), item).get(int(channel), [])
        else:
            values = [int(item)]
        for value in values:
            if value not in resolved:
                resolved.append(value)
    return resolved


def split_by_signal(model: Any, timesteps: Sequence[int], config: DreamConfig) -> tuple[list[int], list[dict[str, Any]]]:
    """``(kept, skipped)``: the timesteps a dream can act at, and those it cannot.

    With ``config.see_through_schedule_noise`` on, the dream's latent enters the layer as
    ``s_t * latent + noise`` (``s_t`` = :meth:`~ddr_core.families.ModelFamily.signal_fraction`), so the objective's
    gradient with respect to the latent is scaled by ``s_t``: below ``config.min_signal`` the optimiser cannot
    raise the activation (on a zero-terminal-SNR schedule ``s_999 = 0``: the gradient is exactly 0) and the
    dream would be a no-op shown as a picture of the channel. Such timesteps are skipped, each recorded as
    ``{"timestep", "signal", "reason"}``. Without schedule noise (or ``min_signal = 0``) every timestep is kept.
    """
    timesteps = [int(t) for t in timesteps]
    if not config.see_through_schedule_noise or config.min_signal <= 0 or not timesteps:
        return timesteps, []
    signal = model.signal_fraction(timesteps).tolist()
    kept: list[int] = []
    skipped: list[dict[str, Any]] = []
    for timestep, value in zip(timesteps, signal, strict=True):
        if value >= config.min_signal:
            kept.append(timestep)
        else:
            skipped.append({
                "timestep": timestep, "signal": round(float(value), 6),
                "reason": f"no signal at t={timestep}: {float(value):.4f} of the clean latent survives the schedule "
                          f"noise (min_signal {config.min_signal}); the objective's gradient is ~0",
            })
    return kept, skipped
