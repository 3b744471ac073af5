"""Provision model, SAE and dataset folders from the Hugging Face hub, Google Drive or a local path.

Guarantees, whatever the source:

* Every file is written to ``<name>.part`` and renamed into place only once it is complete and
  verified (size, and the hub's sha256 / git blob hash where the source publishes one).
* ``<dest>/.ddr_manifest.json`` (relative path -> size, sha256 and the file's mtime in ns, a
  description of the source and a ``content_hash`` = sha256 over the sorted ``(path, sha256)`` pairs)
  is written last and atomically, so its presence means the copy was complete. Manifests of version 1
  (no ``mtime_ns``) are still read; re-provisioning an intact copy adds the times.
* Whoever loads a provisioned folder checks it with :func:`verify_provisioned`: every file of the
  manifest present with its size and mtime (sha256 only when the time differs), no file the manifest
  does not list; a mismatch is an error naming the files and the command that re-provisions.
* A ``local`` source is copied without following links out of it or in loops, and only regular files
  (a FIFO or device would block or never end); a download never reads more bytes than the source lists
  (or announces, or :data:`DEFAULT_MAX_FILE_BYTES` when neither says), and a size mismatch is not retried.
* An intact copy (manifest for the same source, every file present with its size and, when
  ``verify``, its sha256) is skipped without touching the network.
* A partial or damaged copy (missing files, a leftover ``.part``, a wrong size, a file changed on
  disk since it was provisioned) re-fetches only what is missing or wrong, and reports it.

HTTP uses only :mod:`urllib.request`. A Hugging Face token is read from ``HF_TOKEN`` and sent only to
the configured endpoint's origin (scheme, host and port of ``HubSource.endpoint`` / ``HF_ENDPOINT``), on
every request: a redirect to another origin (the LFS CDN, a hostile server) goes there without it, and a
tree-API paging ``Link`` to another origin is refused. It is never written to logs, errors or results.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat as stat_module
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from ddr_core.atomic import atomic_write_json
from ddr_core.locks import partition_lock

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".ddr_manifest.json"
MANIFEST_VERSION = 2  # 2: entries carry mtime_ns (1 is still read)
RESERVED_PREFIX = ".ddr_"
"""Top-level names of a provisioned folder starting with this are ddr's own bookkeeping (the manifest, the
builtin marker), never content: not listed in the manifest, not an "extra" file, never pruned."""
PART_SUFFIX = ".part"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_DRIVE_BASE_URL = "https://drive.usercontent.google.com"
DEFAULT_DRIVE_FOLDER_LIST_URL = "https://drive.google.com/embeddedfolderview"
USER_AGENT = "ddr-provisioning/0.1 (python-urllib)"
CHUNK_BYTES = 1 << 20
DOWNLOAD_ATTEMPTS = 3
RETRY_BACKOFF_S = 1.0
HTTP_TIMEOUT_S = 60.0
MAX_HTML_BYTES = 4 << 20
MAX_DRIVE_FOLDER_DEPTH = 12
MAX_LISTING_BYTES = 64 << 20
"""Most bytes read from one page of a hub tree listing (a hostile endpoint could send an endless one)."""
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
        if not self.repo_id or self.repo_id.startswith("/") or ".." in self.repo_id.split("/"):
            raise ValueError(f"invalid hub repo_id {self.repo_id!r}; expected 'owner/name'.")

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


# ---- hashing and manifest ------------------------------------------------------------------------


class _Hasher:
    """sha256 and (when the final size is known) the git blob sha1 of a byte stream."""

    def __init__(self, git_size: int | None = None):
        self.sha256 = hashlib.sha256()
        self.git_sha1 = hashlib.sha1(f"blob {git_size}\0".encode()) if git_size is not None else None
        self.n_bytes = 0

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.git_sha1 is not None:
            self.git_sha1.update(chunk)
        self.n_bytes += len(chunk)


def _hash_file(path: Path, with_git_sha1: bool = False) -> _Hasher:
    hasher = _Hasher(path.stat().st_size if with_git_sha1 else None)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            hasher.update(chunk)
    return hasher


def content_hash_of(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the sorted ``(relative path, sha256)`` pairs of a manifest's ``files``."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path}\0{files[path]['sha256']}\n".encode())
    return digest.hexdigest()


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_entry(relative: object, entry: object) -> bool:
    """A manifest entry as ddr writes it: a safe relative path -> ``size``, ``sha256`` (+ ``mtime_ns``, ``stamp``)."""
    if not isinstance(relative, str) or not isinstance(entry, dict):
        return False
    try:
        if _safe_relative_path(relative) != relative:
            return False
    except ProvisionError:
        return False
    return (
        _is_count(entry.get("size"))
        and isinstance(entry.get("sha256"), str)
        and _SHA256_RE.fullmatch(entry["sha256"]) is not None
        and ("mtime_ns" not in entry or _is_count(entry["mtime_ns"]))
        and ("stamp" not in entry or isinstance(entry["stamp"], str))
    )


def read_manifest(dest_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a provisioned folder, or ``None`` when absent, unreadable or not shaped as ddr writes
    it (a JSON object whose ``files`` map safe relative paths to ``size`` / ``sha256`` entries)."""
    path = Path(dest_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    if not all(_valid_entry(relative, entry) for relative, entry in manifest["files"].items()):
        return None
    return manifest


def _file_entry(path: Path, size: int, sha256: str, stamp: str | None = None) -> dict[str, Any]:
    """The manifest entry of the file now at ``path`` (its size and content verified by the caller)."""
    entry: dict[str, Any] = {"size": size, "sha256": sha256, "mtime_ns": path.stat().st_mtime_ns}
    if stamp:
        entry["stamp"] = stamp
    return entry


def _is_reserved(relative: str) -> bool:
    return "/" not in relative and relative.startswith(RESERVED_PREFIX)


def _walk_without_links(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of every entry below ``root`` that is not a directory; links are listed,
    never followed (so a loop of links cannot make this walk endless)."""
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            relative = prefix + entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat_module.S_ISDIR(info.st_mode):
                stack.append((Path(entry.path), relative + "/"))
            else:
                yield relative, info


def _extra_files(dest: Path, manifest_files: dict[str, Any]) -> list[str]:
    """Files (and links, FIFOs, ...) below ``dest`` that the manifest does not list (ddr's own files aside)."""
    return sorted(
        relative
        for relative, _ in _walk_without_links(dest)
        if relative not in manifest_files and not _is_reserved(relative)
    )


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


# ---- HTTP ----------------------------------------------------------------------------------------


def url_origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, lower-cased, with the scheme's default port filled in.

    Two URLs may share credentials only when their origins are equal. A URL whose port does not parse
    gets the port ``-1``, which equals no real origin.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return scheme, (parts.hostname or "").lower(), -1
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


class _TokenOriginRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects; keep ``Authorization`` only while every hop stays on the token's origin.

    urllib does not copy unredirected headers to the redirected request, so the token is dropped on
    any redirect unless this hook puts it back: only when the request that was redirected carried it
    and the new URL has the origin the token was issued for (a hop through another host never brings
    it back).
    """

    def __init__(self, token_origin: tuple[str, str, int | None] | None):
        super().__init__()
        self.token_origin = token_origin

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib hook
        new_request = super().redirect_request(req, fp, code, msg, headers, newurl)
        authorization = req.unredirected_hdrs.get("Authorization")
        if (
            new_request is not None
            and authorization
            and self.token_origin is not None
            and url_origin(new_request.full_url) == self.token_origin
        ):
            new_request.add_unredirected_header("Authorization", authorization)
        return new_request


class _Http:
    """Small urllib wrapper: user agent, timeouts and an optional bearer token for ONE origin.

    ``token_url`` names the origin the token belongs to (the hub endpoint); the token is added to a
    request, or kept across a redirect, only for a URL of exactly that origin.
    """

    def __init__(self, token: str | None = None, timeout: float = HTTP_TIMEOUT_S, token_url: str | None = None):
        if token and not token_url:
            raise ValueError("_Http: a token needs the URL of the endpoint it is for (token_url).")
        self._token = token
        self._token_origin = url_origin(token_url) if token and token_url else None
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_TokenOriginRedirectHandler(self._token_origin))

    def open(self, url: str, what: str) -> http.client.HTTPResponse:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if self._token and url_origin(url) == self._token_origin:
            request.add_unredirected_header("Authorization", f"Bearer {self._token}")
        try:
            return self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            hint = ""
            if error.code in (401, 403):
                hint = (
                    " (access denied: for a gated or private hub repo accept its licence and set HF_TOKEN)"
                    if self._token is None
                    else " (access denied with the HF_TOKEN that is set: check it grants read access)"
                )
            elif error.code == 404:
                hint = " (not found: check the repo id / revision / file id)"
            raise DownloadError(
                f"{what}: HTTP {error.code} {error.reason} from {_redact(url)}{hint}"
            ) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DownloadError(
                f"{what}: could not connect to {_redact(url)} ({reason}); check the network"
            ) from None


def _redact(url: str) -> str:
    """The URL without its query string (signed CDN URLs carry credentials there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream_to(response: BinaryIO, handle: BinaryIO, hasher: _Hasher, limit: int) -> str | None:
    """Copy the body into ``handle``, reading at most ``limit + 1`` bytes (one more than allowed shows that the
    body is too long, and the rest is never read); returns a failure reason when the connection broke."""
    while hasher.n_bytes <= limit:
        try:
            chunk = response.read(min(CHUNK_BYTES, limit + 1 - hasher.n_bytes))
        except (TimeoutError, http.client.HTTPException, OSError) as error:
            return f"connection broke ({type(error).__name__})"
        if not chunk:
            return None
        handle.write(chunk)
        hasher.update(chunk)
    return None


@dataclass
class _Fetched:
    name: str | None  # a file name chosen by the server (Drive), if any
    size: int
    sha256: str
    git_sha1: str | None = None


# ---- listings ------------------------------------------------------------------------------------


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


def hub_endpoint(source: HubSource) -> str:
    """The hub endpoint of ``source``: its ``endpoint``, else ``$HF_ENDPOINT``, else huggingface.co.

    Raises:
        ProvisionError: the endpoint is not an ``http(s)://host[:port]`` URL (the token's origin is
            taken from it, so it must name one).
    """
    endpoint = (source.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    scheme, host, port = url_origin(endpoint)
    parts = urllib.parse.urlsplit(endpoint)
    if scheme not in ("http", "https") or not host or port == -1 or "@" in parts.netloc:
        shown = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        raise ProvisionError(
            f"invalid hub endpoint {shown!r} (from HubSource.endpoint or HF_ENDPOINT): expected an "
            "http(s)://host[:port] URL without user info, such as https://huggingface.co"
        )
    return endpoint


class _HubBackend:
    def __init__(self, source: HubSource, http: _Http, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.source = source
        self.http = http
        self.endpoint = hub_endpoint(source)
        self.max_file_bytes = max_file_bytes

    def _tree_pages(self) -> Iterator[list[dict[str, Any]]]:
        s = self.source
        revision = urllib.parse.quote(s.revision, safe="")
        url: str | None = f"{self.endpoint}/api/{s.repo_type}s/{s.repo_id}/tree/{revision}?recursive=true"
        while url:
            response = self.http.open(url, f"listing hub repo {s.repo_id}@{s.revision}")
            with response:
                body = response.read(MAX_LISTING_BYTES + 1)
                if len(body) > MAX_LISTING_BYTES:
                    raise DownloadError(
                        f"listing hub repo {s.repo_id}: a tree API page is longer than {MAX_LISTING_BYTES} bytes; "
                        "stopped reading (check the endpoint)"
                    )
                try:
                    page = json.loads(body)
                except ValueError as error:
                    raise DownloadError(
                        f"listing hub repo {s.repo_id}: the tree API returned invalid JSON ({error})"
                    ) from None
                next_link = _next_link(response.headers.get("Link"))
            if not isinstance(page, list):
                raise DownloadError(
                    f"listing hub repo {s.repo_id}: expected a JSON list from the tree API, got {type(page).__name__}"
                )
            yield page
            url = urllib.parse.urljoin(url, next_link) if next_link else None
            if url is not None and url_origin(url) != url_origin(self.endpoint):
                raise DownloadError(
                    f"listing hub repo {s.repo_id}@{s.revision}: the tree API's paging Link header points to "
                    f"{_redact(url)}, another origin (scheme, host or port) than the endpoint {self.endpoint}; "
                    "refusing to follow it, the HF_TOKEN must not leave the endpoint (the hub pages on its "
                    "own host, so this endpoint or a proxy is misbehaving: check HF_ENDPOINT / "
                    "HubSource.endpoint)"
                )

    def list_files(self) -> list[_RemoteFile]:
        s = self.source
        patterns = [p + "*" if p.endswith("/") else p for p in (s.allow_patterns or [])]
        files: list[_RemoteFile] = []
        all_paths: list[str] = []
        for page in self._tree_pages():
            for entry in page:
                if not isinstance(entry, dict) or entry.get("type") != "file":
                    continue
                path, size, sha256, git_sha1 = self._file_entry(entry)
                all_paths.append(path)
                if s.allow_patterns is not None and not any(fnmatch.fnmatch(path, p) for p in patterns):
                    continue
                files.append(
                    _RemoteFile(
                        path=path,
                        size=size,
                        sha256=sha256,
                        git_sha1=git_sha1,
                        fetch=self._fetcher(path, size, sha256 is None),
                        label=path,
                    )
                )
        if not files:
            shown = ", ".join(all_paths[:20]) or "no files"
            raise DownloadError(
                f"hub repo {s.repo_id}@{s.revision} has no file matching allow_patterns={s.allow_patterns}; it holds: {shown}"
            )
        return files

    def _file_entry(self, entry: dict[str, Any]) -> tuple[str, int, str | None, str | None]:
        """``(path, size, sha256, git blob sha1)`` of a tree API file entry, its fields' types checked.

        An LFS file has ``lfs.oid`` (sha256) and ``lfs.size``; another file ``oid`` (git blob sha1) and ``size``.
        """
        shown = json.dumps(entry)[:200]
        path = entry.get("path")
        if not isinstance(path, str):
            raise DownloadError(f"listing hub repo {self.source.repo_id}: a file entry has no path string: {shown}")
        path = _safe_relative_path(path)
        lfs = entry.get("lfs")
        if lfs is not None and not isinstance(lfs, dict):
            raise DownloadError(f"listing hub repo {self.source.repo_id}: {path}: 'lfs' is not an object: {shown}")
        size = (lfs or entry).get("size")
        sha256 = lfs.get("oid") if lfs else None
        git_sha1 = None if lfs else entry.get("oid")
        if not _is_count(size):
            raise DownloadError(f"listing hub repo {self.source.repo_id}: {path}: size {size!r} is not a byte count")
        if lfs and not (isinstance(sha256, str) and _SHA256_RE.fullmatch(sha256)):
            raise DownloadError(f"listing hub repo {self.source.repo_id}: {path}: lfs oid {sha256!r} is not a sha256")
        if not lfs and not (isinstance(git_sha1, str) and re.fullmatch(r"[0-9a-f]{40}", git_sha1)):
            raise DownloadError(f"listing hub repo {self.source.repo_id}: {path}: oid {git_sha1!r} is not a git hash")
        return path, size, sha256, git_sha1

    def _fetcher(self, path: str, size: int | None, git_hashed: bool) -> Callable[[Path], _Fetched]:
        s = self.source
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[s.repo_type]
        url = (
            f"{self.endpoint}/{prefix}{s.repo_id}/resolve/{urllib.parse.quote(s.revision, safe='')}/"
            f"{urllib.parse.quote(path)}"
        )

        def fetch(part: Path) -> _Fetched:
            response = self.http.open(url, f"downloading {path} from {s.repo_id}")
            return _download_body(
                response, part, path, expected_size=size, git_size=size if git_hashed else None,
                max_bytes=self.max_file_bytes,
            )

        return fetch


def _next_link(header: str | None) -> str | None:
    if not header:
        return None
    for part in header.split(","):
        match = re.match(r"\s*<([^>]+)>\s*;(.*)", part)
        if match and re.search(r'rel="?next"?', match.group(2)):
            return match.group(1)
    return None


def _download_body(
    response: http.client.HTTPResponse,
    part: Path,
    label: str,
    expected_size: int | None,
    git_size: int | None = None,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> _Fetched:
    """Stream a response into ``part``, never reading more than the file may have.

    The bound is the size the source lists (``expected_size``), else the ``Content-Length``, else
    ``max_bytes``. A body longer than it, a ``Content-Length`` other than the listed size or above
    ``max_bytes``, is a :class:`DownloadError` at once (a server that sends another file than it lists does
    so again: not retried); a short body is ``_Truncated`` (retried).
    """
    with response:
        content_length = _content_length(response)
        if expected_size is not None and content_length is not None and content_length != expected_size:
            raise DownloadError(
                f"{label}: the server announces {content_length} bytes (Content-Length) but the source lists "
                f"{expected_size}; not downloaded (not retried: a server sending another file than it lists "
                "does so again; check the endpoint / the repo revision)"
            )
        if expected_size is None and content_length is not None and content_length > max_bytes:
            raise DownloadError(
                f"{label}: the server announces {content_length} bytes, more than the {max_bytes} allowed for a "
                f"file whose size the source does not list; raise {MAX_DOWNLOAD_BYTES_ENV} if it is right"
            )
        limit = expected_size if expected_size is not None else content_length if content_length is not None else max_bytes
        hasher = _Hasher(git_size)
        part.parent.mkdir(parents=True, exist_ok=True)
        with part.open("wb") as handle:
            broken = _stream_to(response, handle, hasher, limit)
    if hasher.n_bytes > limit:
        part.unlink(missing_ok=True)
        stated = (
            f"the source lists {expected_size}" if expected_size is not None
            else f"the server announced {content_length}" if content_length is not None
            else f"at most {max_bytes} are allowed for a file of unlisted size ({MAX_DOWNLOAD_BYTES_ENV})"
        )
        raise DownloadError(
            f"{label}: the server sent more than {limit} bytes but {stated}; stopped reading at {hasher.n_bytes} "
            "bytes (not retried: check the endpoint / the repo revision)"
        )
    expected = content_length if content_length is not None else expected_size
    if broken or (expected is not None and hasher.n_bytes != expected):
        raise _Truncated(
            f"{label}: received {hasher.n_bytes} of {_describe_expected(expected)} bytes"
            + (f", {broken}" if broken else "")
        )
    return _Fetched(
        name=name,
        size=hasher.n_bytes,
        sha256=hasher.sha256.hexdigest(),
        git_sha1=hasher.git_sha1.hexdigest() if hasher.git_sha1 is not None else None,
    )


def _describe_expected(n: int | None) -> str:
    return "an unknown number of" if n is None else str(n)


class _Truncated(Exception):
    """A body shorter than announced (retried)."""


class _Corrupt(Exception):
    """Content that does not match what the source lists (retried)."""


# -- Google Drive


class _DriveFolderParser(HTMLParser):
    """Entries of ``embeddedfolderview``: links to ``/file/d/<id>`` or ``/drive/folders/<id>`` with a
    ``flip-entry-title`` div holding the name."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.entries: list[tuple[str, str, str]] = []  # (kind, id, title)
        self._link: tuple[str, str] | None = None
        self._title_depth = 0
        self._div_depth = 0
        self._title: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "a":
            href = attributes.get("href", "")
            if match := re.search(r"/file/d/([\w-]+)", href):
                self._link = ("file", match.group(1))
            elif match := re.search(r"/drive/(?:u/\d+/)?folders/([\w-]+)", href) or re.search(
                r"folderview\?(?:.*&)?id=([\w-]+)", href
            ):
                self._link = ("folder", match.group(1))
        elif tag == "div":
            self._div_depth += 1
            if "flip-entry-title" in attributes.get("class", "").split():
                self._title_depth = self._div_depth
                self._title = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            if self._title_depth and self._div_depth == self._title_depth:
                self._title_depth = 0
                if self._link is not None:
                    title = "".join(self._title).strip()
                    if all(entry[1] != self._link[1] for entry in self.entries):
                        self.entries.append((self._link[0], self._link[1], title))
            self._div_depth -= 1
        elif tag == "a":
            self._link = None

    def handle_data(self, data: str) -> None:
        if self._title_depth:
            self._title.append(data)


class _FormParser(HTMLParser):
    """The first download form of a Drive confirmation page: action and hidden inputs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.action: str | None = None
        self.inputs: list[tuple[str, str]] = []
        self.title: list[str] = []
        self._in_form = False
        self._done = False
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "title":
            self._in_title = True
        if self._done:
            return
        if tag == "form" and self.action is None:
            self._in_form = True
            self.action = attributes.get("action", "")
        elif tag == "input" and self._in_form and attributes.get("name"):
            if attributes.get("type", "text").lower() not in ("submit", "button", "image", "reset"):
                self.inputs.append((attributes["name"], attributes.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._in_form:
            self._in_form = False
            self._done = True
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)


def _filename_from_disposition(header: str | None) -> str | None:
    if not header:
        return None
    if match := re.search(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", header):
        return urllib.parse.unquote(match.group(2).strip().strip('"'), encoding=match.group(1) or "utf-8")
    if match := re.search(r'filename\s*=\s*"([^"]*)"', header) or re.search(
        r"filename\s*=\s*([^;]+)", header
    ):
        return match.group(1).strip()
    return None


class _DriveBackend:
    def __init__(self, source: GoogleDriveSource, http: _Http, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.source = source
        self.http = http
        self.max_file_bytes = max_file_bytes

    def list_files(self) -> list[_RemoteFile]:
        s = self.source
        if s.file_id is not None:
            return [
                _RemoteFile(
                    path=s.filename,
                    size=None,
                    sha256=None,
                    git_sha1=None,
                    fetch=self._fetcher(s.file_id, s.filename or s.file_id),
                    label=s.filename or s.file_id,
                )
            ]
        assert s.folder_id is not None
        files: list[_RemoteFile] = []
        self._walk_folder(s.folder_id, "", files, depth=0)
        if not files:
            raise DownloadError(
                f"Google Drive folder {s.folder_id} lists no files; check that it is shared as 'anyone with the link'"
            )
        return files

    def _walk_folder(self, folder_id: str, prefix: str, files: list[_RemoteFile], depth: int) -> None:
        if depth > MAX_DRIVE_FOLDER_DEPTH:
            raise DownloadError(
                f"Google Drive folder {folder_id} nests deeper than {MAX_DRIVE_FOLDER_DEPTH} levels"
            )
        separator = "&" if "?" in self.source.folder_list_url else "?"
        url = f"{self.source.folder_list_url}{separator}id={urllib.parse.quote(folder_id)}"
        response = self.http.open(url, f"listing Google Drive folder {prefix or folder_id}")
        with response:
            charset = response.headers.get_content_charset() or "utf-8"
            page = response.read(MAX_HTML_BYTES).decode(charset, errors="replace")
        parser = _DriveFolderParser()
        parser.feed(page)
        for kind, entry_id, title in parser.entries:
            name = prefix + _sanitize_name(title or entry_id)
            if kind == "folder":
                self._walk_folder(entry_id, name + "/", files, depth + 1)
            else:
                files.append(
                    _RemoteFile(
                        path=name,
                        size=None,
                        sha256=None,
                        git_sha1=None,
                        fetch=self._fetcher(entry_id, name),
                        label=name,
                    )
                )

    def _fetcher(self, file_id: str, label: str) -> Callable[[Path], _Fetched]:
        base = self.source.base_url.rstrip("/")

        def fetch(part: Path) -> _Fetched:
            url = f"{base}/download?" + urllib.parse.urlencode(
                {"id": file_id, "export": "download", "confirm": "t"}
            )
            for _ in range(3):
                response = self.http.open(url, f"downloading {label} from Google Drive")
                content_type = response.headers.get_content_type()
                name = _filename_from_disposition(response.headers.get("Content-Disposition"))
                if content_type != "text/html" or (name and name.lower().endswith((".html", ".htm"))):
                    return _download_body(response, part, label, expected_size=None, name=name,
                                          max_bytes=self.max_file_bytes)
                with response:
                    page_url = response.geturl()
                    page = response.read(MAX_HTML_BYTES).decode(
                        response.headers.get_content_charset() or "utf-8", "replace"
                    )
                form = _FormParser()
                form.feed(page)
                if not form.action and not form.inputs:
                    title = "".join(form.title).strip() or "no title"
                    raise DownloadError(
                        f"{label}: Google Drive returned an HTML page ({title!r}) instead of the file; "
                        "check that it is shared as 'anyone with the link' and that its download quota is not exceeded"
                    )
                action = urllib.parse.urljoin(page_url, form.action or "")
                query = urllib.parse.urlencode(form.inputs)
                url = f"{action}{'&' if '?' in action else '?'}{query}" if query else action
            raise DownloadError(f"{label}: Google Drive kept answering with confirmation pages")

        return fetch


def _file_kind(mode: int) -> str:
    if stat_module.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat_module.S_ISSOCK(mode):
        return "a socket"
    if stat_module.S_ISCHR(mode) or stat_module.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"


class _LocalBackend:
    """A local file or folder, copied file by file.

    What it will not copy, each an :class:`UnsafeSourceError` naming the entry: a link leading outside the
    source folder (a huge or changing file elsewhere would pass for part of the model), a link to a folder
    the copy already includes (a loop of links would make the copy endless), a broken link, and anything but
    a regular file (reading a FIFO or device blocks or never ends). Links to files or folders inside the
    source are followed once.
    """

    def __init__(self, source: LocalSource):
        self.source = source
        self.given = source.path.expanduser()
        if not self.given.exists():
            raise SourceNotFoundError(
                f"local source {self.given} does not exist; fix the path in the config or create it first"
            )
        self.root = self.given.resolve()

    def _refuse(self, relative: str, reason: str) -> UnsafeSourceError:
        return UnsafeSourceError(f"local source {self.given}: {relative} {reason}")

    def _entries(self) -> list[tuple[str, Path, os.stat_result]]:
        """``(relative path, real path, stat)`` of every regular file to copy."""
        root = self.root
        info = os.stat(root)
        if not stat_module.S_ISDIR(info.st_mode):
            if not stat_module.S_ISREG(info.st_mode):
                raise UnsafeSourceError(
                    f"local source {self.given} is {_file_kind(info.st_mode)}; ddr copies regular files only "
                    "(reading it could block or never end): point the source at a regular file or a folder"
                )
            return [(self.given.name, root, info)]
        pairs: list[tuple[str, Path, os.stat_result]] = []
        visited = {(info.st_dev, info.st_ino)}
        stack: list[tuple[Path, str]] = [(root, "")]
        while stack:
            directory, prefix = stack.pop()
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                relative = prefix + entry.name
                if entry.name == MANIFEST_NAME or entry.name.endswith(PART_SUFFIX):
                    continue
                path = Path(entry.path)
                info = entry.stat(follow_symlinks=False)
                if stat_module.S_ISLNK(info.st_mode):
                    target_text = os.readlink(path)
                    try:
                        path = path.resolve(strict=True)
                    except (OSError, RuntimeError):
                        raise self._refuse(
                            relative, f"is a link to {target_text!r} that is broken or loops; fix or remove the link"
                        ) from None
                    if path != root and root not in path.parents:
                        raise self._refuse(
                            relative,
                            f"is a link to {path}, outside the source folder {root}; ddr copies only what is "
                            "inside a local source: copy the file itself into the folder (or point the source "
                            "at the folder that holds it)",
                        )
                    info = os.stat(path)
                if stat_module.S_ISDIR(info.st_mode):
                    if (info.st_dev, info.st_ino) in visited:
                        raise self._refuse(
                            relative,
                            f"is a link to the folder {path}, which the copy already includes (a loop of links, "
                            "or a second path to one folder); remove the link",
                        )
                    visited.add((info.st_dev, info.st_ino))
                    stack.append((path, relative + "/"))
                elif stat_module.S_ISREG(info.st_mode):
                    pairs.append((relative, path, info))
                else:
                    raise self._refuse(
                        relative,
                        f"is {_file_kind(info.st_mode)}; ddr copies regular files only (reading it could block "
                        "or never end): remove it from the source folder",
                    )
        return sorted(pairs, key=lambda pair: pair[0])

    def list_files(self) -> list[_RemoteFile]:
        files = []
        for relative, full, info in self._entries():
            files.append(
                _RemoteFile(
                    path=relative,
                    size=info.st_size,
                    sha256=None,
                    git_sha1=None,
                    fetch=self._copier(full, relative, info.st_size),
                    stamp=f"{info.st_size}:{info.st_mtime_ns}",
                    sha256_fn=lambda full=full: _hash_file(full).sha256.hexdigest(),
                    label=relative,
                )
            )
        return files

    def _copier(self, full: Path, relative: str, size: int) -> Callable[[Path], _Fetched]:
        def fetch(part: Path) -> _Fetched:
            part.parent.mkdir(parents=True, exist_ok=True)
            hasher = _Hasher()
            # no link and no blocking open: the file may have been swapped for a link or a FIFO since listing
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            try:
                descriptor = os.open(full, flags)
            except OSError as error:
                raise DownloadError(f"{relative}: cannot open {full} ({error.strerror})") from None
            with os.fdopen(descriptor, "rb") as source:
                mode = os.fstat(source.fileno()).st_mode
                if not stat_module.S_ISREG(mode):
                    raise self._refuse(relative, f"became {_file_kind(mode)} after it was listed; remove it")
                os.set_blocking(source.fileno(), True)
                with part.open("wb") as target:
                    while hasher.n_bytes <= size and (chunk := source.read(min(CHUNK_BYTES, size + 1 - hasher.n_bytes))):
                        target.write(chunk)
                        hasher.update(chunk)
            if hasher.n_bytes != size:
                raise DownloadError(
                    f"{relative}: {full} changed while it was copied (listed with {size} bytes, read "
                    f"{'more' if hasher.n_bytes > size else hasher.n_bytes}); re-run provisioning once it is stable"
                )
            shutil.copystat(full, part, follow_symlinks=True)
            return _Fetched(name=None, size=hasher.n_bytes, sha256=hasher.sha256.hexdigest())

        return fetch


def _backend(source: Source, http: _Http, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
             ) -> _HubBackend | _DriveBackend | _LocalBackend:
    if isinstance(source, HubSource):
        return _HubBackend(source, http, max_file_bytes)
    if isinstance(source, GoogleDriveSource):
        return _DriveBackend(source, http, max_file_bytes)
    if isinstance(source, LocalSource):
        return _LocalBackend(source)
    raise TypeError(f"unsupported source type {type(source).__name__}")


# ---- the provisioning engine ---------------------------------------------------------------------


def _folder_problems(dest: Path, manifest: dict[str, Any], check: str) -> tuple[dict[str, str], list[str]]:
    """Files of ``dest`` that differ from its manifest: ``(relative path -> reason, files re-hashed)``.

    ``check``: ``"size"`` compares sizes only; ``"stat"`` sizes and modification times, hashing (sha256) only
    a file whose time differs from the manifest's or that the manifest has no time for; ``"full"`` hashes
    every file. Every mode also reports a leftover ``.part`` download and any file the manifest does not list
    (ddr's own ``.ddr_*`` files aside). The second list names the files that were hashed in ``"stat"`` mode
    and matched (their times changed, their content did not).
    """
    problems: dict[str, str] = {}
    rehashed: list[str] = []
    for relative, entry in manifest["files"].items():
        local = dest / relative
        try:
            info = local.lstat()
        except OSError:
            problems[relative] = "missing"
            continue
        if not stat_module.S_ISREG(info.st_mode):
            problems[relative] = "replaced by a link or something else than a regular file"
        elif info.st_size != entry["size"]:
            problems[relative] = f"size {info.st_size} differs from the manifest's {entry['size']}"
        elif (dest / (relative + PART_SUFFIX)).exists():
            problems[relative] = "a leftover .part file"
        elif check == "full" or (check == "stat" and info.st_mtime_ns != entry.get("mtime_ns")):
            if _hash_file(local).sha256.hexdigest() != entry["sha256"]:
                problems[relative] = "changed on disk since it was provisioned (sha256 differs from the manifest)"
            elif check == "stat":
                rehashed.append(relative)
    for relative in _extra_files(dest, manifest["files"]):
        if relative.endswith(PART_SUFFIX) and relative[: -len(PART_SUFFIX)] in problems:
            continue  # already reported as the leftover of its file
        problems[relative] = "not in the manifest (added after provisioning)"
    return problems, rehashed


def _intact_problems(dest: Path, manifest: dict[str, Any], verify: bool) -> dict[str, str]:
    """Files of the manifest that are missing or differ from it, and files it does not list: path -> reason."""
    return _folder_problems(dest, manifest, "full" if verify else "size")[0]


_ASSET_OF_KIND_FOLDER = {"models": "models", "saes": "saes", "prompts": "prompt_datasets"}


def reprovision_hint(folder: str | Path) -> str:
    """How to re-provision ``folder``: the exact ``dagster asset materialize`` command when it is a data root's
    ``assets/<models|saes|prompts>/<name>`` folder, else a general instruction."""
    from ddr_core.paths import is_safe_name

    folder = Path(folder)
    kind_dir = folder.parent
    asset = _ASSET_OF_KIND_FOLDER.get(kind_dir.name)
    if asset is not None and kind_dir.parent.name == "assets" and is_safe_name(folder.name):
        return (
            f"re-provision it (only the files that differ are fetched again): `dagster asset materialize "
            f"-m dagster_project.definitions --select {asset} --partition {folder.name}`"
        )
    return f"re-provision it (provision its source into {folder} again), or delete {folder} and provision it anew"


_UNVERIFIED_WARNED: set[str] = set()
_REHASHED_WARNED: set[tuple[str, tuple[str, ...]]] = set()


def verify_provisioned(folder: str | Path, *, what: str = "provisioned folder", full: bool = False) -> str | None:
    """Check a provisioned folder against its manifest before its files are used; returns its content hash.

    A cheap check by default: every file of the manifest is there as a regular file with its size and
    modification time; a file whose time differs (or an old manifest without times) is hashed and compared
    with the manifest's sha256. ``full`` hashes every file. Any file the manifest does not list is an error
    too (it could be loaded in place of, or beside, what was provisioned). A content change that keeps both
    size and modification time (a deliberate ``touch -r``) passes the cheap check; ``full`` catches it.

    A folder without a manifest (the tiny model built by tests or benchmarks, a folder copied by hand) is
    used as it is, with one logged warning per folder: nothing says what it should hold.

    Returns:
        The manifest's content hash (sha256 over the sorted ``(path, sha256)`` pairs), or ``None`` when the
        folder has no manifest.

    Raises:
        ProvisionedFolderChangedError: naming every differing file and the command that re-provisions.
    """
    root = Path(folder)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists() and not manifest_path.is_symlink():
        key = str(root.resolve())
        if key not in _UNVERIFIED_WARNED:
            _UNVERIFIED_WARNED.add(key)
            logger.warning(
                "%s %s has no provisioning manifest (%s): its files are used unchecked. Provision it (the "
                "models / saes assets) to have it checked at every load.", what, root, MANIFEST_NAME
            )
        return None
    manifest = read_manifest(root) if stat_module.S_ISREG(manifest_path.lstat().st_mode) else None
    if manifest is None:
        raise ProvisionedFolderChangedError(
            f"{what} {root}: its manifest {MANIFEST_NAME} is damaged (not a JSON object listing each file's "
            f"size and sha256), so its files cannot be checked; {reprovision_hint(root)}"
        )
    problems, rehashed = _folder_problems(root, manifest, "full" if full else "stat")
    if problems:
        shown = sorted(problems.items())
        listed = "; ".join(f"{relative}: {reason}" for relative, reason in shown[:10])
        more = f"; and {len(shown) - 10} more" if len(shown) > 10 else ""
        raise ProvisionedFolderChangedError(
            f"{what} {root} does not match what was provisioned ({MANIFEST_NAME}): {listed}{more}. Its files "
            f"are not used. To use what was provisioned, {reprovision_hint(root)}; to use a changed model on "
            "purpose, change its source in the config and provision that"
        )
    if rehashed and (str(root.resolve()), tuple(sorted(rehashed))) not in _REHASHED_WARNED:
        _REHASHED_WARNED.add((str(root.resolve()), tuple(sorted(rehashed))))
        logger.warning(
            "%s %s: %d file(s) have other modification times than when provisioned but the same content "
            "(each load hashes them again); re-provisioning records the new times: %s",
            what, root, len(rehashed), ", ".join(sorted(rehashed)[:5]),
        )
    return content_hash_of(manifest["files"])


def provisioned_content_hash(folder: str | Path) -> str | None:
    """The content hash of ``folder``'s manifest (``None`` without one); no check (see :func:`verify_provisioned`)."""
    manifest = read_manifest(folder)
    return content_hash_of(manifest["files"]) if manifest is not None else None


def check_intact(dest_dir: str | Path, verify: bool = True) -> ProvisionResult | None:
    """The result of an intact provisioned copy at ``dest_dir`` (``skipped=True``), or ``None``.

    Intact: a manifest is present and every file it lists is there with its size (and sha256 when
    ``verify``), with no leftover partial download and no file it does not list. When ``verify`` found it
    intact, the files' current modification times are recorded in the manifest (an old manifest has none),
    so :func:`verify_provisioned` stays a stat-only check.
    """
    dest = Path(dest_dir)
    manifest = read_manifest(dest)
    if manifest is None or _intact_problems(dest, manifest, verify):
        return None
    if verify:
        _refresh_times(dest, manifest, logger.info)
    return _result(dest, manifest["files"], skipped=True, fetched=[], refetched=[])


def provision(
    source: Source,
    dest_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    verify: bool = True,
    attempts: int = DOWNLOAD_ATTEMPTS,
    timeout_s: float = HTTP_TIMEOUT_S,
    lock_wait: bool | float = True,
    lock_owner: str = "",
    max_file_bytes: int | None = None,
) -> ProvisionResult:
    """Make ``dest_dir`` an intact copy of ``source`` (see the module docstring for the guarantees).

    One provisioning at a time per destination: the run holds the lock file ``.<dest name>.lock``
    beside ``dest_dir`` throughout. A second run waits for it (``lock_wait``: ``True`` without limit, a
    number of seconds, or ``False`` to fail at once with :class:`~ddr_core.locks.PartitionLockedError`
    naming the holder), then finds the intact copy and skips, so two downloads never write the same
    partial files.

    Args:
        source: a :class:`HubSource`, :class:`GoogleDriveSource` or :class:`LocalSource`.
        dest_dir: destination folder (created).
        progress: called with one human-readable line per step (default: this module's logger).
        verify: hash existing files against the manifest / source (off: sizes only).
        attempts: tries per file before a truncated or corrupt download is an error.
        timeout_s: socket timeout per HTTP request.
        lock_wait, lock_owner: see above; the owner text is shown to a run that finds the lock held.
        max_file_bytes: most bytes a downloaded file may have when neither the source's listing nor the server
            states its size (default ``$DDR_MAX_DOWNLOAD_BYTES``, else :data:`DEFAULT_MAX_FILE_BYTES`).

    Raises:
        SourceNotFoundError: a local source path does not exist.
        UnsafeSourceError: a local source holds a link out of it or in a loop, or a FIFO / device file.
        DownloadError: listing failed, or files could not be fetched intact (every failing file is
            named; the files that did arrive stay in place, so a re-run fetches only the rest).
    """
    report = progress or logger.info
    dest = Path(dest_dir)
    description = source.describe()
    token = (os.environ.get("HF_TOKEN") or None) if isinstance(source, HubSource) else None
    token_url = hub_endpoint(source) if isinstance(source, HubSource) else None
    http = _Http(token=token, timeout=timeout_s, token_url=token_url)
    backend = _backend(source, http, _max_file_bytes(max_file_bytes))  # raises early for a missing local path

    dest.mkdir(parents=True, exist_ok=True)
    with partition_lock(dest.parent / f".{dest.name}.lock", wait=lock_wait,
                        owner=lock_owner or f"provisioning {_describe(description)}"):
        return _provision_locked(dest, description, backend, report, verify, attempts)


def _max_file_bytes(given: int | None) -> int:
    if given is not None:
        if not _is_count(given) or given == 0:
            raise ValueError(f"max_file_bytes must be a positive whole number of bytes, got {given!r}")
        return given
    text = os.environ.get(MAX_DOWNLOAD_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_FILE_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ProvisionError(
            f"{MAX_DOWNLOAD_BYTES_ENV} is {text!r}; use a positive whole number of bytes (e.g. {DEFAULT_MAX_FILE_BYTES})"
        )
    return value


def _provision_locked(dest: Path, description: dict[str, Any], backend: Any, report: ProgressFn, verify: bool,
                      attempts: int) -> ProvisionResult:
    manifest = read_manifest(dest)
    same_source = manifest is not None and manifest.get("source") == description
    listing: list[_RemoteFile] | None = None
    if same_source:
        assert manifest is not None
        problems = _intact_problems(dest, manifest, verify)
        if isinstance(backend, _LocalBackend):
            listing = backend.list_files()
            now = {f.path: f.stamp for f in listing}
            recorded = {path: entry.get("stamp") for path, entry in manifest["files"].items()}
            if now != recorded:
                problems.setdefault("(source)", "the local source changed since it was copied")
        if not problems:
            if verify:
                _refresh_times(dest, manifest, report)
            report(
                f"intact copy of {_describe(description)} at {dest}: {len(manifest['files'])} files, skipping"
            )
            return _result(dest, manifest["files"], skipped=True, fetched=[], refetched=[])
        for relative, reason in sorted(problems.items()):
            report(f"{relative}: {reason}")
    elif manifest is not None:
        report(
            f"{dest} holds a copy of a different source ({_describe(manifest.get('source', {}))}); updating it"
        )
    previous_files: dict[str, dict[str, Any]] = manifest["files"] if same_source and manifest else {}

    report(f"listing {_describe(description)}")
    if listing is None:
        listing = backend.list_files()
    named = [remote.path for remote in listing if remote.path is not None]
    duplicates = sorted({path for path in named if named.count(path) > 1})
    if duplicates:
        raise ProvisionError(
            f"{_describe(description)} lists several files at the same path: {', '.join(duplicates)}"
        )
    (dest / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the copy is not known to be complete

    files: dict[str, dict[str, Any]] = {}
    fetched: list[str] = []
    refetched: list[str] = []
    failures: list[str] = []
    for remote in listing:
        kept = _keep_existing(dest, remote, previous_files, verify)
        if isinstance(kept, dict):
            assert remote.path is not None
            files[remote.path] = kept
            continue
        reason = kept
        was_present = remote.path is not None and (
            (dest / remote.path).exists() or (dest / (remote.path + PART_SUFFIX)).exists()
        )
        report(
            f"fetching {remote.label} ({_format_bytes(remote.size)})" + (f": {reason}" if was_present else "")
        )
        try:
            relative, entry = _fetch_one(dest, remote, attempts, report)
        except DownloadError as error:
            failures.append(str(error))
            report(f"failed: {error}")
            continue
        files[relative] = entry
        fetched.append(relative)
        if was_present:
            refetched.append(relative)

    if failures:
        raise DownloadError(
            f"{len(failures)} of {len(listing)} file(s) of {_describe(description)} could not be fetched into {dest}: "
            + "; ".join(failures)
            + ". Files that arrived intact are kept; re-run provisioning to fetch only the rest."
        )
    pruned = _prune_extras(dest, files)
    if pruned:
        report(f"removed {len(pruned)} file(s) the source does not hold: {', '.join(pruned[:10])}")
    new_manifest = {
        "version": MANIFEST_VERSION,
        "source": description,
        "files": dict(sorted(files.items())),
        "content_hash": content_hash_of(files),
        "n_files": len(files),
        "n_bytes": sum(entry["size"] for entry in files.values()),
    }
    for relative in files:
        (dest / (relative + PART_SUFFIX)).unlink(missing_ok=True)
    for leftover in dest.glob(f".download-*{PART_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    atomic_write_json(dest / MANIFEST_NAME, new_manifest)
    report(
        f"provisioned {len(files)} files ({_format_bytes(new_manifest['n_bytes'])}) into {dest}; "
        f"fetched {len(fetched)}, re-fetched {len(refetched)}"
    )
    return _result(dest, files, skipped=False, fetched=fetched, refetched=refetched)


def _refresh_times(dest: Path, manifest: dict[str, Any], report: ProgressFn) -> None:
    """Record the current modification times in the manifest of a copy whose every file was just hashed and
    found intact (a manifest of version 1 has none; a touched file has another), so loads stay cheap."""
    files = manifest["files"]
    times = {relative: (dest / relative).stat().st_mtime_ns for relative in files}
    if all(files[relative].get("mtime_ns") == times[relative] for relative in files):
        return
    refreshed = dict(manifest, version=MANIFEST_VERSION,
                     files={relative: dict(entry, mtime_ns=times[relative]) for relative, entry in files.items()})
    atomic_write_json(dest / MANIFEST_NAME, refreshed)
    report(f"recorded the files' modification times in {dest / MANIFEST_NAME} (content verified)")


def _prune_extras(dest: Path, files: dict[str, Any]) -> list[str]:
    """Remove what ``dest`` holds beyond ``files`` (left by an earlier source, or added by hand): a provisioned
    folder holds exactly what its manifest lists, so nothing unlisted can be loaded from it."""
    extras = _extra_files(dest, files)
    for relative in extras:
        (dest / relative).unlink(missing_ok=True)
    for directory in sorted((p for p in dest.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        try:
            directory.rmdir()  # only empty folders
        except OSError:
            pass
    return extras


def _keep_existing(
    dest: Path, remote: _RemoteFile, previous: dict[str, dict[str, Any]], verify: bool
) -> dict[str, Any] | str:
    """The manifest entry for a local file that can be kept, or the reason it must be fetched."""
    if remote.path is None:
        # Drive file named by the server: keep a single previous file that is still intact.
        if len(previous) == 1:
            ((name, entry),) = previous.items()
            local = dest / name
            if (
                local.is_file()
                and not local.is_symlink()
                and local.stat().st_size == entry["size"]
                and (not verify or _hash_file(local).sha256.hexdigest() == entry["sha256"])
            ):
                remote.path = name
                if verify:
                    return _file_entry(local, entry["size"], entry["sha256"], entry.get("stamp"))
                return {k: v for k, v in entry.items() if k != "mtime_ns" or v == local.stat().st_mtime_ns}
        return "not present"
    local = dest / remote.path
    if (dest / (remote.path + PART_SUFFIX)).exists() and not local.exists():
        return "an incomplete download (.part) was left over"
    if local.is_symlink():
        return "replaced by a link"
    if not local.is_file():
        return "missing"
    size = local.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"size {size} differs from the source's {remote.size}"
    entry = previous.get(remote.path)
    if entry is not None and size != entry.get("size"):
        return f"size {size} differs from the manifest's {entry.get('size')}"
    if not verify and entry is not None and entry.get("stamp") == remote.stamp:
        # not hashed: keep the recorded time only if the file still has it (else a load hashes it)
        kept = {"size": size, "sha256": entry["sha256"]}
        if entry.get("mtime_ns") == local.stat().st_mtime_ns:
            kept["mtime_ns"] = entry["mtime_ns"]
        return {**kept, **({"stamp": remote.stamp} if remote.stamp else {})}
    hashed = _hash_file(local, with_git_sha1=remote.git_sha1 is not None)
    sha256 = hashed.sha256.hexdigest()
    if remote.sha256 is not None:
        if sha256 != remote.sha256:
            return "content differs from the source (sha256)"
    elif remote.git_sha1 is not None:
        if hashed.git_sha1 is None or hashed.git_sha1.hexdigest() != remote.git_sha1:
            return "content differs from the source (git blob hash)"
    elif remote.sha256_fn is not None:
        if sha256 != remote.sha256_fn():
            return "content differs from the source"
    elif entry is not None and sha256 != entry.get("sha256"):
        return "changed on disk since it was provisioned (sha256 differs from the manifest)"
    return _file_entry(local, size, sha256, remote.stamp)


def _fetch_one(
    dest: Path, remote: _RemoteFile, attempts: int, report: ProgressFn
) -> tuple[str, dict[str, Any]]:
    """Download ``remote`` into ``<path>.part``, verify, rename; retried on truncation/corruption."""
    staging_name = remote.path or f".download-{hashlib.sha1(remote.label.encode()).hexdigest()[:12]}"
    last_reason = ""
    for attempt in range(1, max(1, attempts) + 1):
        part = dest / (staging_name + PART_SUFFIX)
        try:
            result = remote.fetch(part)
            if remote.sha256 is not None and result.sha256 != remote.sha256:
                raise _Corrupt(
                    f"{remote.label}: sha256 {result.sha256} differs from the source's {remote.sha256}"
                )
            if (
                remote.git_sha1 is not None
                and result.git_sha1 is not None
                and result.git_sha1 != remote.git_sha1
            ):
                raise _Corrupt(
                    f"{remote.label}: git blob hash {result.git_sha1} differs from the source's {remote.git_sha1}"
                )
        except (_Truncated, _Corrupt) as error:
            part.unlink(missing_ok=True)
            last_reason = str(error)
            if attempt < attempts:
                report(f"attempt {attempt}/{attempts} failed: {error}; retrying")
                time.sleep(RETRY_BACKOFF_S * attempt)
            continue
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        relative = remote.path or _safe_relative_path(_sanitize_name(result.name or remote.label))
        final = dest / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        return relative, _file_entry(final, result.size, result.sha256, remote.stamp)
    raise DownloadError(f"{last_reason} after {attempts} attempt(s)")


def _result(
    dest: Path, files: dict[str, dict[str, Any]], *, skipped: bool, fetched: list[str], refetched: list[str]
) -> ProvisionResult:
    return ProvisionResult(
        path=dest,
        n_files=len(files),
        n_bytes=sum(int(entry["size"]) for entry in files.values()),
        content_hash=content_hash_of(files),
        skipped=skipped,
        fetched=fetched,
        refetched=refetched,
    )


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
