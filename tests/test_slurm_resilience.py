"""Preemption and time limits without a cluster: the payload's stop on Slurm's signal before the time limit,
the job options that ask for it, and the wrapper's classification + Dagster step retry.

The same on the loopback cluster (real ``sbatch``, ``scontrol requeue``, a time limit):
tests/test_slurm_cluster.py ``test_requeue_mid_*`` and ``test_time_limit_signal_*``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from ddr_core.progress import Progress, StopRequested, clear_stop, request_stop
from ddr_core.slurm_options import SlurmJobOptions
from ddr_core.stage_request import StageRequest, error_path, report_path
from ddr_resources import slurm
from ddr_resources.slurm import SlurmSettings, _interruption, run_stage_on_slurm

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_ENV = {"DDR_SLURM_HOST": "login.example.org", "DDR_SLURM_USER": "someone",
                "DDR_SLURM_KEY_PATH": "/home/someone/.ssh/id_ed25519", "DDR_SLURM_ENV_PATH": "/opt/ddr/env"}


def _request(tmp_path: Path, **args) -> StageRequest:
    return StageRequest(stage="selftest", args=args, data_root=str(tmp_path), experiment="default",
                        invocation_id="0123456789abcdef0123456789abcdef")


def test_usr1_stops_the_payload_after_the_unit_in_progress_and_a_rerun_resumes(tmp_path):
    """The job payload (the script dagster-slurm runs) gets USR1 as Slurm sends it before the time limit:
    it stops after the unit in progress, writes an ``interrupted`` error report, exits non-zero; a rerun
    does only the remaining units, the finished ones untouched."""
    request = _request(tmp_path, units=40, unit_seconds=0.1)
    request_file = tmp_path / "request.json"
    request_file.write_text(request.model_dump_json(), encoding="utf-8")
    units = tmp_path / "selftest_units"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    payload = [sys.executable, str(ROOT / "ddr_resources/slurm_payload.py"), str(request_file)]
    process = subprocess.Popen(payload, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(list(units.glob("unit_*"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0, output
    error = json.loads(error_path(tmp_path, "default", request.invocation_id).read_text())
    assert "USR1" in error["interrupted"] and error["error"].startswith("StopRequested"), error
    assert not report_path(tmp_path, "default", request.invocation_id).exists()
    first = {p.name: p.stat().st_mtime_ns for p in units.glob("unit_*")}
    assert 2 <= len(first) < 40, sorted(first)
    assert not [p for p in units.iterdir() if not p.name.startswith("unit_")]  # nothing half-written

    rerun = subprocess.run(payload, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = json.loads(report_path(tmp_path, "default", request.invocation_id).read_text())
    assert len(report["result"]["units_done"]) == 40 - len(first)
    after = {p.name: p.stat().st_mtime_ns for p in units.glob("unit_*")}
    assert len(after) == 40 and {name: after[name] for name in first} == first  # not redone


def test_a_stop_request_takes_effect_after_a_unit_never_after_the_last():
    clear_stop()
    try:
        with Progress(3, "test", unit="unit") as progress:
            progress.update()
            request_stop("test stop")
            with pytest.raises(StopRequested, match="test stop"):
                progress.update()
        with Progress(1, "test", unit="unit") as progress:
            progress.update()  # the last unit: the work is complete, nothing to stop
    finally:
        clear_stop()
    with Progress(2, "test", unit="unit") as progress:
        progress.update()
        progress.update()


def test_signal_before_timeout_becomes_an_sbatch_line_inside_the_time_limit():
    options = SlurmJobOptions(time_limit="02:00:00", signal_before_timeout=300, retries=3)
    assert "#SBATCH --signal=B:USR1@300" in options.sbatch_directives()
    assert SlurmJobOptions(signal_before_timeout=0).sbatch_directives() == []
    with pytest.raises(ValueError, match="not shorter than time_limit"):
        SlurmJobOptions(time_limit="00:05:00", signal_before_timeout=300)
    with pytest.raises(ValueError, match="not shorter than time_limit"):  # also when merged over defaults
        SlurmJobOptions(time_limit="01:00:00", signal_before_timeout=600).merged({"time_limit": "00:10:00"})
    assert SlurmJobOptions(time_limit="1-00:00:00", signal_before_timeout=7200).signal_before_timeout == 7200
    settings = SlurmSettings.from_env({**SETTINGS_ENV, "DDR_SLURM_SIGNAL_BEFORE_TIMEOUT": "120",
                                       "DDR_SLURM_RETRIES": "5"})
    assert (settings.job.signal_before_timeout, settings.job.retries) == (120, 5)
    assert SlurmSettings.from_env(SETTINGS_ENV).job.retries == 2
    with pytest.raises(ValueError, match="DDR_SLURM_RETRIES is '-1'"):
        SlurmSettings.from_env({**SETTINGS_ENV, "DDR_SLURM_RETRIES": "-1"})


class FakeJobFiles:
    """What Slurm says about a job (``fate``) and which jobs were cancelled."""

    def __init__(self, queued: str = "", accounted: tuple[str, ...] = ()):
        self.queued, self.accounted, self.cancelled = queued, list(accounted), []

    def fate(self, job_id):
        return self.queued, self.accounted

    def cancel(self, job_id):
        self.cancelled.append(job_id)


@pytest.mark.parametrize(("error", "message", "files", "interrupted", "cancelled"), [
    ({"interrupted": "Slurm's signal SIGUSR1 before the job's time limit"}, "Job 7 did not complete", None,
     "signal SIGUSR1", []),
    ({}, "Job 7 was PREEMPTED. This may have been", FakeJobFiles(), "PREEMPTED", []),
    ({}, "Job 7 did not complete successfully. Final state: TIMEOUT.", FakeJobFiles(), "TIMEOUT", []),
    ({}, "Job 7 did not complete successfully. Final state: NODE_FAIL.", None, "NODE_FAIL", []),
    # dagster-slurm saw PREEMPTED while Slurm requeued the job: the requeued copy must not run beside the retry
    ({}, "Job 7 was PREEMPTED.", FakeJobFiles("PENDING", ("PREEMPTED",)), "requeued", ["7"]),
    ({}, "Job 7 was CANCELLED.", FakeJobFiles("", ("REQUEUED", "CANCELLED")), "REQUEUED", []),
    # failures of the job itself are not retried
    ({}, "Job 7 was CANCELLED. This may have been triggered by scancel", FakeJobFiles("", ("CANCELLED",)), None, []),
    ({}, "Job 7 did not complete successfully. Final state: OUT_OF_MEMORY.", FakeJobFiles(), None, []),
    ({"error": "RuntimeError: boom"}, "Job 7 did not complete successfully. Final state: FAILED.", FakeJobFiles(),
     None, []),
])
def test_interrupted_ends_are_told_from_failures(error, message, files, interrupted, cancelled):
    found = _interruption(error, RuntimeError(message), "7", files)
    if interrupted is None:
        assert found is None
    else:
        assert found is not None and interrupted in found
    assert (files.cancelled if files else []) == cancelled


class FlakyCompute:
    """Stands in for dagster-slurm's ComputeResource: each call is one "job"; the first ``interruptions``
    raise as dagster-slurm does for a preempted job, then a job runs the stage like the payload would."""

    def __init__(self, interruptions: int, data_root: Path):
        self.interruptions, self.data_root, self.calls = interruptions, data_root, 0

    def run(self, *, context, extras, **_):
        self.calls += 1
        if self.calls <= self.interruptions:
            raise RuntimeError(f"Job {100 + self.calls} was PREEMPTED. This may have been triggered by scancel, "
                               f"administrator action, or resource limits.")
        from ddr_core.cluster_payload import run_stage

        run_stage(StageRequest.model_validate(extras["request"]))


@pytest.mark.parametrize(("interruptions", "retries", "succeeds"), [(2, 2, True), (1, 0, False)])
def test_a_preempted_job_is_retried_by_dagster_up_to_retries(tmp_path, interruptions, retries, succeeds):
    compute = FlakyCompute(interruptions, tmp_path)
    settings = SlurmSettings.from_env({**SETTINGS_ENV, "DDR_SLURM_RETRIES": str(retries)})

    @dg.asset
    def stage(context: dg.AssetExecutionContext) -> None:
        request = slurm.new_request("selftest", {"echo": "hi"}, data_root=tmp_path, experiment="default")
        report = run_stage_on_slurm(context, request, local_data_root=tmp_path, settings=settings, compute=compute)
        context.add_output_metadata({"echo": report["result"]["echo"]})

    result = dg.materialize([stage], raise_on_error=False)
    assert result.success is succeeds
    retried = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retried) == min(interruptions, retries)
    assert compute.calls == min(interruptions, retries) + 1
    if not succeeds:
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        message = str(failure.event_specific_data.error)
        assert "PREEMPTED" in message and "resubmission(s)" in message and "are used up" in message
