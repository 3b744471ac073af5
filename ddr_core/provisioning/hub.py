"""The Hugging Face hub, through :mod:`huggingface_hub`'s HTTP session, headers and URLs.

Every hub request goes through ``huggingface_hub.get_session()`` (its client, proxies and request hook, so
``HF_HUB_OFFLINE`` blocks it), with headers from ``build_hf_headers`` (huggingface_hub's user agent naming
ddr) and file URLs from ``hf_hub_url``, all pointed at the configured endpoint (``HubSource.endpoint`` /
``HF_ENDPOINT``). What ddr keeps in its own hands, because huggingface_hub does otherwise:

* The token: ``HF_TOKEN`` only, passed explicitly (never huggingface_hub's implicit lookup of a stored
  login), and sent only to the endpoint's origin (scheme, host and port). Redirects are followed here, one
  hop at a time, and the token is dropped for good at the first hop off that origin. (huggingface_hub's own
  tree listing follows a paging ``Link`` to whatever host it names with the token, and its metadata request
  forwards the token to huggingface.co from any endpoint.)
* The tree listing and its paging: a ``Link: next`` to another origin is refused; a page longer than
  :data:`MAX_LISTING_BYTES` is refused; entries are type-checked and their paths kept inside the folder.
* The body: read through :func:`~ddr_core.provisioning.download.save_body`, never past the size the listing
  gives (``hf_hub_download`` reads whatever the server sends), into ddr's ``<name>.part``, with no
  huggingface_hub cache (nothing is written to ``~/.cache/huggingface``).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import hf_hub_url
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import build_hf_headers, get_session

from ddr_core.provisioning.download import _redact, chunk_reader, save_body, url_origin
from ddr_core.provisioning.manifest import _SHA256_RE
from ddr_core.provisioning.sources import (
    DEFAULT_HF_ENDPOINT,
    DEFAULT_MAX_FILE_BYTES,
    HTTP_TIMEOUT_S,
    DownloadError,
    HubSource,
    ProvisionError,
    _Fetched,
    _is_count,
    _RemoteFile,
    _safe_relative_path,
)

MAX_LISTING_BYTES = 64 << 20
"""Most bytes read from one page of a hub tree listing (a hostile endpoint could send an endless one)."""
MAX_REDIRECTS = 10
_BROKEN = (httpx2.TransportError, httpx2.StreamError, OSError)
"""What reading an httpx2 response body raises when the connection breaks."""
_HUB_ERROR_HINTS = {
    # the hub's X-Error-Code header, which huggingface_hub's error classes are built from
    "GatedRepo": " (gated repo: accept its licence on the hub page, then set HF_TOKEN to a token of that account)",
    "RepoNotFound": " (repo not found: check the repo id and repo_type; a private repo needs HF_TOKEN)",
    "RevisionNotFound": " (revision not found: check the revision, a branch, tag or commit of the repo)",
    "EntryNotFound": " (file not found at this revision: check the revision)",
}


_HTTP_LOGGERS = ("httpx2", "httpcore2.connection", "httpcore2.http11", "httpcore2.http2", "httpcore2.proxy",
                 "httpcore2.socks", "huggingface_hub.utils._http")
"""Loggers a hub request may log its URL (or a redirect's ``Location``) to, at INFO or DEBUG."""
_QUERY_RE = re.compile(r"""([a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'"<>]*)\?[^\s#'"<>]*""")


class _RedactQueries(logging.Filter):
    """Drops the query string of every URL in a log line: a signed CDN URL carries its credentials there."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _QUERY_RE.sub(r"\1?<query removed>", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_REDACT_QUERIES = _RedactQueries()


def _redact_http_logs() -> None:
    """Keep signed CDN URLs out of the HTTP libraries' own log lines (httpx2 logs every URL at INFO)."""
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT_QUERIES not in logger.filters:
            logger.addFilter(_REDACT_QUERIES)


def _ddr_version() -> str:
    try:
        return importlib.metadata.version("ddr")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
    """Lists a hub repo at a revision (tree API, ddr's paging) and fetches its files (resolve URLs)."""

    def __init__(self, source: HubSource, timeout: float = HTTP_TIMEOUT_S,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.source = source
        self.endpoint = hub_endpoint(source)
        self.origin = url_origin(self.endpoint)
        self.token = os.environ.get("HF_TOKEN") or None
        self.timeout = timeout
        self.max_file_bytes = max_file_bytes
        _redact_http_logs()

    # ---- HTTP -----------------------------------------------------------------------------------

    def _headers(self, with_token: bool) -> dict[str, str]:
        """huggingface_hub's headers; the token only when asked (``token=False`` turns its implicit lookup off)."""
        token: str | bool = self.token if with_token and self.token else False
        headers = build_hf_headers(token=token, library_name="ddr", library_version=_ddr_version())
        headers["Accept-Encoding"] = "identity"  # sizes and hashes are of the bytes as stored
        return headers

    @contextmanager
    def _open(self, url: str, what: str) -> Iterator[httpx2.Response]:
        """A streamed ``GET`` of ``url`` through huggingface_hub's session, redirects followed here.

        The token goes with a request only while every hop so far stayed on the endpoint's origin: a
        redirect to a CDN, another port, http vs https, or a hop through another host and back drops it.
        """
        token_kept = True
        for _ in range(MAX_REDIRECTS + 1):
            token_kept = token_kept and url_origin(url) == self.origin
            stack = ExitStack()
            try:
                response = stack.enter_context(get_session().stream(
                    "GET", url, headers=self._headers(token_kept), follow_redirects=False, timeout=self.timeout
                ))
            except OfflineModeIsEnabled:
                raise DownloadError(
                    f"{what}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network request; unset it to "
                    "provision from the hub, or provision from a local source"
                ) from None
            except httpx2.HTTPError as error:
                raise DownloadError(
                    f"{what}: could not connect to {_redact(url)} ({type(error).__name__}); check the network"
                ) from None
            with stack:
                if response.has_redirect_location:
                    url = urllib.parse.urljoin(str(response.url), response.headers["Location"])
                    continue
                if response.status_code >= 400:
                    raise self._http_error(response, url, what)
                yield response
                return
        raise DownloadError(f"{what}: more than {MAX_REDIRECTS} redirects from {_redact(url)}")

    def _http_error(self, response: httpx2.Response, url: str, what: str) -> DownloadError:
        """The error for an HTTP error status, naming the fix; the body is not read (it could be endless)."""
        code = response.status_code
        hint = _HUB_ERROR_HINTS.get(response.headers.get("X-Error-Code", ""), "")
        if not hint and code in (401, 403):
            hint = (
                " (access denied: for a gated or private hub repo accept its licence and set HF_TOKEN)"
                if self.token is None
                else " (access denied with the HF_TOKEN that is set: check it grants read access)"
            )
        elif not hint and code == 404:
            hint = " (not found: check the repo id / revision / file id)"
        return DownloadError(f"{what}: HTTP {code} {response.reason_phrase} from {_redact(url)}{hint}")

    # ---- listing --------------------------------------------------------------------------------

    def _read_page(self, response: httpx2.Response, what: str) -> bytes:
        body = bytearray()
        try:
            for chunk in response.iter_raw():
                body += chunk
                if len(body) > MAX_LISTING_BYTES:
                    raise DownloadError(
                        f"{what}: a tree API page is longer than {MAX_LISTING_BYTES} bytes; stopped reading "
                        "(check the endpoint)"
                    )
        except _BROKEN as error:
            raise DownloadError(f"{what}: the connection broke ({type(error).__name__}); try again") from None
        return bytes(body)

    def _tree_pages(self) -> Iterator[list[dict[str, Any]]]:
        s = self.source
        what = f"listing hub repo {s.repo_id}@{s.revision}"
        revision = urllib.parse.quote(s.revision, safe="")
        url: str | None = f"{self.endpoint}/api/{s.repo_type}s/{s.repo_id}/tree/{revision}?recursive=true"
        while url:
            with self._open(url, what) as response:
                body = self._read_page(response, what)
                next_link = response.links.get("next", {}).get("url")
                page_url = str(response.url)
            try:
                page = json.loads(body)
            except ValueError as error:
                raise DownloadError(f"{what}: the tree API returned invalid JSON ({error})") from None
            if not isinstance(page, list):
                raise DownloadError(f"{what}: expected a JSON list from the tree API, got {type(page).__name__}")
            yield page
            url = urllib.parse.urljoin(page_url, next_link) if next_link else None
            if url is not None and url_origin(url) != self.origin:
                raise DownloadError(
                    f"{what}: the tree API's paging Link header points to {_redact(url)}, another origin (scheme, "
                    f"host or port) than the endpoint {self.endpoint}; refusing to follow it, the HF_TOKEN must not "
                    "leave the endpoint (the hub pages on its own host, so this endpoint or a proxy is "
                    "misbehaving: check HF_ENDPOINT / HubSource.endpoint)"
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
                files.append(_RemoteFile(path=path, size=size, sha256=sha256, git_sha1=git_sha1,
                                         fetch=self._fetcher(path, size, sha256 is None), label=path))
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

    # ---- download -------------------------------------------------------------------------------

    def _fetcher(self, path: str, size: int, git_hashed: bool) -> Callable[[Path], _Fetched]:
        s = self.source
        url = hf_hub_url(s.repo_id, path, repo_type=s.repo_type, revision=s.revision, endpoint=self.endpoint)

        def fetch(part: Path) -> _Fetched:
            with self._open(url, f"downloading {path} from {s.repo_id}") as response:
                return save_body(
                    chunk_reader(response.iter_raw()), _BROKEN, response.headers.get("Content-Length"), part, path,
                    expected_size=size, git_size=size if git_hashed else None, max_bytes=self.max_file_bytes,
                )

        return fetch
