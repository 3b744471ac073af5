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

Several GPUs in one job (:mod:`ddr_core.distributed`): under ``torchrun`` or ``srun`` (``WORLD_SIZE``
/ ``SLURM_STEP_NUM_TASKS`` > 1) every process is a rank and runs its share -- capture: shard
``shard_index + num_shards * rank`` of ``num_shards * world_size`` (the existing shard mechanism);
priors and dreams: the requested channels, sorted, dealt round-robin -- then the ranks meet, and rank
0 alone writes the partition-level tables (the dreams quality table) and the completion report (with
``world_size`` and one summary per rank). A failure on any rank makes rank 0 write the error report
naming it, and every rank fails. A request with ``processes > 1`` run in a single process starts the
ranks itself (:func:`ddr_core.distributed.launch`: ``torchrun --standalone``). One process
(``processes == 1`` and no launcher) runs exactly as before.

Imports no Dagster: the payload uses ``dagster_pipes`` (a dependency-free package) when it runs
under Pipes, and also works from the command line: ``python -m ddr_core.cluster_payload request.json``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ddr_core.progress import StopRequested
from ddr_core.stage_request import (
    REPORT_VERSION,
    JobReports,
    LogFn,
    StageFailed,
    StageRequest,
    error_path,
    jobs_dir,
    json_safe,
    report_path,
)
from ddr_core.stages import STAGES, request_for_rank, stage_spec

__all__ = ["REPORT_VERSION", "STAGES", "StageFailed", "StageRequest", "error_path", "jobs_dir", "main",
           "report_path", "request_for_rank", "run_stage"]


def _tail(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-4000:]


def run_stage(request: StageRequest, log: LogFn | None = None) -> dict[str, Any]:
    """Run the requested stage and write its completion report; return the report.

    On an exception, writes the error report (exception, traceback tail, SLURM job id) and raises
    :class:`StageFailed`; no completion report is written then.

    Under a launcher with several ranks this process runs its share (see the module docstring); with
    ``request.processes > 1`` and no launcher it starts ``processes`` ranks under torchrun and returns
    the report rank 0 wrote.
    """
    log = log or (lambda message: print(message, flush=True))
    spec = stage_spec(request.stage)
    from ddr_core.distributed import RankInfo

    info = RankInfo.from_env()
    if info.distributed:  # this process is one rank of a torchrun / srun job
        return _run_stage_as_rank(request, info, log)
    if request.processes > 1:  # start the ranks on this node
        from ddr_core.distributed import launch

        return launch(request, request.processes, log)
    reports = JobReports(request)
    reports.clear()
    started = time.perf_counter()
    try:
        result = spec.run(request, log)
    except BaseException as exc:
        # interrupted: a stop asked for from outside (Slurm's signal before the time limit) after finished
        # units were written: the Dagster side retries it, and the rerun resumes from those units
        extra = {"interrupted": str(exc)} if isinstance(exc, StopRequested) else {}
        unwritten = reports.write_error(f"{type(exc).__name__}: {exc}", _tail(exc), time.perf_counter() - started,
                                        log=log, **extra)
        raise StageFailed(f"stage {request.stage!r} invocation {request.invocation_id}{reports.where} failed: "
                          f"{type(exc).__name__}: {exc}{unwritten}") from exc
    return reports.write_success(result, time.perf_counter() - started)


def _rendezvous_file(request: StageRequest) -> Path | None:
    """Where srun ranks meet without MASTER_ADDR: a file per job step in the jobs folder."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    step = f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return jobs_dir(request.data_root, request.experiment) / f".rendezvous-{request.invocation_id}-{step}"


def _run_stage_as_rank(request: StageRequest, info: Any, log: LogFn) -> dict[str, Any]:
    """One rank of a multi-process job: its share, the meeting, and (rank 0) the report.

    Returns the completion report on rank 0 and this rank's status on the others.
    """
    import socket

    import torch

    from ddr_core.distributed import all_gather_json, device_for_rank, process_group

    def rank_log(message: str) -> None:
        log(f"[rank {info.rank}/{info.world_size}] {message}")

    spec = stage_spec(request.stage)
    reports = JobReports(request, world_size=info.world_size)
    started = time.perf_counter()
    setup_error: BaseException | None = None
    try:
        device = device_for_rank(request.device, info)
    except Exception as exc:  # still join the group, so that the others learn of it instead of waiting
        device, setup_error = torch.device("cpu"), exc
    phase = "could not join the other ranks"
    try:
        with process_group(info, device, rendezvous_file=_rendezvous_file(request)):
            phase = "lost contact with the other ranks (did one die without raising?)"
            if info.is_main:
                reports.clear()
            status: dict[str, Any] = {"rank": info.rank, "host": socket.gethostname(), "device": str(device)}
            try:
                if setup_error is not None:
                    raise setup_error
                mine = request_for_rank(request, info.rank, info.world_size, str(device))
                if mine is None:
                    rank_log("nothing to do: fewer channels than ranks")
                result = spec.run(mine, rank_log) if mine is not None else None
                status.update(ok=True, result=result)
            except BaseException as exc:
                status.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback_tail=_tail(exc))
            status["seconds"] = time.perf_counter() - started
            statuses = all_gather_json(json_safe(status))
            failed = [s for s in statuses if not s["ok"]]
            if info.is_main and not failed:
                try:
                    merged = spec.merge(request, [s["result"] for s in statuses if s["result"] is not None])
                except BaseException as exc:
                    status.update(ok=False, error=f"{type(exc).__name__}: {exc} (assembling the ranks' results)",
                                  traceback_tail=_tail(exc))
                    failed = [status]
    except BaseException as exc:  # the group could not be formed, or broke: who failed is not known here
        failed = [{"rank": info.rank, "host": socket.gethostname(), "ok": False, "lost_contact": True,
                   "error": f"{phase}: {type(exc).__name__}: {exc}", "traceback_tail": _tail(exc)}]
        statuses = failed
    if failed:
        first = failed[0]
        names = ", ".join(str(s["rank"]) for s in failed)
        error = f"rank {first['rank']} of {info.world_size} ({first['host']}): {first['error']}"
        unwritten = ""
        if info.is_main:
            unwritten = reports.write_error(
                error, first["traceback_tail"], time.perf_counter() - started, log=rank_log,
                failed_ranks=[s["rank"] for s in failed], lost_contact=any(s.get("lost_contact") for s in failed),
                rank_errors=[{k: s.get(k) for k in ("rank", "host", "error", "traceback_tail")} for s in failed])
        raise StageFailed(f"stage {request.stage!r} invocation {request.invocation_id}{reports.where} failed on "
                          f"rank(s) {names}: {error}{unwritten}")
    if not info.is_main:
        return status
    ranks = [{k: s.get(k) for k in ("rank", "host", "device", "seconds", "result")} for s in statuses]
    return reports.write_success(merged, time.perf_counter() - started, ranks=ranks)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a job run from a JSON request file. Under Dagster Pipes (a SLURM job launched by
    dagster-slurm) the entry point is ``ddr_resources/slurm_payload.py``, which reads the request from
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
