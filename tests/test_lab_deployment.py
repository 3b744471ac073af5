"""A lab's shared deployment (docs/DEPLOYMENT.md) against a real PostgreSQL server on loopback.

Skipped unless ``DDR_PG_HOST`` is set (``eval "$(sudo scripts/start_local_postgres.sh 2>/dev/null)"``, as
``.ci/run`` does as root, with ``DDR_REQUIRE_POSTGRES=1``: then a skip fails instead). The instance is
``deploy/lab/dagster.yaml`` as shipped (copied unchanged into a fresh ``DAGSTER_HOME``) on a fresh database;
the services are the ones a lab runs: ``python -m dagster_project.launcher daemon`` and the guarded UI
(``launcher ui``, access token), everything driven and read through the UI's GraphQL with the token:

1. a capture schedule (every minute, tiny model) is started; the daemon ticks it and the scheduled run
   succeeds;
2. a backfill of ``timestep_stats`` over both tiny variants runs through the daemon;
3. the UI lists the runs, the backfill and the ticks, and the rows are in PostgreSQL (no SQLite file);
   everything the runs wrote is the group's (``DDR_UMASK=0002``, setgid folders: ddr_core/shared_root.py);
4. the daemon is killed (SIGKILL, its whole process group: a crash or a reboot); a run launched while it
   is down waits QUEUED; a new daemon starts it, and every run, event log, backfill and tick from before
   is still there, unchanged; the schedule keeps ticking.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
LAB_YAML = REPO / "deploy" / "lab" / "dagster.yaml"
LOCATION = "ddr-lab-test"
REPOSITORY = "__repository__"
PG_ENV = ("DDR_PG_HOST", "DDR_PG_PORT", "DDR_PG_USER", "DDR_PG_PASSWORD", "DDR_PG_DB")


def _skip_reason() -> str | None:
    missing = [name for name in PG_ENV if not os.environ.get(name)]
    if missing:
        return (f"LAB DEPLOYMENT TEST SKIPPED: no PostgreSQL server ({', '.join(missing)} unset). Run "
                "`eval \"$(sudo scripts/start_local_postgres.sh 2>/dev/null)\"` first (docs/DEPLOYMENT.md)")
    try:
        import dagster_postgres  # noqa: F401
        import psycopg2  # noqa: F401
    except ImportError as exc:
        return f"LAB DEPLOYMENT TEST SKIPPED: {exc}: install the lab extra, `pip install -e \".[dev,lab]\"`"
    return None


SKIP = _skip_reason()
if SKIP is not None and os.environ.get("DDR_REQUIRE_POSTGRES"):  # .ci/run as root: a server was promised
    raise RuntimeError(f"DDR_REQUIRE_POSTGRES is set but the lab deployment test cannot run: {SKIP}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


# ------------------------------------------------------------------------------------------ helpers


def _connect(db: str):
    import psycopg2

    return psycopg2.connect(host=os.environ["DDR_PG_HOST"], port=int(os.environ["DDR_PG_PORT"]),
                            user=os.environ["DDR_PG_USER"], password=os.environ["DDR_PG_PASSWORD"], dbname=db)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(what: str, check: Callable[[], Any], timeout: float, logs: list[Path], every: float = 1.0) -> Any:
    """``check()``'s first truthy value within ``timeout`` seconds; else fail showing the services' logs."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, AssertionError, KeyError) as exc:  # a service still starting, a row not there yet
            last_error = exc
        time.sleep(every)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})\n{tails}")


class Service:
    """A launcher service (``daemon`` or ``ui``) in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "dagster_project.launcher", *args], cwd=REPO,
                                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to the whole group (the service and the code server it started): a crash, a reboot."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        # the code server and any run worker left in the group
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class GraphQL:
    """The guarded UI's GraphQL endpoint, with the access token (as a script sends it)."""

    def __init__(self, port: int, token: str) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"
        self.token = token

    def __call__(self, query: str, **variables: Any) -> dict:
        request = urllib.request.Request(
            self.url, data=json.dumps({"query": query, "variables": variables}).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        assert not body.get("errors"), body["errors"]
        return body["data"]


RUNS = """{ runsOrError { ... on Runs { results { runId status jobName
           tags { key value } } } } }"""
BACKFILLS = """{ partitionBackfillsOrError { ... on PartitionBackfills { results { id status partitionNames
                assetSelection { path } } } } }"""
SCHEDULE = """query ($selector: ScheduleSelector!) { scheduleOrError(scheduleSelector: $selector) {
  ... on Schedule { scheduleState { id status ticks(limit: 100) { tickId status runIds timestamp } } }
  ... on Error { message } } }"""
LOGS = """query ($runId: ID!) { logsForRun(runId: $runId, limit: 5000) {
  ... on EventConnection { events { __typename ... on MessageEvent { message timestamp } } }
  ... on Error { message } } }"""
LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
DAEMONS = """{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"""


def _snapshot(gql: GraphQL, selector: dict) -> dict:
    """What the UI lists: every run (status, tags), its event log, the backfills and the schedule's ticks."""
    runs = {r["runId"]: r for r in gql(RUNS)["runsOrError"]["results"]}
    logs = {run_id: gql(LOGS, runId=run_id)["logsForRun"]["events"] for run_id in runs}
    backfills = gql(BACKFILLS)["partitionBackfillsOrError"]["results"]
    ticks = gql(SCHEDULE, selector=selector)["scheduleOrError"]["scheduleState"]["ticks"]
    return {"runs": runs, "logs": logs, "backfills": {b["id"]: b for b in backfills},
            "ticks": {t["tickId"]: t for t in ticks}}


def _tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)


# ------------------------------------------------------------------------------------------ the test


@pytest.fixture
def database():
    """A fresh database on the server (the role may create databases), dropped afterwards."""
    name = f"ddr_lab_test_{uuid.uuid4().hex[:10]}"
    admin = _connect(os.environ["DDR_PG_DB"])
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_daemon_and_postgres_run_schedule_and_backfill_and_survive_a_daemon_restart(tmp_path, database, monkeypatch):
    home, data_root = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text(LAB_YAML.read_text())  # the shipped template, unchanged
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(f"load_from:\n  - python_module:\n      module_name: tests.lab_deployment_defs\n"
                         f"      working_directory: {REPO}\n      location_name: {LOCATION}\n")
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "DAGSTER_HOME": str(home), "DDR_PG_DB": database, "DDR_DATA_ROOT": str(data_root),
           "DDR_ACCESS_TOKEN": token, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DDR_COMPUTE_MODE", None)
    # the lab's group-shared folders: setgid, group-writable, and every ddr process under umask 0002
    from ddr_core.shared_root import prepare, problems

    group = grp.getgrgid(os.getgid()).gr_name
    env["DDR_UMASK"] = "0002"
    for folder in (home, data_root):
        prepare(folder, group)
    logs = [tmp_path / "daemon-1.log", tmp_path / "daemon-2.log", tmp_path / "ui.log"]

    # the provisioned inputs of the tiny model, in process on the same instance (their runs are in PostgreSQL too)
    import dagster as dg

    from tests.tiny_graph import materialize, step_error

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DDR_PG_DB", database)
    umask = os.umask(0o002)  # as DDR_UMASK does in the services' processes
    try:
        with dg.DagsterInstance.get() as instance:
            for asset, key in [("models", "tiny"), ("saes", "tiny-sae"), ("prompt_datasets", "tiny-prompts")]:
                result = materialize(asset, key, data_root, instance)
                assert result.success, step_error(result)
    finally:
        os.umask(umask)

    port = _free_port()
    ui = Service(["ui", "--host", "127.0.0.1", "--port", str(port), "-w", str(workspace)], env, logs[2])
    daemon = Service(["daemon", "-w", str(workspace)], env, logs[0])
    gql = GraphQL(port, token)
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "scheduleName": "lab_test_capture"}
    try:
        # the UI answers only with the token
        def location_loaded() -> bool:
            entries = gql(LOCATIONS)["workspaceOrError"]["locationEntries"]
            entry = next(e for e in entries if e["name"] == LOCATION)
            loaded = entry["locationOrLoadError"]
            assert loaded is None or loaded["__typename"] != "PythonError", f"the code location failed: {loaded}"
            return loaded is not None

        _wait("the UI and its code location", location_loaded, 300, logs, every=2)
        anonymous = urllib.request.Request(gql.url, data=json.dumps({"query": DAEMONS}).encode(),
                                           headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(anonymous, timeout=30)
        assert refused.value.code in (401, 403)

        def daemons_healthy() -> bool:
            statuses = gql(DAEMONS)["instance"]["daemonHealth"]["allDaemonStatuses"]
            wanted = {"SCHEDULER", "SENSOR", "QUEUED_RUN_COORDINATOR", "BACKFILL", "MONITORING"}
            healthy = {s["daemonType"] for s in statuses if s["healthy"]}
            return wanted <= healthy

        _wait("the daemon's heartbeats (scheduler, sensors, run queue, backfills, monitoring)",
              daemons_healthy, 300, logs, every=2)

        # 1. the schedule, switched on through the UI; the daemon ticks it within a minute
        started = gql("""mutation ($selector: ScheduleSelector!) { startSchedule(scheduleSelector: $selector) { __typename
            ... on ScheduleStateResult { scheduleState { status } } ... on Error { message } } }""",
                      selector=selector)["startSchedule"]
        assert started.get("scheduleState", {}).get("status") == "RUNNING", started

        def scheduled_run() -> dict | None:
            runs = [r for r in gql(RUNS)["runsOrError"]["results"]
                    if _tag(r, "dagster/schedule_name") == "lab_test_capture"]
            failed = [r for r in runs if r["status"] in ("FAILURE", "CANCELED")]
            assert not failed, f"a scheduled run failed: {failed}"
            return next((r for r in runs if r["status"] == "SUCCESS"), None)

        capture_run = _wait("the scheduled capture to succeed", scheduled_run, 240, logs, every=3)
        assert capture_run["jobName"] == "capture_activations"
        assert _tag(capture_run, "dagster/partition") == "tiny"
        assert _tag(capture_run, "ddr/launched_by") == "lab_test_capture"
        assert list(data_root.rglob("activations/tiny/generations.parquet")), "the capture wrote no generations"
        # switched off again (the next ticks would only find the capture complete): the state is stored too
        stopped = gql("""mutation ($id: String!) { stopRunningSchedule(id: $id) { __typename
            ... on ScheduleStateResult { scheduleState { status } } ... on Error { message } } }""",
                      id=gql(SCHEDULE, selector=selector)["scheduleOrError"]["scheduleState"]["id"])
        assert stopped["stopRunningSchedule"].get("scheduleState", {}).get("status") == "STOPPED", stopped

        # 2. a backfill over both tiny variants, launched through the UI, run by the daemon
        launched = gql("""mutation ($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }""",
                       params={"assetSelection": [{"path": ["timestep_stats"]}],
                               "partitionNames": ["tiny-raw", "tiny-sae"],
                               "runConfigData": {"execution": {"config": {"in_process": {}}}},
                               "title": "lab test backfill"})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]

        def backfill_done() -> dict | None:
            backfill = next(b for b in gql(BACKFILLS)["partitionBackfillsOrError"]["results"] if b["id"] == backfill_id)
            assert backfill["status"] not in ("FAILED", "CANCELED", "COMPLETED_FAILED"), backfill
            return backfill if backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS") else None

        _wait("the backfill to complete", backfill_done, 300, logs, every=3)
        backfill_runs = [r for r in gql(RUNS)["runsOrError"]["results"] if _tag(r, "dagster/backfill") == backfill_id]
        assert backfill_runs and all(r["status"] == "SUCCESS" for r in backfill_runs), backfill_runs
        assert sorted(_tag(r, "dagster/partition") or "" for r in backfill_runs) in (
            ["tiny-raw", "tiny-sae"], [""])  # one run per partition, or one single-run backfill

        # 3. the UI lists them all; the rows are in PostgreSQL, nothing in SQLite
        def all_runs_finished() -> bool:
            return all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in gql(RUNS)["runsOrError"]["results"])

        _wait("every run to finish", all_runs_finished, 240, logs, every=3)
        before = _snapshot(gql, selector)
        assert capture_run["runId"] in before["runs"] and backfill_id in before["backfills"]
        assert any(capture_run["runId"] in t["runIds"] for t in before["ticks"].values())
        for run_id in before["runs"]:
            assert any(e["__typename"] == "RunSuccessEvent" for e in before["logs"][run_id]), run_id
        with _connect(database) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            assert cursor.fetchone()[0] == len(before["runs"])
            cursor.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (capture_run["runId"],))
            assert cursor.fetchone()[0] == len(before["logs"][capture_run["runId"]])
            cursor.execute("SELECT count(*) FROM bulk_actions")
            assert cursor.fetchone()[0] == 1
            cursor.execute("SELECT count(*) FROM job_ticks")
            assert cursor.fetchone()[0] >= 1
        assert not list(home.rglob("*.db")), f"SQLite files in DAGSTER_HOME: {list(home.rglob('*.db'))}"
        # what the daemon's runs wrote (data, compute logs) is the group's: group-writable, setgid folders
        assert list(data_root.rglob("timestep_stats*")), "the backfill wrote no statistics"
        assert problems(data_root, group) == [] and problems(home, group) == []

        # 4. the daemon dies; a run launched meanwhile waits in the queue; a new daemon loses nothing
        daemon.kill()
        queued = gql("""mutation ($params: ExecutionParams!) { launchRun(executionParams: $params) {
            __typename ... on LaunchRunSuccess { run { runId status } } ... on Error { message } } }""",
                     params={"selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY,
                                          "jobName": "compute_timestep_stats"},
                             "runConfigData": {"execution": {"config": {"in_process": {}}},
                                               "ops": {"timestep_stats": {"config": {"top_k": 3}}}},
                             "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "tiny-raw"}]}}
                     )["launchRun"]
        assert queued["__typename"] == "LaunchRunSuccess", queued
        queued_id = queued["run"]["runId"]
        time.sleep(5)
        status = {r["runId"]: r["status"] for r in gql(RUNS)["runsOrError"]["results"]}
        assert status[queued_id] == "QUEUED", "without a daemon nothing should dequeue the run"

        daemon = Service(["daemon", "-w", str(workspace)], env, logs[1])
        # and the schedule, switched on again, ticks under the new daemon
        restarted = gql("""mutation ($selector: ScheduleSelector!) { startSchedule(scheduleSelector: $selector) {
            __typename ... on ScheduleStateResult { scheduleState { status } } ... on Error { message } } }""",
                        selector=selector)["startSchedule"]
        assert restarted.get("scheduleState", {}).get("status") == "RUNNING", restarted

        def queued_run_done() -> bool:
            run = next(r for r in gql(RUNS)["runsOrError"]["results"] if r["runId"] == queued_id)
            assert run["status"] not in ("FAILURE", "CANCELED"), run
            return run["status"] == "SUCCESS"

        _wait("the run queued while the daemon was down to succeed", queued_run_done, 300, logs, every=3)
        ticks_before = len(before["ticks"])
        def new_tick_with_a_run() -> bool:
            ticks = gql(SCHEDULE, selector=selector)["scheduleOrError"]["scheduleState"]["ticks"]
            return any(t["tickId"] not in before["ticks"] and t["runIds"] for t in ticks)

        _wait("the schedule to tick (and launch a run) under the new daemon", new_tick_with_a_run, 120, logs, every=3)
        assert len(gql(SCHEDULE, selector=selector)["scheduleOrError"]["scheduleState"]["ticks"]) > ticks_before

        after = _snapshot(gql, selector)
        for run_id, run in before["runs"].items():
            assert after["runs"][run_id] == run, f"run {run_id} changed across the restart"
            assert after["logs"][run_id] == before["logs"][run_id], f"the event log of {run_id} changed"
        for tick_id, tick in before["ticks"].items():
            # a tick finished before the restart is unchanged
            if tick["status"] != "STARTED":
                assert after["ticks"][tick_id] == tick, f"tick {tick_id} changed across the restart"
        assert after["backfills"][backfill_id] == before["backfills"][backfill_id]
        # one scheduled run per tick time: a restarted daemon does not launch a tick's runs twice
        keys = [_tag(r, "dagster/run_key") for r in after["runs"].values()
                if _tag(r, "dagster/schedule_name") == "lab_test_capture"]
        assert len(keys) == len(set(keys)), keys
    finally:
        daemon.stop()
        ui.stop()
