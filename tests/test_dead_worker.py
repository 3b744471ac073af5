"""A run worker killed with ``kill -9`` must not keep the ``gpu`` pool slot (ddr_resources/run_guard.py,
dagster_project/worker_guard.py).

Real processes against a temporary DAGSTER_HOME holding the shipped ``dagster_project/dagster.yaml``;
the code location is tests/dead_worker_defs.py (two cheap assets in the pool ``gpu``, the project's
executor and sensor). Every wait is bounded; each test takes well under 90 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from dagster_project.worker_guard import DeadWorkerAwareRunLauncher
from ddr_resources.run_guard import (
    HEARTBEAT_TAG,
    RUN_ID_ENV,
    STALE_HEARTBEATS,
    WORKER_TAG,
    Machine,
    WorkerRecord,
    free_dead_slot_holders,
    guard_in_process_run,
    judge_worker,
    processes_of_run,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFS = "tests.dead_worker_defs"

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
SLACK = 3
"""Every bound below is what an idle machine needs, times SLACK: a busy CI runner starts a daemon, a code server
or a run worker several times slower, and a passing test never waits for a bound (only a failing one does)."""


def _wait(condition: Callable[[], object], seconds: float, what: str, *, step: float = 0.25) -> object:
    deadline = time.monotonic() + seconds * SLACK
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {seconds * SLACK:.0f} s for {what}"
        time.sleep(step)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A DAGSTER_HOME with the shipped settings and a workspace of the tiny code location; storage
    created here, once (a daemon and a CLI creating a fresh SQLite storage at once can collide)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_project" / "dagster.yaml", home / "dagster.yaml")
    (home / "workspace.yaml").write_text(
        f"load_from:\n  - python_module:\n      module_name: {DEFS}\n      working_directory: {ROOT}\n")
    with dg.DagsterInstance.from_config(str(home)):
        pass
    return home


@contextlib.contextmanager
def _instance(home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


class Processes:
    """Processes started by a test, each in its own session; all are killed (group-wise) at the end."""

    def __init__(self, home: Path, marker: Path) -> None:
        self.env = {**os.environ, "DAGSTER_HOME": str(home), "DDR_TEST_HOLD_MARKER": str(marker),
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.started: list[subprocess.Popen] = []

    def start(self, *args: str, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            process = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=self.env,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


@pytest.fixture
def procs(home: Path, tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(home, tmp_path / "hold_marker")
    yield processes
    processes.kill_all()


def _gone(pid: int) -> bool:
    """Not running (a zombie waiting for its parent counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rfind(")") + 2] in "ZXx"


def _the_run(instance: dg.DagsterInstance, job: str | None = None, asset: str | None = None) -> dg.DagsterRun | None:
    for run in instance.get_runs():
        if (job is None or run.job_name == job) and (asset is None or dg.AssetKey(asset) in (run.asset_selection or ())):
            return run
    return None


def _slot_holders(instance: dg.DagsterInstance) -> list[str]:
    return [slot.run_id for slot in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots]


def _failure_messages(instance: dg.DagsterInstance, run_id: str) -> str:
    return "\n".join(e.message for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE))


def _hold_the_gpu_from_the_cli(procs: Processes, home: Path, tmp_path: Path) -> tuple[subprocess.Popen, int, str]:
    """``dagster asset materialize`` of ``gpu_hold``: (the CLI process = run worker, step pid, run id)
    once the step runs and holds the ``gpu`` slot."""
    marker = Path(procs.env["DDR_TEST_HOLD_MARKER"])
    worker = procs.start("dagster", "asset", "materialize", "-m", DEFS, "--select", "gpu_hold",
                         log=tmp_path / "hold.log")
    _wait(lambda: marker.exists() and marker.read_text() or worker.poll() is not None, 60, "gpu_hold to start")
    assert worker.poll() is None, (tmp_path / "hold.log").read_text()[-3000:]
    with _instance(home) as instance:
        run = _the_run(instance, asset="gpu_hold")
        assert run is not None and _slot_holders(instance) == [run.run_id]
    return worker, int(marker.read_text()), run.run_id


# ---------------------------------------------------------------------------------------------------
# The rules, on crafted records (fast)
# ---------------------------------------------------------------------------------------------------


def _run(worker: WorkerRecord | None = None, tags: dict[str, str] | None = None) -> dg.DagsterRun:
    """A STARTED run; ``worker``: its record (written for this run)."""
    run_id = str(uuid.uuid4())
    tags = dict(tags or {})
    if worker is not None:
        tags[WORKER_TAG] = dataclasses.replace(worker, run_id=run_id).to_tag()
    return dg.DagsterRun(job_name="gpu_job", run_id=run_id, tags=tags, status=dg.DagsterRunStatus.STARTED)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_judge_worker_rules():
    here = WorkerRecord.current("r")
    assert here.start_ticks is not None and here.machine.boot_id and here.machine.pid_namespace
    assert WorkerRecord.from_tags({WORKER_TAG: here.to_tag()}, "r") == here

    def judge(record: WorkerRecord, **tags: str):
        return judge_worker(_run(record, tags))

    assert judge(here).state == "alive"  # this process
    assert judge(dataclasses.replace(here, pid=_dead_pid())).state == "dead"
    reused = judge(dataclasses.replace(here, start_ticks=here.start_ticks + 1))  # our pid, another process
    assert reused.state == "dead" and "now another process" in reused.reason

    # another machine: only the heartbeat tells
    other = dataclasses.replace(here, machine=Machine("elsewhere", "boot", "pid:[1]"), pid=_dead_pid())
    limit = STALE_HEARTBEATS * other.heartbeat_seconds
    assert judge(other, **{HEARTBEAT_TAG: f"{time.time() - limit + 30:.0f}"}).state == "alive"
    assert judge(other, **{HEARTBEAT_TAG: f"{time.time() - limit - 30:.0f}"}).state == "dead"
    assert judge(other).state == "unknown"  # no heartbeat recorded: never taken for dead

    # no record, one a hand-edited tag broke, or one copied from another run (a re-execution may copy
    # its parent's tags): never taken for dead
    dead_elsewhere = dataclasses.replace(here, pid=_dead_pid()).to_tag()
    broken = ["", "not json", "[]", '{"pid": 1}', here.to_tag().replace(f'"pid": {here.pid}', '"pid": "x"'),
              here.to_tag().replace(f'"pid": {here.pid}', '"pid": -5'), dead_elsewhere]
    assert judge_worker(_run()).state == "unknown"
    for text in broken:
        run = _run(tags={WORKER_TAG: text})
        assert WorkerRecord.from_tags(run.tags, run.run_id) is None, text
        assert judge_worker(run).state == "unknown", text


def test_guard_and_launcher_free_only_the_slots_of_dead_workers(home):
    """On a real instance (the shipped dagster.yaml): a STARTED run whose worker is dead is failed and
    its slot and queued step are freed; a live one, one without a record and one whose orphaned
    process (carrying its run id) still runs keep theirs. The launcher's health check agrees."""
    here = WorkerRecord.current("r")
    dead = dataclasses.replace(here, pid=_dead_pid())
    runs = {
        "dead": _run(dead),
        "alive": _run(here),
        "unrecorded": _run(),
        "orphaned": _run(dead),  # a process with its run id lives on
        "queued_dead": _run(dead),  # waits for a slot: would get the next one
    }
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, RUN_ID_ENV: runs["orphaned"].run_id})
    try:
        _wait(lambda: orphan.pid in processes_of_run(runs["orphaned"].run_id), 10, "the orphan to start")
        with _instance(home) as instance:
            assert isinstance(instance.run_launcher, DeadWorkerAwareRunLauncher)
            assert instance.run_launcher.supports_check_run_worker_health
            storage = instance.event_log_storage
            storage.set_concurrency_slots("gpu", 4)
            for name, run in runs.items():
                instance.add_run(run)
                if name != "queued_dead":
                    assert storage.claim_concurrency_slot("gpu", run.run_id, "step").is_claimed
            assert not storage.claim_concurrency_slot("gpu", runs["queued_dead"].run_id, "step").is_claimed

            health = {name: instance.run_launcher.check_run_worker_health(run).status.value
                      for name, run in runs.items() if name != "dead"}
            assert health == {"alive": "RUNNING", "unrecorded": "RUNNING", "orphaned": "RUNNING",
                              "queued_dead": "FAILED"}
            # the launcher freed the queued step of the dead run it judged (run monitoring fails the run)
            assert runs["queued_dead"].run_id not in storage.get_concurrency_run_ids()

            actions = free_dead_slot_holders(instance, own_run_id=runs["alive"].run_id)
            assert len(actions) == 1 and runs["dead"].run_id in actions[0], actions
            assert instance.get_run_by_id(runs["dead"].run_id).status == dg.DagsterRunStatus.FAILURE
            assert "Run worker died" in _failure_messages(instance, runs["dead"].run_id)
            assert sorted(_slot_holders(instance)) == sorted(runs[n].run_id for n in ("alive", "unrecorded", "orphaned"))
            for name in ("alive", "unrecorded", "orphaned"):
                assert instance.get_run_by_id(runs[name].run_id).status == dg.DagsterRunStatus.STARTED

            orphan.kill()
            orphan.wait()
            actions = free_dead_slot_holders(instance, own_run_id=runs["alive"].run_id)
            assert len(actions) == 1 and runs["orphaned"].run_id in actions[0], actions
            assert sorted(_slot_holders(instance)) == sorted(runs[n].run_id for n in ("alive", "unrecorded"))
    finally:
        orphan.kill()
        orphan.wait()


def test_in_process_guard_only_in_the_process_that_started_the_run(home):
    """ComputeResource's setup guards a run only in the process that started it (in-process execution):
    a step process of a multiprocess run recording itself would make the run look dead when it ends."""
    def started_by(instance: dg.DagsterInstance, pid: int, tags: dict[str, str] | None = None) -> dg.DagsterRun:
        run = _run(tags=tags)
        instance.add_run(run)
        instance.report_dagster_event(dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_START.value,
                                                      job_name=run.job_name, pid=pid), run_id=run.run_id)
        return run

    with _instance(home) as instance:
        assert guard_in_process_run(instance, started_by(instance, _dead_pid())) is None  # a step process
        parent = WorkerRecord.current(str(uuid.uuid4())).to_tag()  # copied by a re-execution: not its own
        run = started_by(instance, os.getpid(), {WORKER_TAG: parent})
        guard = guard_in_process_run(instance, run)
        assert guard is not None
        try:
            assert os.environ[RUN_ID_ENV] == run.run_id
            record = WorkerRecord.from_tags(instance.get_run_by_id(run.run_id).tags, run.run_id)
            assert record is not None and record.pid == os.getpid()
            assert guard_in_process_run(instance, run) is None  # already guarded
        finally:
            guard.__exit__(None, None, None)
        assert RUN_ID_ENV not in os.environ
    with dg.DagsterInstance.ephemeral() as ephemeral:
        assert guard_in_process_run(ephemeral, started_by(ephemeral, os.getpid())) is None


# ---------------------------------------------------------------------------------------------------
# Real kill -9 of real run workers
# ---------------------------------------------------------------------------------------------------


def test_cli_run_takes_the_slot_of_a_killed_cli_run_without_a_daemon(home, procs, tmp_path):
    """No daemon (cron): run A is killed with kill -9 while its step holds the slot. While A's orphaned
    step process still runs, A keeps the slot (it may be using the GPU) and run B waits; once that
    process is gone too, B -- already waiting -- fails A, naming the dead worker, and takes the slot."""
    worker, step_pid, run_a = _hold_the_gpu_from_the_cli(procs, home, tmp_path)
    os.kill(worker.pid, signal.SIGKILL)  # the run worker only: its step process lives on
    worker.wait(timeout=10)
    with _instance(home) as instance:
        run = instance.get_run_by_id(run_a)
        assert run.status == dg.DagsterRunStatus.STARTED
        record = WorkerRecord.from_tags(run.tags, run_a)
        assert record is not None and record.pid == worker.pid, run.tags.get(WORKER_TAG)
        verdict = judge_worker(run)
        assert verdict.state == "alive" and str(step_pid) in verdict.reason, verdict
        assert step_pid in processes_of_run(run_a)
        assert free_dead_slot_holders(instance) == [] and _slot_holders(instance) == [run_a]

    log_b = tmp_path / "cheap.log"
    cheap = procs.start("dagster", "asset", "materialize", "-m", DEFS, "--select", "gpu_cheap", log=log_b)
    _wait(lambda: "Step blocked by limit for pool gpu" in log_b.read_text() or cheap.poll() is not None, 60,
          "run B to wait for the slot")
    assert cheap.poll() is None, log_b.read_text()[-3000:]  # B must not take the slot of a live step

    os.kill(step_pid, signal.SIGKILL)
    _wait(lambda: _gone(step_pid), 10, "the step process to die")
    assert cheap.wait(timeout=60 * SLACK) == 0, log_b.read_text()[-3000:]  # B's guard checks every 5 s

    with _instance(home) as instance:
        run = instance.get_run_by_id(run_a)
        assert run.status == dg.DagsterRunStatus.FAILURE
        message = _failure_messages(instance, run_a)
        assert f"Run worker died: run worker pid {worker.pid}" in message and "is gone" in message, message
        assert _slot_holders(instance) == []
        run_b = _the_run(instance, asset="gpu_cheap")
        assert run_b is not None and run_b.status == dg.DagsterRunStatus.SUCCESS


IN_PROCESS = """
import os, sys, time
from pathlib import Path
import dagster as dg
from ddr_resources.resources import ComputeResource

@dg.asset(pool="gpu")
def gpu_hold(compute: ComputeResource) -> None:
    marker = Path(os.environ["DDR_TEST_HOLD_MARKER"])
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)

@dg.asset(pool="gpu")
def gpu_cheap(compute: ComputeResource) -> None:
    pass

asset = {"hold": gpu_hold, "cheap": gpu_cheap}[sys.argv[1]]
result = dg.materialize([asset], instance=dg.DagsterInstance.get(), resources={"compute": ComputeResource()})
sys.exit(0 if result.success else 1)
"""


def test_in_process_run_takes_the_slot_of_a_killed_in_process_run(home, procs, tmp_path):
    """``dg.materialize`` (``make demo``) runs in process, without the job's executor: the GPU assets'
    ComputeResource guards it. Run A is killed with kill -9 while holding the slot; run B, in process
    too, fails A and takes the slot."""
    marker = Path(procs.env["DDR_TEST_HOLD_MARKER"])
    worker = procs.start("python", "-c", IN_PROCESS, "hold", log=tmp_path / "hold.log")
    _wait(lambda: marker.exists() or worker.poll() is not None, 60, "run A to start")
    assert worker.poll() is None, (tmp_path / "hold.log").read_text()[-3000:]
    with _instance(home) as instance:
        run_a = _the_run(instance)
        assert run_a is not None and _slot_holders(instance) == [run_a.run_id]
        assert WorkerRecord.from_tags(run_a.tags, run_a.run_id).pid == worker.pid  # the in-process worker, not a step
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)

    cheap = procs.start("python", "-c", IN_PROCESS, "cheap", log=tmp_path / "cheap.log")
    assert cheap.wait(timeout=60 * SLACK) == 0, (tmp_path / "cheap.log").read_text()[-3000:]
    with _instance(home) as instance:
        assert instance.get_run_by_id(run_a.run_id).status == dg.DagsterRunStatus.FAILURE
        assert f"run worker pid {worker.pid}" in _failure_messages(instance, run_a.run_id)
        assert _slot_holders(instance) == []


def _start_daemon(procs: Processes, home: Path, tmp_path: Path) -> subprocess.Popen:
    daemon = procs.start("dagster-daemon", "run", "-w", str(home / "workspace.yaml"), log=tmp_path / "daemon.log")
    return daemon


def _launch(procs: Processes, home: Path, tmp_path: Path, job: str) -> None:
    """Submit ``job`` to the run queue; the daemon launches it through the code server."""
    launcher = procs.start("dagster", "job", "launch", "-w", str(home / "workspace.yaml"), "-j", job,
                           log=tmp_path / f"launch_{job}.log")
    assert launcher.wait(timeout=60 * SLACK) == 0, (tmp_path / f"launch_{job}.log").read_text()[-3000:]


def _finished(home: Path, job: str) -> dg.DagsterRun | None:
    with _instance(home) as instance:
        run = _the_run(instance, job=job)
        return run if run is not None and run.is_finished else None


def test_daemon_monitoring_fails_a_killed_cli_run_and_a_queued_run_gets_the_slot(home, procs, tmp_path):
    """A daemon runs; a CLI run holding the slot is killed (kill -9 of its whole process group). Run
    monitoring (the shipped run launcher's health check) marks it FAILURE, naming the dead worker, and
    its slot is freed; a run submitted to the queue afterwards is launched and succeeds."""
    daemon = _start_daemon(procs, home, tmp_path)
    worker, step_pid, run_a = _hold_the_gpu_from_the_cli(procs, home, tmp_path)
    os.killpg(worker.pid, signal.SIGKILL)  # worker and step process
    worker.wait(timeout=10)
    _wait(lambda: _gone(step_pid), 10, "the step process to die")

    def failed() -> str:
        with _instance(home) as instance:
            return _failure_messages(instance, run_a) if not _slot_holders(instance) else ""

    message = _wait(failed, 45, "run monitoring to fail run A and free its slot", step=0.5)
    assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
    # run monitoring (the launcher's health check) or the daemon's sensor, whichever looks first, fails it
    assert ("Detected run worker status" in message or "Marked failed by ddr's worker guard" in message) \
        and f"run worker pid {worker.pid}" in message, message

    _launch(procs, home, tmp_path, "cheap_gpu")
    run_b = _wait(lambda: _finished(home, "cheap_gpu"), 60, "the queued run to finish", step=0.5)
    assert run_b.status == dg.DagsterRunStatus.SUCCESS, (tmp_path / "daemon.log").read_text()[-3000:]


def test_daemon_frees_the_slot_of_a_killed_launched_run_for_a_queued_run(home, procs, tmp_path):
    """A daemon launches run A through the code server; its worker and step process are killed with
    kill -9 (the code server marks A failed, but nothing frees the slot, so the queue would hold every
    later GPU run back forever). The guard sensor frees the slot; the queued run B is launched and
    succeeds."""
    marker = Path(procs.env["DDR_TEST_HOLD_MARKER"])
    _start_daemon(procs, home, tmp_path)
    _launch(procs, home, tmp_path, "hold_gpu")
    _wait(marker.exists, 60, "the daemon to launch gpu_hold", step=0.5)
    step_pid = int(_wait(marker.read_text, 5, "the step pid"))
    with _instance(home) as instance:
        run_a = _the_run(instance, job="hold_gpu")
        record = WorkerRecord.from_tags(run_a.tags, run_a.run_id)
        assert record is not None and _slot_holders(instance) == [run_a.run_id]
    os.kill(record.pid, signal.SIGKILL)
    os.kill(step_pid, signal.SIGKILL)
    _wait(lambda: _gone(record.pid) and _gone(step_pid), 10, "the worker and step processes to die")

    _launch(procs, home, tmp_path, "cheap_gpu")
    run_b = _wait(lambda: _finished(home, "cheap_gpu"), 75, "the queued run to finish", step=0.5)
    assert run_b.status == dg.DagsterRunStatus.SUCCESS, (tmp_path / "daemon.log").read_text()[-3000:]
    with _instance(home) as instance:
        assert instance.get_run_by_id(run_a.run_id).status == dg.DagsterRunStatus.FAILURE
        assert _slot_holders(instance) == []
