"""Progress reporting for long work: log lines with counts and ETA, and a bar on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

LogFn = Callable[[str], None]


class StopRequested(BaseException):
    """A stop asked for from outside the stage (:func:`request_stop`: Slurm's signal before the job's time
    limit), raised by :meth:`Progress.update`, i.e. right after a unit of work (a dream channel, a capture
    batch, a prior image batch) has been written, so that the unit in progress is not lost. A
    ``BaseException`` like ``KeyboardInterrupt``: a stage's ``except Exception`` does not swallow it."""


_stop_reason: str | None = None


def request_stop(reason: str) -> None:
    """Ask the running stage to stop at its next unit boundary (safe to call from a signal handler)."""
    global _stop_reason
    _stop_reason = reason


def clear_stop() -> None:
    global _stop_reason
    _stop_reason = None


def stop_reason() -> str | None:
    """Why a stop was requested, or None."""
    return _stop_reason


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def plural(noun: str) -> str:
    """The English plural of a unit noun: ``batch`` -> ``batches``, ``image`` -> ``images``."""
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x", "z")) else "s")


class Progress:
    """Counts units of work and reports ``done/total``, rate and ETA.

    ``log`` receives a line at most every ``every_s`` seconds and at the end (Dagster's
    ``context.log.info`` in assets). A tqdm bar is drawn too when stderr is a terminal.
    """

    def __init__(self, total: int, desc: str, log: LogFn | None = None, unit: str = "item",
                 every_s: float = 10.0, initial: int = 0) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.log = log
        self.unit = unit
        self.every_s = every_s
        self.done = initial
        self._initial = initial
        self._start = time.monotonic()
        self._last_log = float("-inf")
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit)

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        new = self.done - self._initial
        rate = new / elapsed if elapsed > 0 else 0.0
        remaining = self.total - self.done
        eta = _format_seconds(remaining / rate) if rate > 0 else "?"
        return (f"{self.desc}: {self.done}/{self.total} {plural(self.unit)}, {rate:.2f} {self.unit}/s, "
                f"elapsed {_format_seconds(elapsed)}, ETA {eta}")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.monotonic()
        if self.log and (now - self._last_log >= self.every_s or self.done >= self.total):
            self._last_log = now
            self.log(self.line())
        if _stop_reason is not None and self.done < self.total:  # the last unit ends the stage anyway
            if self.log:
                self.log(f"{self.desc}: stopping after {self.done}/{self.total} {plural(self.unit)}: {_stop_reason}")
            raise StopRequested(_stop_reason)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
