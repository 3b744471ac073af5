"""What provisioning works on: sources, results, errors, the listing of a source, and shared limits."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

MANIFEST_NAME = ".ddr_manifest.json"
MANIFEST_VERSION = 2  # 2: entries carry mtime_ns (1 is still read)
RESERVED_PREFIX = ".ddr_"
"""Top-level names of a provisioned folder starting with this are ddr's own bookkeeping (the manifest, the
builtin marker), never content: not listed in the manifest, not an "extra" file, never pruned."""
PART_SUFFIX = ".part"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_DRIVE_BASE_URL = "https://drive.usercontent.google.com"
DEFAULT_DRIVE_FOLDER_LIST_URL = "https://drive.google.com/embeddedfolderview"
CHUNK_BYTES = 1 << 20
DOWNLOAD_ATTEMPTS = 3
HTTP_TIMEOUT_S = 60.0
DEFAULT_MAX_FILE_BYTES = 64 << 30
"""Most bytes one downloaded file may have when neither the listing nor the server states its size (a Drive
file sent without Content-Length); ``DDR_MAX_DOWNLOAD_BYTES`` or ``provision(max_file_bytes=...)`` change it."""
MAX_DOWNLOAD_BYTES_ENV = "DDR_MAX_DOWNLOAD_BYTES"

ProgressFn = Callable[[str], None]


class ProvisionError(Exception):
    """Provisioning could not complete; the message names what failed and how to fix it."""


class DownloadError(ProvisionError):
    """A download failed (HTTP error, truncated or corrupt content) after all retries."""


class SourceNotFoundError(ProvisionError, FileNotFoundError):
    """A local source path does not exist."""


class UnsafeSourceError(ProvisionError):
    """A local source holds something ddr will not copy: a link out of it or in a loop, a FIFO or device."""


class ProvisionedFolderChangedError(ProvisionError):
    """A provisioned folder no longer matches its manifest (a file changed, went missing or was added)."""


# ---- sources -------------------------------------------------------------------------------------


@dataclass
class HubSource:
    """A Hugging Face hub repository (model, dataset or space) at a revision.

    ``allow_patterns`` are :mod:`fnmatch` patterns on repo paths (``"unet/*"``; a trailing ``/``
    means the whole folder); ``None`` takes every file. ``endpoint`` defaults to ``$HF_ENDPOINT`` or
    https://huggingface.co. The token comes from ``$HF_TOKEN`` and is deliberately not a field.
    """

    repo_id: str
    revision: str = "main"
    allow_patterns: list[str] | None = None
    repo_type: str = "model"
    endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.repo_type not in ("model", "dataset", "space"):
            raise ValueError(f"repo_type must be 'model', 'dataset' or 'space', got {self.repo_type!r}.")
        try:
            validate_repo_id(self.repo_id)  # huggingface_hub's rule: [owner/]name of letters, digits, - _ .
        except HFValidationError:
            raise ValueError(
                f"invalid hub repo_id {self.repo_id!r}; expected 'owner/name' (letters, digits, '-', '_', '.'; no "
                "'--' or '..'), as in the repo's URL on the hub"
            ) from None

    def describe(self) -> dict[str, Any]:
        """Identity of the content (the endpoint is left out: a mirror serves the same files)."""
        return {
            "kind": "hub",
            "repo_id": self.repo_id,
            "revision": self.revision,
            "repo_type": self.repo_type,
            "allow_patterns": sorted(self.allow_patterns) if self.allow_patterns is not None else None,
        }


@dataclass
class GoogleDriveSource:
    """A publicly shared Google Drive file (``file_id``) or folder (``folder_id``, recursive).

    ``filename`` names a single downloaded file (default: the name Drive sends). ``base_url`` and
    ``folder_list_url`` exist so tests can point at a loopback server.
    """

    file_id: str | None = None
    folder_id: str | None = None
    filename: str | None = None
    base_url: str = DEFAULT_DRIVE_BASE_URL
    folder_list_url: str = DEFAULT_DRIVE_FOLDER_LIST_URL

    def __post_init__(self) -> None:
        if (self.file_id is None) == (self.folder_id is None):
            raise ValueError("GoogleDriveSource needs exactly one of file_id or folder_id.")
        if self.filename is not None and self.folder_id is not None:
            raise ValueError("GoogleDriveSource.filename only applies to a single file (file_id).")
        if self.filename is not None:
            _safe_relative_path(self.filename)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "gdrive",
            "file_id": self.file_id,
            "folder_id": self.folder_id,
            "filename": self.filename,
        }


@dataclass
class LocalSource:
    """A local file or directory tree copied into the destination."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "path": str(self.path.expanduser().resolve())}


Source = HubSource | GoogleDriveSource | LocalSource


@dataclass
class ProvisionResult:
    """Outcome of :func:`provision`.

    Attributes:
        path: the destination folder.
        n_files, n_bytes: files and bytes recorded in the manifest.
        content_hash: sha256 over the sorted ``(path, sha256)`` pairs.
        skipped: an intact copy was found; nothing was listed or fetched.
        fetched: every file downloaded or copied in this run (relative paths).
        refetched: the subset of ``fetched`` that replaced a damaged, partial or changed local file.
    """

    path: Path
    n_files: int
    n_bytes: int
    content_hash: str
    skipped: bool
    fetched: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)


@dataclass
class _Fetched:
    name: str | None  # a file name chosen by the server (Drive), if any
    size: int
    sha256: str
    git_sha1: str | None = None


@dataclass
class _RemoteFile:
    """One file of a source listing.

    ``path`` is ``None`` when the server names the file at download time (a Drive file id without a
    ``filename``). ``stamp`` is a cheap change marker stored in the manifest (local sources only).
    """

    path: str | None
    size: int | None
    sha256: str | None
    git_sha1: str | None
    fetch: Callable[[Path], _Fetched]
    stamp: str | None = None
    sha256_fn: Callable[[], str] | None = None
    label: str = ""


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safe_relative_path(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in path.parts):
        raise ProvisionError(f"refusing unsafe file path {name!r} from the source.")
    return path.as_posix()


def _sanitize_name(title: str) -> str:
    """A Drive title as one safe path component."""
    cleaned = re.sub(r"[/\\\x00-\x1f]", "_", title).strip()
    return cleaned if cleaned not in ("", ".", "..") else "_"


def _format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown size"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _describe(description: dict[str, Any]) -> str:
    kind = description.get("kind")
    if kind == "hub":
        patterns = f" {description['allow_patterns']}" if description.get("allow_patterns") else ""
        return f"hub {description.get('repo_type')} {description.get('repo_id')}@{description.get('revision')}{patterns}"
    if kind == "gdrive":
        if description.get("folder_id"):
            return f"Google Drive folder {description['folder_id']}"
        return f"Google Drive file {description.get('file_id')}"
    if kind == "local":
        return f"local path {description.get('path')}"
    return str(description)
