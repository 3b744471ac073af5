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
tail, SLURM job id) and exits non-zero. When that report cannot be written either (the disk is still full),
the stage's own error is what is raised and logged (naming its file); the report's failure is only mentioned.

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

from pydantic import BaseModel, Field, field_validator

from ddr_core.paths import UnsafePathError, check_name

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


def _write_error_report(path: Path, report: dict[str, Any], log: LogFn) -> str | None:
    """Write the error report ``path``; ``None``, or (logged) why it could not be written. Never raises: the
    caller raises the stage's own error, which must not be replaced by this one (a full disk fails both)."""
    from ddr_core.atomic import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, _json_safe(report))
    except Exception as error:  # OSError (disk full, read-only), or a report that is not JSON
        problem = f"the error report {path} could not be written either ({type(error).__name__}: {error})"
        log(problem)
        return problem
    return None


def _context(request: StageRequest):
    from ddr_core.config import load_project_config
    from ddr_core.paths import DataLayout

    project = load_project_config(request.config_path)
    return project, DataLayout(request.data_root, request.experiment)


# ------------------------------------------------------------------------------------------- stages
def _stage_selftest(request: StageRequest, log: LogFn) -> dict[str, Any]:
    """Environment facts of the machine running the job; ``args.fail`` raises (tests the failure path).

    Under several ranks, ``args.fail_rank`` raises on that rank only and ``args.exit_rank`` makes that
    rank die without raising (``os._exit(3)``, as a crash or the out-of-memory killer would).
    """
    from ddr_core.distributed import RankInfo

    log(f"selftest on {socket.gethostname()} (python {platform.python_version()})")
    rank = RankInfo.from_env().rank
    if request.args.get("fail") or request.args.get("fail_rank") == rank:
        raise RuntimeError(str(request.args.get("message", "selftest asked to fail")))
    if request.args.get("exit_rank") == rank:
        os._exit(3)
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

    Under a launcher with several ranks this process runs its share (see the module docstring); with
    ``request.processes > 1`` and no launcher it starts ``processes`` ranks under torchrun and returns
    the report rank 0 wrote.
    """
    log = log or (lambda message: print(message, flush=True))
    if request.stage not in STAGES:
        raise ValueError(f"unknown stage {request.stage!r}; registered stages: {sorted(STAGES)}")
    from ddr_core.distributed import RankInfo

    info = RankInfo.from_env()
    if info.distributed:  # this process is one rank of a torchrun / srun job
        return _run_stage_as_rank(request, info, log)
    if request.processes > 1:  # start the ranks on this node
        from ddr_core.distributed import launch

        return launch(request, request.processes, log)
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
        tail = "".join(traceback.format_exception(exc))[-4000:]
        where = f" (SLURM job {job_id})" if job_id else ""
        message = f"stage {request.stage!r} invocation {request.invocation_id}{where} failed: {type(exc).__name__}: {exc}"
        log(message)  # first: the cause is on record even if nothing can be written any more
        problem = _write_error_report(errors, {**base, "error": f"{type(exc).__name__}: {exc}", "traceback_tail": tail,
                                               "seconds": time.perf_counter() - started}, log)
        raise StageFailed(message + (f" [{problem}]" if problem else "")) from exc
    from ddr_core.atomic import atomic_write_json

    finished = {**base, "result": result, "seconds": time.perf_counter() - started,
                "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    report.parent.mkdir(parents=True, exist_ok=True)
    errors.unlink(missing_ok=True)
    atomic_write_json(report, _json_safe(finished))
    return json.loads(report.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------- ranks
def _all_channels(request: StageRequest) -> list[int]:
    """The requested channels of a per-channel stage, checked against the variant's width and sorted."""
    from ddr_core.priors import check_channels

    project, _ = _context(request)
    variant = request.args["variant"]
    if variant not in project.variants:
        raise KeyError(f"unknown variant {variant!r}; declared: {sorted(project.variants)}")
    width = project.variants[variant].width
    channels = request.args.get("channels")
    if channels is None:
        return list(range(width))
    return sorted(check_channels(channels, width, f"variant {variant!r}"))


def request_for_rank(request: StageRequest, rank: int, world_size: int, device: str) -> StageRequest | None:
    """The part of ``request`` that one rank runs, or ``None`` when the rank has nothing to do.

    capture: shard ``shard_index + num_shards * rank`` of ``num_shards * world_size`` (batches
    ``b % (num_shards * world_size)``; a job that is itself shard ``i`` of ``n`` keeps ``b % n == i``);
    priors / dreams: the sorted channels dealt round-robin (``channels[rank::world_size]``);
    selftest: the request as it is. ``device``: the rank's own device.
    """
    from ddr_core.distributed import split_round_robin

    args = dict(request.args)
    owner = f"{request.lock_owner} rank {rank}/{world_size}".strip()
    if request.stage == "capture_group":
        config = dict(args.get("config") or {})
        num_shards, shard_index = int(config.get("num_shards", 1)), int(config.get("shard_index", 0))
        config.update(shard_index=shard_index + num_shards * rank, num_shards=num_shards * world_size)
        args["config"] = config
    elif request.stage in ("priors_for_variant", "dreams_for_variant"):
        channels = _all_channels(request)
        mine = split_round_robin(channels, rank, world_size)
        if channels and not mine:
            return None
        args["channels"] = mine
    return request.model_copy(update={"args": args, "device": device, "processes": 1, "lock_owner": owner})


def _union(results: list[dict[str, Any]], key: str) -> list[Any]:
    return sorted({value for result in results for value in result.get(key) or []})


def _merge_capture(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    complete = [r["summary"] for r in results if r["summary"].get("complete")]
    images = sum(r["images"] for r in results)
    seconds = max(r["seconds"] for r in results)
    return {"root": results[0]["root"], "batches_done": _union(results, "batches_done"),
            "batches_skipped": _union(results, "batches_skipped"), "seconds": seconds, "images": images,
            "seconds_per_image": seconds / images if images else float("nan"),
            # the rank that found every batch finished assembled generations.parquet
            "summary": complete[0] if complete else results[0]["summary"]}


def _merge_priors(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    skipped = {k: v for r in results for k, v in (r.get("skipped") or {}).items()}
    return {"out_dir": results[0]["out_dir"], "done": _union(results, "done"),
            "skipped": {k: skipped[k] for k in sorted(skipped, key=int)}, "resumed": _union(results, "resumed"),
            "seconds": max(r["seconds"] for r in results), "images": sum(r["images"] for r in results)}


def _merge_dreams(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    from ddr_core.dreams import QUALITY_FILE, write_quality_table

    _, layout = _context(request)
    out_dir = layout.data_root / results[0]["out_dir"]
    quality = None
    if any(r.get("quality_path") for r in results):  # rank 0 writes the union once every rank is done
        write_quality_table(out_dir)
        quality = layout.relative(out_dir / QUALITY_FILE)
    failures = sorted((f for r in results for f in r.get("failures") or []),
                      key=lambda f: (f.get("channel", -1), f.get("timestep", -1), f.get("seed", -1)))
    return {"out_dir": results[0]["out_dir"], "channels_done": _union(results, "channels_done"),
            "channels_skipped": _union(results, "channels_skipped"),
            "channels_without_timesteps": _union(results, "channels_without_timesteps"),
            "elements": sum(r["elements"] for r in results),
            "element_steps": sum(r["element_steps"] for r in results), "failures": failures,
            "seconds": max(r["seconds"] for r in results), "quality_path": quality}


def _merge_selftest(request: StageRequest, results: list[dict[str, Any]]) -> dict[str, Any]:
    return results[0]


MERGES: dict[str, Callable[[StageRequest, list[dict[str, Any]]], dict[str, Any]]] = {
    "selftest": _merge_selftest,
    "capture_group": _merge_capture,
    "priors_for_variant": _merge_priors,
    "dreams_for_variant": _merge_dreams,
}


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
    import torch

    from ddr_core.atomic import atomic_write_json
    from ddr_core.distributed import all_gather_json, device_for_rank, process_group

    def rank_log(message: str) -> None:
        log(f"[rank {info.rank}/{info.world_size}] {message}")

    job_id = os.environ.get("SLURM_JOB_ID")
    base = {"report_version": REPORT_VERSION, "invocation_id": request.invocation_id, "stage": request.stage,
            "args": request.args, "host": socket.gethostname(), "slurm_job_id": job_id,
            "world_size": info.world_size}
    report = report_path(request.data_root, request.experiment, request.invocation_id)
    errors = error_path(request.data_root, request.experiment, request.invocation_id)
    where = f" (SLURM job {job_id})" if job_id else ""
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
                report.unlink(missing_ok=True)
            status: dict[str, Any] = {"rank": info.rank, "host": socket.gethostname(), "device": str(device)}
            try:
                if setup_error is not None:
                    raise setup_error
                mine = request_for_rank(request, info.rank, info.world_size, str(device))
                if mine is None:
                    rank_log("nothing to do: fewer channels than ranks")
                result = STAGES[request.stage](mine, rank_log) if mine is not None else None
                status.update(ok=True, result=result)
            except BaseException as exc:
                status.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                              traceback_tail="".join(traceback.format_exception(exc))[-4000:])
            status["seconds"] = time.perf_counter() - started
            statuses = all_gather_json(_json_safe(status))
            failed = [s for s in statuses if not s["ok"]]
            if info.is_main and not failed:
                try:
                    results = [s["result"] for s in statuses if s["result"] is not None]
                    merged = MERGES[request.stage](request, results)
                except BaseException as exc:
                    status.update(ok=False, error=f"{type(exc).__name__}: {exc} (assembling the ranks' results)",
                                  traceback_tail="".join(traceback.format_exception(exc))[-4000:])
                    failed = [status]
    except BaseException as exc:  # the group could not be formed, or broke: who failed is not known here
        failed = [{"rank": info.rank, "host": socket.gethostname(), "ok": False, "lost_contact": True,
                   "error": f"{phase}: {type(exc).__name__}: {exc}",
                   "traceback_tail": "".join(traceback.format_exception(exc))[-4000:]}]
        statuses = failed
    if failed:
        first = failed[0]
        names = ", ".join(str(s["rank"]) for s in failed)
        error = f"rank {first['rank']} of {info.world_size} ({first['host']}): {first['error']}"
        message = f"stage {request.stage!r} invocation {request.invocation_id}{where} failed on rank(s) {names}: {error}"
        problem = None
        if info.is_main:
            rank_log(message)
            problem = _write_error_report(errors, {
                **base, "error": error, "failed_ranks": [s["rank"] for s in failed],
                "lost_contact": any(s.get("lost_contact") for s in failed),
                "rank_errors": [{k: s.get(k) for k in ("rank", "host", "error", "traceback_tail")} for s in failed],
                "traceback_tail": first["traceback_tail"], "seconds": time.perf_counter() - started}, rank_log)
        raise StageFailed(message + (f" [{problem}]" if problem else ""))
    if not info.is_main:
        return status
    ranks = [{k: s.get(k) for k in ("rank", "host", "device", "seconds", "result")} for s in statuses]
    finished = {**base, "result": merged, "ranks": ranks, "seconds": time.perf_counter() - started,
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
