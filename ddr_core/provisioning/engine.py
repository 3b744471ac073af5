"""The provisioning engine: make a destination folder an intact copy of a source (see :mod:`ddr_core.provisioning`)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from ddr_core.atomic import atomic_write_json
from ddr_core.locks import partition_lock
from ddr_core.provisioning.download import _Corrupt, _Truncated
from ddr_core.provisioning.download import max_file_bytes as max_file_bytes_of
from ddr_core.provisioning.gdrive import _DriveBackend
from ddr_core.provisioning.hub import _HubBackend
from ddr_core.provisioning.local import _LocalBackend
from ddr_core.provisioning.manifest import (
    _extra_files,
    _file_entry,
    _hash_file,
    _intact_problems,
    content_hash_of,
    read_manifest,
)
from ddr_core.provisioning.sources import (
    DOWNLOAD_ATTEMPTS,
    HTTP_TIMEOUT_S,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    PART_SUFFIX,
    DownloadError,
    GoogleDriveSource,
    HubSource,
    LocalSource,
    ProgressFn,
    ProvisionError,
    ProvisionResult,
    Source,
    _describe,
    _format_bytes,
    _RemoteFile,
    _safe_relative_path,
    _sanitize_name,
)

logger = logging.getLogger(__name__)

RETRY_BACKOFF_S = 1.0
"""Seconds before the second try of a truncated or corrupt download (times the attempt number)."""


def _backend(source: Source, timeout_s: float, max_file_bytes: int) -> _HubBackend | _DriveBackend | _LocalBackend:
    if isinstance(source, HubSource):
        return _HubBackend(source, timeout_s, max_file_bytes)
    if isinstance(source, GoogleDriveSource):
        return _DriveBackend(source, timeout_s, max_file_bytes)
    if isinstance(source, LocalSource):
        return _LocalBackend(source)
    raise TypeError(f"unsupported source type {type(source).__name__}")


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
    """Make ``dest_dir`` an intact copy of ``source`` (the guarantees: :mod:`ddr_core.provisioning`).

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
    backend = _backend(source, timeout_s, max_file_bytes_of(max_file_bytes))  # raises early for a missing local path

    dest.mkdir(parents=True, exist_ok=True)
    with partition_lock(dest.parent / f".{dest.name}.lock", wait=lock_wait,
                        owner=lock_owner or f"provisioning {_describe(description)}"):
        return _provision_locked(dest, description, backend, report, verify, attempts)


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
