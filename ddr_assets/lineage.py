"""Metadata that makes lineage mean something: config, its hash, upstream versions, code version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg

from ddr_core.config import config_hash
from ddr_core.markdown_text import escape_markdown, markdown_code_block


def lineage_metadata(config: dict[str, Any], upstream: dict[str, str], code_version: str) -> dict[str, Any]:
    """Metadata entries recording how a partition was produced."""
    return {
        "code_version": code_version,
        "config": dg.MetadataValue.json(config),
        "config_hash": config_hash(config),
        "upstream_versions": dg.MetadataValue.json(upstream),
    }


def path_metadata(path: Path) -> dg.MetadataValue:
    return dg.MetadataValue.path(str(path))


def table_preview(rows: list[dict[str, Any]], limit: int = 20) -> dg.MetadataValue:
    """A markdown table of the first rows (Dagster renders it in the asset's metadata).

    Column names and every cell but a float (prompts, labels, paths: data) go through
    :func:`~ddr_core.markdown_text.escape_markdown`, so they show as text, never as links or images.
    """
    rows = rows[:limit]
    if not rows:
        return dg.MetadataValue.md("_(empty)_")
    columns = list(rows[0])
    lines = ["| " + " | ".join(escape_markdown(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{v:.4g}" if isinstance(v, float) else escape_markdown(v))
        lines.append("| " + " | ".join(cells) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def json_md(payload: Any) -> dg.MetadataValue:
    """``payload`` as a JSON code block (its strings cannot close the block)."""
    return dg.MetadataValue.md(markdown_code_block(json.dumps(payload, indent=2, default=str), "json"))


def require_upstream(storage: Any, asset: str, keys: Any, *, use_prior: bool = True) -> None:
    """Fail before any work when upstream partitions of ``asset[keys]`` are missing, naming all of them and one
    command that materializes them (:func:`ddr_core.prerequisites.check_prerequisites`)."""
    from ddr_core.prerequisites import check_prerequisites
    from ddr_core.records import MissingUpstreamError

    keys = [keys] if isinstance(keys, str) else list(keys)
    try:
        check_prerequisites(storage.project, storage.layout, asset, keys, use_prior=use_prior)
    except MissingUpstreamError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None


def stats_upstream(records_dir: Path, variant: str, required_by: str) -> dict[str, str]:
    """``{"timestep_stats/<variant>": its data version}``: the first upstream of an asset over a variant's
    statistics. Raises :class:`~ddr_core.records.MissingUpstreamError` naming ``required_by`` when they have not
    been materialized."""
    from ddr_core.records import read_record

    record = read_record(records_dir, "timestep_stats", variant, required_by=required_by)
    return {f"timestep_stats/{variant}": record["data_version"]}


def optional_data_version(records_dir: Path, asset: str, key: str) -> str | None:
    """The data version of an upstream that need not have run (its completion record), or ``None`` when it has no
    record or one that is not a completion report. Other errors (an unreadable records folder) are raised: an
    input silently left out of the lineage would let a changed upstream go unnoticed."""
    from ddr_core.records import MissingUpstreamError, read_record

    try:
        return read_record(records_dir, asset, key)["data_version"]
    except MissingUpstreamError:
        return None


def content_version(path: Path) -> str:
    """A data version for an input found on disk without a completion record (written by hand): its bytes' hash."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"unrecorded-{digest.hexdigest()[:16]}"
