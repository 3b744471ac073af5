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
import stat
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


def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc/self/status``); elsewhere set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    value = os.umask(0o022)
    os.umask(value)
    return value


def widen_to_umask(path: str | os.PathLike[str], umask: int | None = None) -> None:
    """Give ``path`` at least the permissions a plain ``open()`` / ``mkdir()`` would have: ``0o666`` (files)
    or ``0o777`` (folders) less the umask. Some writers make files stricter whatever the umask
    (safetensors creates them ``0600``; ``shutil.copystat`` copies a source's ``0600``; ``mkdtemp`` makes
    ``0700``), so under a lab's umask ``0002`` the group could not read a colleague's batches, weights or
    models (docs/DEPLOYMENT.md). Links and other kinds are left alone; no bit is ever removed."""
    mask = current_umask() if umask is None else umask
    info = os.lstat(path)
    if stat.S_ISREG(info.st_mode):
        allowed = 0o666 & ~mask
    elif stat.S_ISDIR(info.st_mode):
        allowed = 0o777 & ~mask
    else:
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode | allowed != mode:
        os.chmod(path, mode | allowed)


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
        widen_to_umask(tmp)
        _fsync_file(tmp)
        os.replace(tmp, destination)
        _fsync_dir(destination.parent)
    except OSError as error:
        _remove(tmp)
        _reraise_naming(error, destination, "file")
    except BaseException:
        _remove(tmp)
        raise


_READY_SUFFIX = ".ready"  # a complete new folder about to be swapped in (fallback swap only)
_OLD_SUFFIX = ".old"  # the previous folder moved aside (fallback swap only)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or file system cannot (then the caller falls back to two renames).
    """
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def recover_dir(path: str | os.PathLike[str], *, remove_leftovers: bool = False) -> list[Path]:
    """Mend what a writer killed inside :func:`atomic_dir`'s swap left; returns what it removed.

    Where two renames were needed (no ``RENAME_EXCHANGE``) a kill between them leaves ``path`` missing
    beside a complete new folder (``.ready``) and the previous one (``.old``): the new one is put in place,
    else the old one. ``remove_leftovers``: also delete every temporary of ``path`` (staging folders,
    swapped-out copies); only while no other writer can be writing ``path`` (hold its lock).
    """
    destination = Path(path)
    parent, prefix = destination.parent, f".{destination.name}{TEMP_MARKER}"
    siblings = sorted((p for p in parent.iterdir() if p.name.startswith(prefix)), key=lambda p: p.stat().st_mtime) \
        if parent.is_dir() else []
    if not destination.exists():
        for suffix in (_READY_SUFFIX, _OLD_SUFFIX):
            found = [p for p in siblings if p.name.endswith(suffix) and p.is_dir()]
            if found:
                os.replace(found[-1], destination)
                _fsync_dir(parent)
                siblings.remove(found[-1])
                break
    removed = []
    if remove_leftovers:
        for leftover in siblings:
            _remove(leftover)
            removed.append(leftover)
    return removed


def _swap_in(tmp: Path, destination: Path) -> None:
    """Put the complete folder ``tmp`` at ``destination``; at every instant one of the two is there."""
    previous = None
    if not destination.exists():
        os.replace(tmp, destination)
    elif _rename_exchange(tmp, destination):  # one step: tmp now holds the previous folder
        previous = tmp
    else:  # two steps, each recoverable by recover_dir: the new folder is marked complete first
        ready = tmp.with_name(tmp.name + _READY_SUFFIX)
        os.replace(tmp, ready)
        previous = tmp.with_name(tmp.name + _OLD_SUFFIX)
        os.replace(destination, previous)
        try:
            os.replace(ready, destination)
        except BaseException:
            os.replace(previous, destination)
            _remove(ready)
            raise
    _fsync_dir(destination.parent)
    if previous is not None:
        _remove(previous)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``path`` as a whole when the body succeeds.

    The new folder replaces an existing one only when complete (every file fsynced), in one atomic
    ``RENAME_EXCHANGE`` where the system has it, else in two renames that :func:`recover_dir` can finish:
    a process killed at any point leaves the old or the new folder at ``path``, never none (a missing one
    left by a kill is restored here, first). On failure the temporary directory is deleted and ``path``
    is untouched.
    """
    destination = Path(path)
    if destination.is_symlink():  # the swap would replace the link itself, moving the data off its target
        from ddr_core.paths import UnsafePathError

        raise UnsafePathError(f"{destination} is a symbolic link (-> {os.readlink(destination)}); "
                                "a folder written as a whole must be a real folder: replace the link by the "
                                "folder it points to, or link a folder higher up (the data root)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(destination)
    tmp = temp_sibling(destination)
    tmp.mkdir()
    try:
        yield tmp
        umask = current_umask()
        for root, dirs, files in os.walk(tmp):
            widen_to_umask(root, umask)
            for name in dirs:
                widen_to_umask(Path(root) / name, umask)
            for name in files:
                widen_to_umask(Path(root) / name, umask)
                _fsync_file(Path(root) / name)
        _swap_in(tmp, destination)
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
