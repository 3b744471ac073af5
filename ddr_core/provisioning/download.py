"""What every download shares, whatever the source: origins, the size bound and streaming into ``<name>.part``.

A download never reads more bytes than the file may have: the size the source lists, else the size the server
announces, else ``max_file_bytes`` (``DDR_MAX_DOWNLOAD_BYTES``, default :data:`DEFAULT_MAX_FILE_BYTES`).
A body longer than that, or a ``Content-Length`` other than the listed size, is a :class:`DownloadError` at
once and not retried; a body cut short is :class:`_Truncated` (retried by the engine).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ddr_core.provisioning.manifest import _Hasher
from ddr_core.provisioning.sources import (
    CHUNK_BYTES,
    DEFAULT_MAX_FILE_BYTES,
    MAX_DOWNLOAD_BYTES_ENV,
    DownloadError,
    ProvisionError,
    _Fetched,
    _is_count,
)

Reader = Callable[[int], bytes]
"""``read(n)``: at most ``n`` more bytes of a response body, ``b""`` at its end."""


class _Truncated(Exception):
    """A body shorter than announced (retried)."""


class _Corrupt(Exception):
    """Content that does not match what the source lists (retried)."""


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


def _redact(url: str) -> str:
    """The URL without its query string (signed CDN URLs carry credentials there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _parse_length(value: str | None) -> int | None:
    """A ``Content-Length`` header as a byte count (``None`` when absent or not a number)."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def chunk_reader(chunks: Iterable[bytes]) -> Reader:
    """A :data:`Reader` over an iterator of body chunks (an HTTP library's streaming iterator)."""
    iterator: Iterator[bytes] = iter(chunks)
    buffer = b""

    def read(n: int) -> bytes:
        nonlocal buffer
        while not buffer:
            chunk = next(iterator, None)
            if chunk is None:
                return b""
            buffer = chunk
        out, buffer = buffer[:n], buffer[n:]
        return out

    return read


def _stream_to(read: Reader, broken_errors: tuple[type[BaseException], ...], handle: BinaryIO, hasher: _Hasher,
               limit: int) -> str | None:
    """Copy the body into ``handle``, reading at most ``limit + 1`` bytes (one more than allowed shows that the
    body is too long, and the rest is never read); returns a failure reason when the connection broke."""
    while hasher.n_bytes <= limit:
        try:
            chunk = read(min(CHUNK_BYTES, limit + 1 - hasher.n_bytes))
        except broken_errors as error:
            return f"connection broke ({type(error).__name__})"
        if not chunk:
            return None
        handle.write(chunk)
        hasher.update(chunk)
    return None


def save_body(
    read: Reader,
    broken_errors: tuple[type[BaseException], ...],
    content_length_header: str | None,
    part: Path,
    label: str,
    expected_size: int | None,
    git_size: int | None = None,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> _Fetched:
    """Stream a response body (``read``) into ``part``, never reading more than the file may have.

    The bound is the size the source lists (``expected_size``), else the ``Content-Length``, else
    ``max_bytes``. A body longer than it, a ``Content-Length`` other than the listed size or above
    ``max_bytes``, is a :class:`DownloadError` at once (a server that sends another file than it lists does
    so again: not retried); a short body, or one whose connection broke (``broken_errors`` raised by
    ``read``), is :class:`_Truncated` (retried). The caller closes the response.
    """
    content_length = _parse_length(content_length_header)
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
        broken = _stream_to(read, broken_errors, handle, hasher, limit)
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


def max_file_bytes(given: int | None) -> int:
    """The size bound for a file of unlisted size: ``given``, else ``$DDR_MAX_DOWNLOAD_BYTES``, else the default."""
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
