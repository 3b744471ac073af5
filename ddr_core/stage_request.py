"""What a stage job is asked to do, and the two files that say how it ended.

:class:`StageRequest` names a registered stage (:mod:`ddr_core.stages`) with JSON arguments; a job's
**completion report** ``<outputs>/_jobs/<invocation_id>.json`` is written (atomically) only after the stage
returned, its **error report** ``<invocation_id>.error.json`` when it failed. :class:`JobReports` is the one
writer of both, for a single process (:mod:`ddr_core.cluster_payload`), rank 0 of several and the launcher
of ranks (:mod:`ddr_core.distributed`). No Dagster and no torch here: the job side and the Dagster side
both import it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from ddr_core.paths import UnsafePathError, check_name

REPORT_VERSION = 1
LogFn = Callable[[str], None]


class StageRequest(BaseModel):
    """What a job runs: a registered stage function with JSON arguments, on one experiment.

    ``data_root`` is the data root *as the machine running the stage sees it* (a shared filesystem
    mounted at another path on the cluster is fine); ``config_path`` the project config there.
    """

    stage: str = Field(description="a name in ddr_core.stages.STAGES")
    args: dict[str, Any] = Field(default_factory=dict, description="JSON arguments of the stage")
    data_root: str
    experiment: str
    config_path: str | None = Field(default=None, description="project config; None: DDR_CONFIG / default")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    invocation_id: str = Field(description="unique per call; names the completion report")
    lock_owner: str = ""
    processes: int = Field(default=1, ge=1, description="ranks (one per GPU) on this node; > 1 runs the stage "
                                                        "under torchrun with that many processes")

    @field_validator("experiment", "invocation_id")
    @classmethod
    def _safe_name(cls, value: str, info: Any) -> str:
        try:  # both name files under <data_root>/outputs/<experiment>/_jobs/
            return check_name(value, info.field_name)
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from None


class StageFailed(RuntimeError):
    """The stage function raised; the message names the stage, invocation and SLURM job."""


def json_safe(value: Any) -> Any:
    """Paths -> str, NaN/inf -> None, tuples/sets -> lists, dict keys -> str (for strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return json_safe(value.item())  # numpy / torch scalars
    return value


def jobs_dir(data_root: str | Path, experiment: str) -> Path:
    """Where completion reports live: ``<data_root>/outputs/<experiment>/_jobs``."""
    from ddr_core.paths import DataLayout

    return DataLayout(data_root, experiment).outputs_dir / "_jobs"


def report_path(data_root: str | Path, experiment: str, invocation_id: str) -> Path:
    return jobs_dir(data_root, experiment) / f"{invocation_id}.json"


def error_path(data_root: str | Path, experiment: str, invocation_id: str) -> Path:
    return jobs_dir(data_root, experiment) / f"{invocation_id}.error.json"


class JobReports:
    """The completion and error reports of one request: cleared at the start, one of them written at the end.

    ``world_size``: recorded for multi-process jobs (``None``: a single process).
    """

    def __init__(self, request: StageRequest, world_size: int | None = None) -> None:
        self.request = request
        self.report = report_path(request.data_root, request.experiment, request.invocation_id)
        self.errors = error_path(request.data_root, request.experiment, request.invocation_id)
        self.job_id = os.environ.get("SLURM_JOB_ID")
        self.base: dict[str, Any] = {
            "report_version": REPORT_VERSION, "invocation_id": request.invocation_id, "stage": request.stage,
            "args": request.args, "host": socket.gethostname(), "slurm_job_id": self.job_id}
        if world_size is not None:
            self.base["world_size"] = world_size

    @property
    def where(self) -> str:
        """`` (SLURM job N)`` inside a SLURM job, else ``""``."""
        return f" (SLURM job {self.job_id})" if self.job_id else ""

    def clear(self, *, errors: bool = False) -> None:
        """Remove a previous completion report (and error report) of this invocation."""
        self.report.unlink(missing_ok=True)
        if errors:
            self.errors.unlink(missing_ok=True)

    def write_success(self, result: Any, seconds: float, **extra: Any) -> dict[str, Any]:
        """Write the completion report (the error report of an earlier attempt goes) and return it as read back."""
        from ddr_core.atomic import atomic_write_json

        finished = {**self.base, "result": result, **extra, "seconds": seconds,
                    "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.errors.unlink(missing_ok=True)
        atomic_write_json(self.report, json_safe(finished))
        return json.loads(self.report.read_text(encoding="utf-8"))

    def write_error(self, error: str, traceback_tail: str, seconds: float | None = None, *,
                    log: LogFn | None = None, **extra: Any) -> str:
        """Write the error report; returns ``""``, or why it could not be written (a full disk, a value that is
        not JSON). Never raises: the caller raises the stage's own error, which a failure here must not
        replace; ``log`` gets the stage's error first, then the report's failure."""
        from ddr_core.atomic import atomic_write_json

        payload = {**self.base, "error": error, **extra, "traceback_tail": traceback_tail}
        if seconds is not None:
            payload["seconds"] = seconds
        try:
            self.errors.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.errors, json_safe(payload))
        except Exception as exc:  # noqa: BLE001 - reported, never raised over the stage's error
            problem = f"the error report {self.errors} could not be written either ({type(exc).__name__}: {exc})"
            if log is not None:
                log(f"stage {self.request.stage!r} failed: {error}")
                log(problem)
            return f" [{problem}]"
        return ""

    def read_error(self) -> dict[str, Any]:
        return json.loads(self.errors.read_text(encoding="utf-8")) if self.errors.is_file() else {}

    def read_report(self) -> dict[str, Any] | None:
        return json.loads(self.report.read_text(encoding="utf-8")) if self.report.is_file() else None
