"""The provisioning manifest: hashing, reading and checking a provisioned folder against it.

``<dest>/.ddr_manifest.json`` maps each relative path to its size, sha256 and mtime (ns); its ``content_hash``
is the sha256 over the sorted ``(path, sha256)`` pairs. :func:`verify_provisioned` checks a folder before its
files are used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat as stat_module
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddr_core.provisioning.sources import (
    CHUNK_BYTES,
    MANIFEST_NAME,
    PART_SUFFIX,
    RESERVED_PREFIX,
    ProvisionedFolderChangedError,
    ProvisionError,
    _is_count,
    _safe_relative_path,
)

logger = logging.getLogger(__name__)


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
