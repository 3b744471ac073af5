"""Run one ddr_core stage function by name, in-process or as a job payload (SLURM via dagster-slurm).

This module is the *one code path* for the work of the GPU stages: local execution calls
:func:`run_stage` in-process; a cluster job runs this file as a script (``python cluster_payload.py``,
uploaded by dagster-slurm and executed with the cluster's pre-deployed venv, where ``ddr`` is
installed), which reads the same :class:`StageRequest` from the Dagster Pipes ``extras`` and calls the
same :func:`run_stage`.

The job's completion report (``<outputs>/_jobs/<invocation_id>.json``) is written atomically and
**only after the stage function returned**; the Dagster side records a materialization only when
that report exists and names its invocation, so no scheduler or client state can turn a crashed job
into a success. A failing stage writes ``<invocation_id>.error.json`` instead (exception, traceback
tail, SLURM job id) and exits non-zero.

Imports no Dagster: the payload uses ``dagster_pipes`` (a dependency-free package) when it runs
under Pipes, and also works from the command line: ``python -m ddr_core.cluster_payload request.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

REPORT_VERSION = 1
LogFn = Callable[[str], None]


class StageRequest(BaseModel):
    """What a job runs: a registered stage function with JSON arguments, on one experiment.

    ``data_root`` is the data root *as the machine running the stage sees it* (a shared filesystem
    mounted at another path on the cluster is fine); ``config_path`` the project config there.
    """

    stage: str = Field(description="a name in STAGES")
    args: dict[str, Any] = Field(default_factory=dict, description="JSON arguments of the stage")
    data_root: str
    experiment: str
    config_path: str | None = Field(default=None, description="project config; None: DDR_CONFIG / default")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    invocation_id: str = Field(description="unique per call; names the completion report")
    lock_owner: str = ""


class StageFailed(RuntimeError):
    """The stage function raised; the message names the stage, invocation and SLURM job."""


# ------------------------------------------------------------------------------------------- helpers
def _json_safe(value: Any) -> Any:
    """Paths -> str, NaN/inf -> None, tuples/sets -> lists, dict keys -> str (for strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return _json_safe(value.item())  # numpy / torch scalars
    return value


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def jobs_dir(data_root: str | Path, experiment: str) -> Path:
    """Where completion reports live: ``<data_root>/outputs/<experiment>/_jobs``."""
    from ddr_core.paths import DataLayout

    return DataLayout(data_root, experiment).outputs_dir / "_jobs"


def report_path(data_root: str | Path, experiment: str, invocation_id: str) -> Path:
    return jobs_dir(data_root, experiment) / f"{invocation_id}.json"


def error_path(data_root: str | Path, experiment: str, invocation_id: str) -> Path:
    return jobs_dir(data_root, experiment) / f"{invocation_id}.error.json"


def _context(request: StageRequest):
    from ddr_core.config import load_project_config
    from ddr_core.paths import DataLayout

    project = load_project_config(request.config_path)
    return project, DataLayout(request.data_root, request.experiment)


# ------------------------------------------------------------------------------------------- stages
def _stage_selftest(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """Environment facts of the machine running the job; ``args.fail`` raises (tests the failure path)."""
    log(f"selftest on {socket.gethostname()} (python {platform.python_version()})")
    if request.args.get("fail"):
        raise RuntimeError(str(request.args.get("message", "selftest asked to fail")))
    result: dict[str, Any] = {"host": socket.gethostname(), "python": platform.python_version(),
                              "executable": sys.executable, "echo": request.args.get("echo")}
    if request.args.get("torch", False):
        import torch

        result.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(),
                      device=str(_resolve_device(request.device)))
    return result


def _stage_capture_group(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.activations.capture_group``; args: ``group``, ``config`` (CaptureConfig fields),
    optional ``stop_after_batches``."""
    from ddr_core.activations import CaptureConfig, capture_group

    project, layout = _context(request)
    config = CaptureConfig.model_validate(request.args.get("config", {}))
    result = capture_group(project, layout, request.args["group"], config, _resolve_device(request.device),
                           log=log, stop_after_batches=request.args.get("stop_after_batches"),
                           lock_owner=request.lock_owner)
    return {"root": layout.relative(result.root), "batches_done": result.batches_done,
            "batches_skipped": result.batches_skipped, "seconds": result.seconds, "images": result.images,
            "seconds_per_image": result.seconds_per_image, "summary": result.summary}


def _stage_priors_for_variant(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.priors.priors_for_variant``; args: ``variant``, ``channels`` (list or null), ``config``."""
    from ddr_core.priors import PriorsConfig, priors_for_variant

    project, layout = _context(request)
    config = PriorsConfig.model_validate(request.args.get("config", {}))
    result = priors_for_variant(project, layout, request.args["variant"], request.args.get("channels"), config,
                                _resolve_device(request.device), log=log,
                                stop_after_channels=request.args.get("stop_after_channels"),
                                lock_owner=request.lock_owner)
    return {"out_dir": layout.relative(result.out_dir), "done": result.done, "skipped": result.skipped,
            "resumed": result.resumed, "seconds": result.seconds, "images": result.images}


def _stage_dreams_for_variant(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """``ddr_core.dreams.dreams_for_variant``; args: ``variant``, ``channels``, ``config``, ``stage``
    (``dreams`` / ``dreams_no_noise``). The quality table stays on disk (``quality_path``)."""
    from ddr_core.dreams import DreamConfig, dreams_for_variant

    project, layout = _context(request)
    config = DreamConfig.model_validate(request.args.get("config", {}))
    result = dreams_for_variant(project, layout, request.args["variant"], request.args.get("channels"), config,
                                _resolve_device(request.device), log=log,
                                stop_after_channels=request.args.get("stop_after_channels"),
                                stage=request.args.get("stage", "dreams"), lock_owner=request.lock_owner)
    return {"out_dir": layout.relative(result.out_dir), "channels_done": result.channels_done,
            "channels_skipped": result.channels_skipped,
            "channels_without_timesteps": result.channels_without_timesteps, "elements": result.elements,
            "element_steps": result.element_steps, "failures": result.failures, "seconds": result.seconds,
            "quality_path": layout.relative(result.quality_path) if result.quality_path else None}


STAGES: dict[str, Callable[[StageRequest, LogFn], dict[str, Any]]] = {
    "selftest": _stage_selftest,
    "capture_group": _stage_capture_group,
    "priors_for_variant": _stage_priors_for_variant,
    "dreams_for_variant": _stage_dreams_for_variant,
}


# ------------------------------------------------------------------------------------------- running
def run_stage(request: StageRequest, log: LogFn | None = None) -> dict[str, Any]:
    """Run the requested stage and write its completion report; return the report.

    On an exception, writes the error report (exception, traceback tail, SLURM job id) and raises
    :class:`StageFailed`; no completion report is written then.
    """
    log = log or (lambda message: print(message, flush=True))
    if request.stage not in STAGES:
        raise ValueError(f"unknown stage {request.stage!r}; registered stages: {sorted(STAGES)}")
    job_id = os.environ.get("SLURM_JOB_ID")
    base = {"report_version": REPORT_VERSION, "invocation_id": request.invocation_id, "stage": request.stage,
            "args": request.args, "host": socket.gethostname(), "slurm_job_id": job_id}
    report = report_path(request.data_root, request.experiment, request.invocation_id)
    errors = error_path(request.data_root, request.experiment, request.invocation_id)
    report.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        result = STAGES[request.stage](request, log)
    except BaseException as exc:
        from ddr_core.atomic import atomic_write_json

        tail = "".join(traceback.format_exception(exc))[-4000:]
        errors.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(errors, _json_safe({**base, "error": f"{type(exc).__name__}: {exc}",
                                              "traceback_tail": tail,
                                              "seconds": time.perf_counter() - started}))
        where = f" (SLURM job {job_id})" if job_id else ""
        raise StageFailed(f"stage {request.stage!r} invocation {request.invocation_id}{where} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    from ddr_core.atomic import atomic_write_json

    finished = {**base, "result": result, "seconds": time.perf_counter() - started,
                "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    report.parent.mkdir(parents=True, exist_ok=True)
    errors.unlink(missing_ok=True)
    atomic_write_json(report, _json_safe(finished))
    return json.loads(report.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of a job run from a JSON request file. Under Dagster Pipes (a SLURM job launched by
    dagster-slurm) the entry point is ``dagster_project/slurm_payload.py``, which reads the request from
    the Pipes extras and calls :func:`run_stage`; this module stays free of any Dagster import."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ddr_core.cluster_payload REQUEST.json  (or run under Dagster Pipes)",
              file=sys.stderr)
        return 2
    request = StageRequest.model_validate_json(Path(argv[0]).read_text(encoding="utf-8"))
    run_stage(request)
    return 0


if __name__ == "__main__":
    sys.exit(main())
