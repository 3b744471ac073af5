"""The representation's files: formats and stage names, where a variant's shards, curves and index lie, the
errors of reading them, and stored paths resolved inside the data root (:func:`resolve_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddr_core.channel_store import channel_file
from ddr_core.paths import DataLayout, UnsafePathError, resolve_in_data_root, shown

SHARD_FORMAT = "ddr.representation.shard/1"
INDEX_FORMAT = "ddr.representation.index/1"
REPRESENTATION_STAGE = "representation"
PRIORS_STAGE = "priors"
#: dream run name -> stage folder name
DREAM_RUNS: dict[str, str] = {"noise": "dreams", "no_noise": "dreams_no_noise"}
DREAM_STAT_NAMES: tuple[str, ...] = ("activation", "tv", "range", "moment", "loss")


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
