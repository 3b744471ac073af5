"""Partition locks: two runs never write the same asset partition at the same time.

A lock is an ``fcntl.flock`` on a small lock file next to (or inside) the folder it protects. The
kernel releases a ``flock`` when its file descriptor is closed, which also happens when the holding
process dies for any reason (``kill -9``, out-of-memory killer, node reboot), so a crashed run never
leaves a stale lock behind: the lock file may stay on disk, but nobody holds it and the next run takes
it at once. While a run holds the lock, the file holds its owner (pid, host, start time, a free-form
``owner`` string such as the Dagster run id) so that a second run can say who is in its way::

    with partition_lock(layout.timestep_stats_dir("tiny-raw").parent / ".tiny-raw.lock",
                        owner="dagster run 1234abcd"):
        ...  # compute and write the partition

``wait=False`` (default) fails at once with :class:`PartitionLockedError`; ``wait=30`` waits up to 30
seconds; ``wait=True`` waits for as long as it takes.

Scope and limits:

- ``flock`` locks are per open file description: two ``partition_lock`` calls on the same path in one
  process exclude each other too (a nested re-entry fails, it does not deadlock silently).
- Local file systems and NFSv4 (Linux emulates ``flock`` with NFS byte-range locks) work across
  hosts. A file system without ``flock`` support (e.g. Lustre mounted ``-o noflock``) raises
  :class:`LockUnsupportedError` naming the mount, instead of running unprotected.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ddr_core.atomic import atomic_write_json, remove_temp_files

LOCK_FILE_NAME = ".lock"
_POLL_SECONDS = 0.05


class PartitionLockedError(RuntimeError):
    """Another run holds the lock of the partition this run wants to write."""

    def __init__(self, lock_path: Path, holder: dict[str, Any] | None, waited: float | None) -> None:
        self.lock_path = Path(lock_path)
        self.holder = holder or {}
        who = describe_holder(self.holder)
        waited_text = f" (waited {waited:.0f} s)" if waited else ""
        super().__init__(
            f"another run is writing this partition: {who}{waited_text}; lock file "
            f"{self.lock_path}. Wait for that run to finish or stop it, then run again (or pass a lock "
            f"wait to queue behind it). A run that died has released the lock already (the operating "
            f"system drops it with the process), so do not delete the lock file."
        )


class LockUnsupportedError(OSError):
    """The file system holding the lock file does not support ``flock``."""


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host node7 since 2026-11-27T05:10:00+00:00 (dagster run abc)``, or what is known."""
    if not holder:
        return "owner unknown (the lock file holds no owner information yet)"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started_at', '?')}"
    if holder.get("owner"):
        text += f" ({holder['owner']})"
    return text


def read_lock_owner(lock_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The owner information last written into ``lock_path`` (``{}`` if none or unreadable).

    The information is only meaningful while someone holds the lock (see :func:`is_locked`).
    """
    try:
        text = Path(lock_path).read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _flock(fd: int, operation: int, lock_path: Path) -> bool:
    """``flock``; True when taken, False when held by someone else (non-blocking only)."""
    try:
        fcntl.flock(fd, operation)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise LockUnsupportedError(
                error.errno,
                f"cannot lock {lock_path}: the file system does not support flock ({error.strerror}); put the "
                f"data root on a file system with flock support (local disk, NFSv4, Lustre mounted with "
                f"-o flock)",
            ) from error
        raise


class OwnedFlock:
    """One ``flock`` on one lock file, exclusive or shared, whose exclusive holder writes who it is (pid,
    host, start time, owner text) into the file; see :func:`partition_lock`.

    Not the ``filelock`` library: that one has no shared mode, and a run refused by a held lock here is told
    which run holds it. Acquire with :meth:`acquire`, release with :meth:`release` (or use it as a context
    manager).
    """

    def __init__(self, path: str | os.PathLike[str], *, shared: bool = False, owner: str = "") -> None:
        self.path = Path(path)
        self.shared = shared
        self.owner = owner
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool | float = False) -> OwnedFlock:
        """Take the lock; ``wait``: False (fail at once), seconds to wait, or True (forever).

        Raises:
            PartitionLockedError: the lock is held by another run (after ``wait`` seconds).
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this OwnedFlock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0o666 less the umask: under a lab's umask 0002 the group can take the lock too (docs/DEPLOYMENT.md)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        kind = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        start = time.monotonic()
        try:
            if wait is True:
                _flock(fd, kind, self.path)
            else:
                limit = 0.0 if wait is False else float(wait)
                while not _flock(fd, kind | fcntl.LOCK_NB, self.path):
                    waited = time.monotonic() - start
                    if waited >= limit:
                        raise PartitionLockedError(self.path, read_lock_owner(self.path), waited or None)
                    time.sleep(min(_POLL_SECONDS, limit - waited))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if not self.shared:
            self._write_owner()
        return self

    def _write_owner(self) -> None:
        assert self._fd is not None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "owner": self.owner,
        }
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Release the lock (idempotent). The lock file stays; its owner information is cleared."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if not self.shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> OwnedFlock:
        if self._fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock is released when collected
        with contextlib.suppress(Exception):
            self.release()


def is_locked(path: str | os.PathLike[str]) -> bool:
    """Whether someone holds ``path`` exclusively or shared right now (probe; takes nothing)."""
    path = Path(path)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def partition_lock(
    path: str | os.PathLike[str], *, wait: bool | float = False, owner: str = "", shared: bool = False
) -> Iterator[OwnedFlock]:
    """Hold an exclusive (or ``shared``) ``flock`` on the lock file ``path`` for the ``with`` body.

    Args:
        path: the lock file (created with its parents if missing), e.g. ``<stage dir>/.lock``. Put it
            outside a folder that is replaced as a whole (:func:`ddr_core.atomic.atomic_dir`).
        wait: ``False``: fail at once if another run holds it; a number: wait up to that many
            seconds; ``True``: wait without limit.
        owner: free text written into the lock file with pid, host and start time (exclusive only).
        shared: take a shared lock (many holders, excludes exclusive holders).

    Raises:
        PartitionLockedError: the lock is held elsewhere; names the lock file and its owner.
    """
    lock = OwnedFlock(path, shared=shared, owner=owner).acquire(wait)
    try:
        yield lock
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------
# Channel claims: per-channel stages (priors, dreams) where runs on disjoint channels coexist
# --------------------------------------------------------------------------------------------------

LOCKS_SUFFIX = ".locks"
CLAIMS_REGISTRY_LOCK = "registry.lock"
_CLAIM_POLL_SECONDS = 0.1


class ChannelsLockedError(PartitionLockedError):
    """Another live run is writing some of the channels this run wants to write.

    Attributes:
        out_dir: the stage folder; ``channels``: the contested channels; ``lock_path``: the other
        run's claim; ``holder``: its pid, host, start time and owner text.
    """

    def __init__(self, out_dir: Path, channels: list[int], lock_path: Path, holder: dict[str, Any] | None,
                 waited: float | None) -> None:
        super().__init__(lock_path, holder, waited)
        self.out_dir = Path(out_dir)
        self.channels = channels
        shown = format_channels(channels)
        waited_text = f" (waited {waited:.0f} s)" if waited else ""
        self.args = (
            f"channel(s) {shown} of {self.out_dir} are being written by another run: "
            f"{describe_holder(self.holder)}{waited_text}; its claim is {self.lock_path}. Wait for that run to "
            f"finish or stop it, then run again (finished channels are skipped), pass a lock wait to queue "
            f"behind it, or choose other channels. A run that died has released its claim already (the "
            f"operating system drops it with the process), so do not delete the files under "
            f"{stage_locks_dir(self.out_dir)}.",
        )


def stage_locks_dir(out_dir: str | Path) -> Path:
    """The lock folder of a per-channel stage folder: ``<parent>/.<name>.locks`` (a sibling, so the
    stage folder itself holds results only)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{LOCKS_SUFFIX}"


def format_channels(channels: Sequence[int]) -> str:
    """``[0, 1, 2]`` -> ``0-2``; otherwise the sorted list, shortened past 10 entries."""
    values = sorted({int(c) for c in channels})
    if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return str(values[:10])[:-1] + (f", ... ({len(values)} in all)]" if len(values) > 10 else "]")


def _live_conflict(registry: Path, wanted: set[int]) -> tuple[Path, dict[str, Any], list[int]] | None:
    """The first live claim overlapping ``wanted`` (call with the registry lock held); drops dead claims."""
    remove_temp_files(registry, recursive=False)  # a claim being recorded when its run died
    for lock_path in sorted(registry.glob("claim-*.lock")):
        record = lock_path.with_suffix(".json")
        if not is_locked(lock_path):  # its run ended or was killed: the kernel dropped the flock
            record.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
            continue
        try:
            theirs = {int(c) for c in json.loads(record.read_text(encoding="utf-8"))["channels"]}
        except (OSError, ValueError, KeyError, TypeError):
            theirs = wanted  # a live claim we cannot read: assume it covers everything
        overlap = sorted(wanted & theirs)
        if overlap:
            return lock_path, read_lock_owner(lock_path), overlap
    return None


@contextlib.contextmanager
def claim_channels(
    out_dir: str | Path, channels: Sequence[int], *, wait: bool | float = False, owner: str = ""
) -> Iterator[Path]:
    """Hold an exclusive claim on ``channels`` of the stage folder ``out_dir`` for the ``with`` body.

    A claim is a lock file ``<locks>/claim-<pid>-<random>.lock`` (``<locks>``: :func:`stage_locks_dir`,
    a sibling of ``out_dir``), held with ``flock`` for the
    whole body, plus ``claim-....json`` listing its channels. Claims are registered and checked under
    the short-lived lock ``<locks>/registry.lock``, so two runs never both claim a channel.
    Claims of disjoint channel sets coexist (two blocks of one variant run side by side); a claim
    overlapping a live one fails at once with :class:`ChannelsLockedError` naming the holder, or is
    retried for up to ``wait`` seconds (``True``: without limit). A run killed with ``kill -9`` leaves
    its claim files behind, but the kernel has dropped their lock: the next run removes them.

    The channel folders of ``channels`` are the claimant's alone while it holds the claim, so it may
    delete temporaries left in them by killed runs.

    Yields:
        The claim's lock file.
    """
    registry = stage_locks_dir(out_dir)
    wanted = {int(c) for c in channels}
    start = time.monotonic()
    while True:
        with partition_lock(registry / CLAIMS_REGISTRY_LOCK, wait=True, owner=owner):
            conflict = _live_conflict(registry, wanted)
            if conflict is None:
                token = f"claim-{os.getpid()}-{secrets.token_hex(4)}"
                claim = OwnedFlock(registry / f"{token}.lock", owner=owner).acquire()
                try:
                    atomic_write_json(registry / f"{token}.json", {"channels": sorted(wanted), "owner": owner})
                except BaseException:
                    claim.release()
                    claim.path.unlink(missing_ok=True)
                    raise
                break
        waited = time.monotonic() - start
        if wait is False or (wait is not True and waited >= float(wait)):
            lock_path, holder, overlap = conflict
            raise ChannelsLockedError(Path(out_dir), overlap, lock_path, holder, waited if wait is not False else None)
        time.sleep(_CLAIM_POLL_SECONDS)
    try:
        yield claim.path
    finally:
        try:
            with partition_lock(registry / CLAIMS_REGISTRY_LOCK, wait=True, owner=owner):
                (registry / f"{token}.json").unlink(missing_ok=True)
                claim.release()
                claim.path.unlink(missing_ok=True)
        finally:
            claim.release()  # idempotent; the claim never outlives the body
