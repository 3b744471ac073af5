"""Dead run workers: record who runs a run, tell when that process died, give back the pool slots it held.

Dagster claims a slot of a concurrency pool (``gpu``) for a step in the run's orchestrating process (the
"run worker": the ``dagster asset materialize`` process, or ``dagster api execute_run`` started by the
code server) and frees it when the step ends. A worker killed with ``kill -9`` (OOM killer, a lost node,
an impatient user) frees nothing: its run stays STARTED and keeps the slot, so every later GPU step
waits forever ("Step blocked by limit for pool gpu"). Dagster's default run launcher cannot tell that
the worker died, and without a daemon nobody looks at all.

This module is the knowledge itself; :mod:`dagster_project.worker_guard` wires it into the deployment
(the guarded executor, the health-checking run launcher and the sensor):

* :class:`RunGuard`, around a run's execution in its worker, records the worker -- host, boot id, PID
  namespace, pid and the process's start time -- in the run tag ``ddr/worker`` before any step claims
  a slot, marks every process it starts with the run id in the environment variable
  ``DDR_DAGSTER_RUN_ID``, and keeps a heartbeat tag (``ddr/worker_heartbeat``) fresh. Before the steps
  start, and every few seconds while the run lasts, it looks at every run holding or queued for a
  pool slot: one whose worker is dead is marked FAILURE (the message names the dead process) and its
  slots are freed, so this run can take them -- with or without a daemon. The guarded executor of every
  job in :mod:`dagster_project.definitions` (CLI, UI and daemon runs) runs one; runs executed in process
  (``dg.materialize``, ``make demo``) ignore the job's executor and get theirs from the setup of
  :class:`~ddr_resources.resources.ComputeResource` (:func:`guard_in_process_run`), which every GPU
  asset uses.
* :func:`free_dead_slot_holders` frees the slots of dead runs; the daemon's sensor and the run
  launcher's health check call it and :func:`judge_worker`.

When is a worker dead (:func:`judge_worker`)? On the machine that recorded it (same host name, boot
id and PID namespace): when its pid is gone, a zombie, or a different process (start time differs),
AND no process carrying its run id in the environment is alive -- a step process orphaned by the
kill still computes on the GPU and keeps the slot until it ends. From another machine the pid cannot
be checked: the worker is dead when its heartbeat is older than :data:`STALE_HEARTBEATS` heartbeats.
A run without the tag (started by an executor without this guard) is never judged dead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from typing import Literal

import dagster as dg

WORKER_TAG = "ddr/worker"
HEARTBEAT_TAG = "ddr/worker_heartbeat"
RUN_ID_ENV = "DDR_DAGSTER_RUN_ID"
HEARTBEAT_SECONDS = 30.0
"""How often a worker refreshes its heartbeat tag."""
CHECK_SECONDS = 5.0
"""How often a worker looks for dead holders of pool slots while its run lasts."""
STALE_HEARTBEATS = 10
"""A worker on another machine is dead after this many missed heartbeats (5 minutes)."""

_RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PROC = "/proc"


# --------------------------------------------------------------------------------------------------
# Where a process runs, and whether it still does
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Machine:
    """Where pids mean the same thing: host name, kernel boot id and PID namespace (a container or
    a reboot gives the same host name other pids)."""

    host: str
    boot_id: str
    pid_namespace: str

    @classmethod
    def current(cls) -> Machine:
        return cls(host=socket.gethostname(), boot_id=_read(f"{_PROC}/sys/kernel/random/boot_id").strip(),
                   pid_namespace=_readlink(f"{_PROC}/self/ns/pid"))


@dataclasses.dataclass(frozen=True)
class WorkerRecord:
    """The run worker as recorded in the run tag :data:`WORKER_TAG` (JSON). ``run_id`` is the run it was
    written for: a re-execution may copy its parent's tags, and the parent's worker is not its own."""

    run_id: str
    machine: Machine
    pid: int
    start_ticks: int | None
    heartbeat_seconds: float

    @classmethod
    def current(cls, run_id: str) -> WorkerRecord:
        pid = os.getpid()
        return cls(run_id=run_id, machine=Machine.current(), pid=pid, start_ticks=_process_stat(pid)[1],
                   heartbeat_seconds=HEARTBEAT_SECONDS)

    def to_tag(self) -> str:
        return json.dumps({"run_id": self.run_id, **dataclasses.asdict(self.machine), "pid": self.pid,
                           "start_ticks": self.start_ticks, "heartbeat_seconds": self.heartbeat_seconds},
                          sort_keys=True)

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], run_id: str) -> WorkerRecord | None:
        """The record of run ``run_id`` in ``tags``; None when there is none, it is malformed (a tag set
        by hand must not make a live run look dead) or it was written for another run."""
        text = tags.get(WORKER_TAG)
        if not text:
            return None
        try:
            data = json.loads(text)
            start = data["start_ticks"]
            record = cls(
                run_id=str(data["run_id"]),
                machine=Machine(host=str(data["host"]), boot_id=str(data["boot_id"]),
                                pid_namespace=str(data["pid_namespace"])),
                pid=int(data["pid"]), start_ticks=None if start is None else int(start),
                heartbeat_seconds=float(data["heartbeat_seconds"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if record.run_id != run_id or record.pid <= 0 or not record.heartbeat_seconds > 0:
            return None
        return record

    def describe(self) -> str:
        return f"run worker pid {self.pid} on host {self.machine.host!r}"


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _process_stat(pid: int) -> tuple[bool, int | None]:
    """``(alive, start time in clock ticks since boot)`` of ``pid``. A zombie is not alive. Without
    ``/proc`` (not Linux) only existence is known and the start time is None."""
    if os.path.isdir(_PROC):
        text = _read(f"{_PROC}/{pid}/stat")
        if not text:
            return False, None
        fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and ')'
        try:
            return fields[0] not in ("Z", "X", "x"), int(fields[19])
        except (IndexError, ValueError):
            return False, None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        return True, None
    return True, None


def processes_of_run(run_id: str) -> list[int]:
    """Live pids on this machine whose environment names ``run_id`` (:data:`RUN_ID_ENV`): the step
    processes a worker started, and theirs. Empty without ``/proc``."""
    needle = f"{RUN_ID_ENV}={run_id}\0".encode()
    found = []
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{_PROC}/{entry}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:  # gone, or another user's process
            continue
        if (environ.startswith(needle) or b"\0" + needle in environ) and _process_stat(int(entry))[0]:
            found.append(int(entry))
    return sorted(found)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """``alive``, ``dead`` or ``unknown`` (no usable record: never treated as dead), and why."""

    state: Literal["alive", "dead", "unknown"]
    reason: str


def judge_worker(run: dg.DagsterRun, now: float | None = None) -> Verdict:
    """Whether the worker recorded on ``run`` is alive (see the module docstring for the rules)."""
    record = WorkerRecord.from_tags(run.tags, run.run_id)
    if record is None:
        return Verdict("unknown", f"run {run.run_id} has no usable {WORKER_TAG!r} tag of its own (not "
                                  "started under ddr's worker guard): cannot tell whether its worker lives")
    if record.machine == Machine.current():
        alive, start = _process_stat(record.pid)
        same_process = record.start_ticks is None or start is None or start == record.start_ticks
        if alive and same_process:
            return Verdict("alive", f"{record.describe()} is running")
        children = processes_of_run(run.run_id)
        if children:
            return Verdict("alive", f"{record.describe()} is gone but its processes {children} still run "
                                    "(they may hold the GPU)")
        gone = "is gone" if not alive else f"is gone (pid {record.pid} is now another process)"
        return Verdict("dead", f"{record.describe()} {gone} and none of its step processes runs: the "
                               "worker was killed or crashed")
    try:
        beat = float(run.tags.get(HEARTBEAT_TAG, ""))
    except ValueError:
        return Verdict("unknown", f"{record.describe()}: heartbeat tag {HEARTBEAT_TAG!r} is unreadable")
    age = (time.time() if now is None else now) - beat
    limit = STALE_HEARTBEATS * record.heartbeat_seconds
    if age > limit:
        return Verdict("dead", f"no heartbeat from {record.describe()} for {age:.0f} s (more than {limit:.0f} s)")
    return Verdict("alive", f"{record.describe()} (another machine) sent a heartbeat {age:.0f} s ago")


# --------------------------------------------------------------------------------------------------
# Giving back the slots of dead runs
# --------------------------------------------------------------------------------------------------


def _slot_run_ids(instance: dg.DagsterInstance) -> set[str]:
    """Runs holding a pool slot or queued for one (a queued step of a dead run would be assigned the
    next free slot and hold it forever)."""
    storage = instance.event_log_storage
    run_ids = set(storage.get_concurrency_run_ids())
    for key in storage.get_concurrency_keys():
        run_ids.update(slot.run_id for slot in storage.get_concurrency_info(key).claimed_slots)
    return run_ids


def free_dead_slot_holders(instance: dg.DagsterInstance, own_run_id: str | None = None) -> list[str]:
    """Fail every unfinished run that holds (or waits for) a pool slot and whose worker is dead, and
    free the slots of those runs (finished ones too). Returns one line per action, for the caller to
    log. Runs whose worker lives, or cannot be judged, are left alone."""
    if not instance.event_log_storage.supports_global_concurrency_limits:
        return []
    actions = []
    for run_id in sorted(_slot_run_ids(instance) - {own_run_id}):
        run = instance.get_run_by_id(run_id)
        if run is None:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            actions.append(f"freed the pool slots of run {run_id}, which no longer exists")
            continue
        if run.status == dg.DagsterRunStatus.SUSPENDED:
            continue
        verdict = judge_worker(run)
        if verdict.state != "dead":
            continue
        run = instance.get_run_by_id(run_id)  # another worker (or the daemon) may have just failed it
        if run is not None and not run.is_finished:
            by = f"run {own_run_id}" if own_run_id else "ddr's worker guard"
            instance.report_run_failed(run, f"Run worker died: {verdict.reason}. Marked failed by {by} "
                                            "so that the pool slots it held are given back.")
            actions.append(f"marked run {run_id} failed ({verdict.reason}) and freed its pool slots")
        else:
            actions.append(f"freed the pool slots of finished run {run_id} ({verdict.reason})")
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return actions


# --------------------------------------------------------------------------------------------------
# The guard in the worker (executor, or ComputeResource for in-process runs): records the worker,
# heartbeats, frees the slots of dead runs
# --------------------------------------------------------------------------------------------------


class _Watchdog(threading.Thread):
    """Heartbeat and the periodic look for dead slot holders, in a daemon thread of the worker."""

    def __init__(self, instance: dg.DagsterInstance, run: dg.DagsterRun) -> None:
        super().__init__(name=f"ddr-worker-guard-{run.run_id[:8]}", daemon=True)
        self._instance, self._run = instance, run
        self._stop_event = threading.Event()
        self._last_beat = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.wait(CHECK_SECONDS):
            try:
                if time.monotonic() - self._last_beat >= HEARTBEAT_SECONDS:
                    self._instance.add_run_tags(self._run.run_id, {HEARTBEAT_TAG: f"{time.time():.0f}"})
                    self._last_beat = time.monotonic()
                for action in free_dead_slot_holders(self._instance, self._run.run_id):
                    self._instance.report_engine_event(f"ddr worker guard: {action}", self._run)
            except Exception as error:  # a locked database now and then must not end the watch
                try:
                    self._instance.report_engine_event(f"ddr worker guard: check failed ({error!r}); "
                                                       "trying again", self._run)
                except Exception:
                    pass

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=CHECK_SECONDS + 5)


class RunGuard:
    """The guard around one run's execution, in its worker process: records the worker (tag
    :data:`WORKER_TAG`), fails dead slot holders before the steps claim slots, marks the processes this
    worker starts with the run id (:data:`RUN_ID_ENV`), and keeps a watchdog (heartbeat, dead slot
    holders every :data:`CHECK_SECONDS`) until the run's steps are done. A context manager."""

    def __init__(self, instance: dg.DagsterInstance, run: dg.DagsterRun) -> None:
        if not _RUN_ID.match(run.run_id):
            raise dg.DagsterInvariantViolationError(f"run id {run.run_id!r} is not a UUID")
        self._instance, self._run = instance, run
        self._watchdog: _Watchdog | None = None
        self._previous_env: str | None = None

    def __enter__(self) -> RunGuard:
        instance, run = self._instance, self._run
        instance.add_run_tags(run.run_id, {WORKER_TAG: WorkerRecord.current(run.run_id).to_tag(),
                                           HEARTBEAT_TAG: f"{time.time():.0f}"})
        try:
            for action in free_dead_slot_holders(instance, run.run_id):
                instance.report_engine_event(f"ddr worker guard: {action}", run)
        except Exception as error:  # the watchdog tries again in a few seconds
            instance.report_engine_event(f"ddr worker guard: check failed ({error!r}); trying again", run)
        self._previous_env = os.environ.get(RUN_ID_ENV)
        os.environ[RUN_ID_ENV] = run.run_id  # inherited by every process started from here on
        self._watchdog = _Watchdog(instance, run)
        self._watchdog.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._previous_env is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = self._previous_env


def guard_in_process_run(instance: dg.DagsterInstance | None, run: dg.DagsterRun | None) -> RunGuard | None:
    """A started :class:`RunGuard` when this process is the worker of ``run`` and no guard runs yet:
    for runs executed in process (``dg.materialize``, ``execute_in_process``: ``make demo``), which
    replace the job's executor with Dagster's in-process one. None -- nothing to do -- for an ephemeral
    instance, a run already guarded (the guarded executor recorded its worker), and a step process of
    a multiprocess run (not the process that started the run: recording it would make the run look
    dead once this step ends). Called from :class:`~ddr_resources.resources.ComputeResource`'s setup,
    which Dagster runs before the steps claim pool slots."""
    if instance is None or run is None or instance.is_ephemeral:
        return None
    current = instance.get_run_by_id(run.run_id)
    if current is None or current.is_finished or WorkerRecord.from_tags(current.tags, current.run_id):
        return None
    starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
    if not any(entry.dagster_event is not None and entry.dagster_event.pid == os.getpid() for entry in starts):
        return None
    return RunGuard(instance, current).__enter__()
