"""A local file or folder, copied file by file without following links out of it or in loops."""

from __future__ import annotations

import os
import shutil
import stat as stat_module
from collections.abc import Callable
from pathlib import Path

from ddr_core.atomic import widen_to_umask
from ddr_core.provisioning.manifest import _hash_file, _Hasher
from ddr_core.provisioning.sources import (
    CHUNK_BYTES,
    MANIFEST_NAME,
    PART_SUFFIX,
    DownloadError,
    LocalSource,
    SourceNotFoundError,
    UnsafeSourceError,
    _Fetched,
    _RemoteFile,
)


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
            widen_to_umask(part)  # copystat copied the source's mode (0600 from safetensors, a private cache)
            return _Fetched(name=None, size=hasher.n_bytes, sha256=hasher.sha256.hexdigest())

        return fetch
