"""Output records: what produced an asset partition (code version, config, upstream versions).

Every stage writes one JSON record per (asset, partition) *after* its outputs are complete. The
record is the completion report: a partition without a record is unfinished, whatever files exist
(also for work run elsewhere, e.g. on a cluster). Downstream stages read their upstream records to
record the exact upstream versions they consumed, so lineage says what produced what.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from ddr_core.config import config_hash

RECORD_VERSION = 1


class MissingUpstreamError(RuntimeError):
    """An upstream asset partition has not been materialized (its record is missing)."""


def record_path(records_dir: Path, asset: str, partition: str | None) -> Path:
    """``<records_dir>/<asset>/<partition>.json``; the asset must be a safe name and the partition a name or a
    channel block (:func:`ddr_core.paths.check_partition_key`), so a record never lands outside its folder."""
    from ddr_core.paths import check_name, check_partition_key

    check_name(asset, "asset")
    if partition is None:
        return Path(records_dir) / asset / "__unpartitioned__.json"
    return Path(records_dir) / asset / f"{check_partition_key(partition, f'partition of {asset}')}.json"


def make_record(asset: str, partition: str | None, code_version: str, config: dict[str, Any],
                upstream: dict[str, str], data_version: str, outputs: dict[str, Any] | None = None) -> dict:
    return {
        "record_version": RECORD_VERSION,
        "asset": asset,
        "partition": partition,
        "code_version": code_version,
        "config": config,
        "config_hash": config_hash(config),
        "upstream": dict(sorted(upstream.items())),
        "data_version": data_version,
        "outputs": outputs or {},
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def write_record(records_dir: Path, record: dict) -> Path:
    from ddr_core.atomic import atomic_write_json

    path = record_path(records_dir, record["asset"], record["partition"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return path


def read_record(records_dir: Path, asset: str, partition: str | None, *, required_by: str | None = None) -> dict:
    """Read a record; a missing one raises :class:`MissingUpstreamError` naming what to materialize."""
    path = record_path(records_dir, asset, partition)
    if not path.is_file():
        who = f" (needed by {required_by})" if required_by else ""
        raise MissingUpstreamError(
            f"asset {asset!r} partition {partition!r} has not been materialized{who}: "
            f"materialize {asset}[{partition}] first (e.g. `dagster asset materialize -m dagster_project.definitions --select {asset} "
            f"--partition {partition}`)"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        record = error
    if not isinstance(record, dict) or not isinstance(record.get("data_version"), str):
        what = f"is not valid JSON ({record})" if isinstance(record, Exception) else (
            f"holds a JSON {type(record).__name__}" if not isinstance(record, dict) else "has no data_version")
        raise MissingUpstreamError(
            f"the record {path} of asset {asset!r} partition {partition!r} {what}, so it is not a completion "
            f"report: materialize {asset}[{partition}] again (e.g. `dagster asset materialize -m dagster_project.definitions --select {asset} "
            f"--partition {partition}`)"
        )
    return record
