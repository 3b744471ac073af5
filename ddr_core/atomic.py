"""Atomic file and directory writes.

A reader never sees a half-written file: everything is written to a temporary sibling
(``.<name>.tmp-<pid>-<random>`` in the same directory, hence on the same file system), flushed to
disk with ``fsync`` and then moved over the destination with ``os.replace``. On failure the temporary
is deleted and the previous file, if any, is left untouched. An ``OSError`` (a full disk, ``ENOSPC``,
a read-only file system, ...) is re-raised as the same ``OSError`` subclass and errno, with a message
naming the destination.

Writers that want a file name (``pyarrow.parquet.write_table``, ``safetensors.numpy.save_file``,
``PIL.Image.Image.save``, ``duckdb.connect``) use :func:`atomic_path`::

    with atomic_path(out / "table.parquet") as tmp:
        pq.write_table(table, tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TEMP_MARKER = ".tmp-"


def temp_sibling(path: Path) -> Path:
    """A fresh temporary path next to ``path``: ``<dir>/.<name>.tmp-<pid>-<random>``."""
    return path.parent / f".{path.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary made by this module (left behind by a crashed writer)."""
    return name.startswith(".") and TEMP_MARKER in name


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path``; silently skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _reraise_naming(error: OSError, path: Path, what: str) -> None:
    """Raise ``error`` again (same class and errno) with a message that names ``path``."""
    reason = error.strerror or str(error)
    message = f"could not write {what} {path}: {reason}; the previous version (if any) is left intact"
    if error.errno is not None:
        raise type(error)(error.errno, message) from error
    raise type(error)(message) from error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination's directory; on success it replaces ``path``.

    The body must create the file at the yielded path. It is fsynced and moved over ``path`` with
    ``os.replace`` when the body returns, and deleted when the body raises. Parent directories are
    created. An ``OSError`` is re-raised with the destination in its message.
    """
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(destination)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer did not create the temporary file for {destination}")
        _fsync_file(tmp)
        os.replace(tmp, destination)
        _fsync_dir(destination.parent)
    except OSError as error:
        _remove(tmp)
        _reraise_naming(error, destination, "file")
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``path`` as a whole when the body succeeds.

    An existing directory at ``path`` is replaced only after the new one is complete: it is first
    renamed aside, the new one renamed in, then the old one deleted. On failure the temporary
    directory is deleted and ``path`` is untouched.
    """
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(destination)
    tmp.mkdir()
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
        old = None
        if destination.exists():
            old = temp_sibling(destination)
            os.replace(destination, old)
        try:
            os.replace(tmp, destination)
        except BaseException:
            if old is not None:
                os.replace(old, destination)
            raise
        _fsync_dir(destination.parent)
        if old is not None:
            _remove(old)
    except OSError as error:
        _remove(tmp)
        _reraise_naming(error, destination, "directory")
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the destination."""
    destination = Path(path)
    with atomic_path(destination) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
    return destination


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the destination."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (keys sorted, trailing newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def remove_temporaries_of(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temporaries of the files ``names`` in ``folder`` (``.<name>.tmp-<pid>-<random>``, left by
    killed writers). Only call it while no other writer can be writing those files (e.g. holding their
    claim, :func:`ddr_core.locks.claim_channels`). Returns what was removed."""
    folder = Path(folder)
    wanted = set(names)
    removed = []
    for path in folder.iterdir() if folder.is_dir() else []:
        if is_temp_name(path.name) and path.name[1:].split(TEMP_MARKER)[0] in wanted:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_temp_files(directory: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Delete temporaries left in ``directory`` by crashed writers; returns what was removed.

    Only call this when no writer is running on ``directory``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed: list[Path] = []
    candidates = directory.rglob(".*") if recursive else directory.glob(".*")
    for candidate in sorted(candidates, key=lambda p: len(p.parts)):
        if is_temp_name(candidate.name) and (candidate.exists() or candidate.is_symlink()):
            _remove(candidate)
            removed.append(candidate)
    return removed
