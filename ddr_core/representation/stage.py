"""The representation stage for one variant (:func:`representation_for_variant`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ddr_core.paths import DataLayout
from ddr_core.representation.index import build_index
from ddr_core.representation.shards import LogFn, ShardsSummary, build_shards


def representation_for_variant(
    layout: DataLayout, variant: str, channels: Iterable[int] | None = None, log: LogFn | None = None,
    lock_wait: bool | float = False, lock_owner: str = "",
) -> tuple[ShardsSummary, Path]:
    """The stage: :func:`build_shards` for ``channels`` then :func:`build_index` for the whole variant."""
    summary = build_shards(layout, variant, channels, log=log, lock_wait=lock_wait, lock_owner=lock_owner)
    return summary, build_index(layout, variant, lock_owner=lock_owner)
