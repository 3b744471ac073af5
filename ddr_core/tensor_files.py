"""Safetensors files with byte-stable metadata.

The safetensors library keeps a file's ``__metadata__`` in an unordered map, so the same tensors and the
same metadata written by two processes differ in bytes (the map's order follows the process's hash seed;
passing an ordered dict does not help). ddr stores its metadata as **one** key, ``ddr``, holding canonical
JSON (sorted keys, no spaces): a one-entry map has one order, so identical runs write identical bytes and
"bitwise equal" in the docs and tests means the files, not only the tensors.

:func:`read_metadata` also reads files written before this (their metadata was the flat map itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METADATA_KEY = "ddr"


def canonical_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """``metadata`` as the one-key map to pass to ``save_file(..., metadata=...)`` (``None`` stays ``None``)."""
    if metadata is None:
        return None
    return {METADATA_KEY: json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)}


def read_metadata(handle: Any) -> dict[str, Any]:
    """The metadata of an open ``safetensors.safe_open`` handle as ddr wrote it ({} when it has none)."""
    raw = handle.metadata() or {}
    if METADATA_KEY in raw:
        value = json.loads(raw[METADATA_KEY])
        if not isinstance(value, dict):
            raise ValueError(f"safetensors metadata key {METADATA_KEY!r} holds {type(value).__name__}, not an object")
        return value
    return dict(raw)


def read_file_metadata(path: str | Path) -> dict[str, Any]:
    """:func:`read_metadata` of the file at ``path`` (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return read_metadata(handle)
