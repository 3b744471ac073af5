"""The stage runner shared by local and SLURM execution: completion report only on success."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddr_core import atomic
from ddr_core.cluster_payload import StageFailed, StageRequest, error_path, report_path, run_stage


def request(tmp_path: Path, **args) -> StageRequest:
    return StageRequest(stage="selftest", args=args, data_root=str(tmp_path), experiment="default",
                        invocation_id="inv1")


def test_success_writes_the_report_and_no_error(tmp_path):
    report = run_stage(request(tmp_path, echo={"x": [1, 2]}), log=lambda m: None)
    on_disk = json.loads(report_path(tmp_path, "default", "inv1").read_text())
    assert on_disk == report
    assert report["invocation_id"] == "inv1" and report["result"]["echo"] == {"x": [1, 2]}
    assert not error_path(tmp_path, "default", "inv1").exists()


def test_failure_writes_only_the_error_report(tmp_path):
    run_stage(request(tmp_path), log=lambda m: None)  # a stale success of the same invocation is removed
    with pytest.raises(StageFailed, match="boom"):
        run_stage(request(tmp_path, fail=True, message="boom"), log=lambda m: None)
    assert not report_path(tmp_path, "default", "inv1").exists()
    error = json.loads(error_path(tmp_path, "default", "inv1").read_text())
    assert "RuntimeError: boom" in error["error"] and "Traceback" in error["traceback_tail"]


def test_unknown_stage_names_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match="capture_group"):
        run_stage(StageRequest(stage="nope", data_root=str(tmp_path), experiment="default", invocation_id="i"))


def test_payload_script_runs_without_dagster(tmp_path):
    """The cluster-side entry point never imports dagster (only dagster_pipes under Pipes)."""
    req = request(tmp_path, echo="cli")
    path = tmp_path / "request.json"
    path.write_text(req.model_dump_json())
    script = ("import sys, runpy; sys.modules['dagster'] = None; sys.argv = ['x', sys.argv[1]]; "
              "runpy.run_path('ddr_resources/slurm_payload.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(report_path(tmp_path, "default", "inv1").read_text())["result"]["echo"] == "cli"


class FullDisk:
    """``ddr_core.atomic``'s view of ``os`` on a full disk: every ``os.replace`` fails with ENOSPC (the file
    system keeps failing: the error report cannot be written either)."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, src, dst) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_at_the_error_report_raises_the_stages_error_not_the_reports(tmp_path, monkeypatch):
    """The stage fails, then its error report cannot be written (disk full): what is raised (and logged first)
    is the stage's own error; the report's failure, with its path, is only mentioned."""
    logged: list[str] = []
    monkeypatch.setattr(atomic, "os", FullDisk())
    with pytest.raises(StageFailed) as failure:
        run_stage(request(tmp_path, fail=True, message="boom"), log=logged.append)
    message = str(failure.value)
    errors = error_path(tmp_path, "default", "inv1")
    assert message.startswith("stage 'selftest' invocation inv1 failed: RuntimeError: boom [")
    assert f"the error report {errors} could not be written either (OSError: [Errno 28] could not write file " \
           f"{errors}: No space left on device" in message
    assert isinstance(failure.value.__cause__, RuntimeError) and str(failure.value.__cause__) == "boom"
    assert logged[-2].endswith("failed: RuntimeError: boom") and "could not be written either" in logged[-1]
    assert not errors.exists() and not report_path(tmp_path, "default", "inv1").exists()
    assert not [p for p in errors.parent.iterdir() if atomic.is_temp_name(p.name)]


def test_an_unreadable_error_report_does_not_replace_the_failure(tmp_path):
    """The Dagster side reads the error report for detail only: a report it cannot read is no report."""
    from ddr_resources.slurm import read_error

    req = request(tmp_path)
    path = error_path(tmp_path, "default", "inv1")
    path.parent.mkdir(parents=True)
    for content in (b'{"error": "trunc', b"\xff\xfe", b"[1, 2]"):
        path.write_bytes(content)
        assert read_error(req, tmp_path) is None
    path.write_text(json.dumps({"error": "RuntimeError: boom"}))
    assert read_error(req, tmp_path) == {"error": "RuntimeError: boom"}
