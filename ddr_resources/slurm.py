"""Run a GPU stage locally (in-process) or as a SLURM job through ``dagster-slurm``.

Both ways call the same :func:`ddr_core.cluster_payload.run_stage`; the SLURM way submits the thin
payload script ``ddr_resources/slurm_payload.py`` (no Dagster import; it runs
``ddr_core.cluster_payload.main`` in the cluster's pre-deployed venv) with the
:class:`~ddr_core.cluster_payload.StageRequest` as a Dagster Pipes extra. Success needs both the job
succeeding *and* the payload's own completion report for this invocation; otherwise a
:class:`dagster.Failure` names the SLURM job id and the payload's error with its traceback tail.

Deployment configuration comes from ``DDR_SLURM_*`` environment variables (see
:class:`SlurmSettings`); credentials are an SSH key path (never a password) and are never logged.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import uuid
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ddr_core.cluster_payload import StageFailed, StageRequest, error_path, report_path, run_stage
from ddr_core.slurm_options import (
    HostName,
    LocalPath,
    RemoteBase,
    RemotePath,
    SlurmJobOptions,
    UserName,
    allowed_form,
)

__all__ = ["SlurmJobOptions", "SlurmSettings", "build_slurm_compute", "new_request", "run_stage_on_slurm",
           "run_stage_locally"]

PAYLOAD_SCRIPT = Path(__file__).with_name("slurm_payload.py")


# SlurmSettings field -> its DDR_SLURM_<name> variable; JOB_ENV_VARIABLES: the same for the job defaults
ENV_VARIABLES = {"host": "HOST", "port": "PORT", "user": "USER", "key_path": "KEY_PATH",
                 "host_key_checking": "HOST_KEY_CHECKING", "known_hosts_file": "KNOWN_HOSTS",
                 "env_path": "ENV_PATH", "remote_base": "REMOTE_BASE", "data_root": "DATA_ROOT",
                 "config_path": "CONFIG", "poll_timeout": "POLL_TIMEOUT", "poll_interval": "POLL_INTERVAL",
                 "keep_run_dirs": "KEEP_RUN_DIRS"}
JOB_ENV_VARIABLES = {"partition": "PARTITION", "account": "ACCOUNT", "qos": "QOS", "gpus_per_node": "GPUS_PER_NODE",
                     "cpus_per_task": "CPUS", "mem": "MEM", "time_limit": "TIME", "requeue": "REQUEUE",
                     "mail_type": "MAIL_TYPE", "mail_user": "MAIL_USER",
                     "signal_before_timeout": "SIGNAL_BEFORE_TIMEOUT", "retries": "RETRIES"}
JOB_ENV_DEFAULTS = {"gpus_per_node": "0", "cpus_per_task": "4", "mem": "16G", "time_limit": "02:00:00",
                    "retries": "2"}
# the allowed form of the fields whose checks do not name it themselves (the pattern checks do)
_YES_NO = "yes or no (also 1/0, true/false, on/off)"
_FORMS = {"port": "a whole number 1..65535", "host_key_checking": "strict, accept-new or off",
          "poll_timeout": "whole seconds >= 1", "poll_interval": "seconds > 0", "keep_run_dirs": _YES_NO,
          "requeue": _YES_NO, "gpus_per_node": "a whole number 0..64", "cpus_per_task": "a whole number 1..1024",
          "signal_before_timeout": "whole seconds 0..86400, shorter than the time limit (0: off)",
          "retries": "a whole number 0..100",
          "host": allowed_form("host")}


class SlurmSettings(BaseModel):
    """One deployment's cluster, from ``DDR_SLURM_*`` environment variables (:meth:`from_env`).

    | variable | field | default |
    |---|---|---|
    | ``DDR_SLURM_HOST`` / ``_PORT`` / ``_USER`` | SSH login node | — / 22 / — |
    | ``DDR_SLURM_KEY_PATH`` | private key (key auth only) | — |
    | ``DDR_SLURM_HOST_KEY_CHECKING`` | ``strict`` / ``accept-new`` / ``off`` | ``strict`` |
    | ``DDR_SLURM_KNOWN_HOSTS`` | known_hosts file | ``~/.ssh/known_hosts`` |
    | ``DDR_SLURM_ENV_PATH`` | pre-deployed env: ``<P>/env`` (venv with ddr) + ``<P>/activate.sh`` | — |
    | ``DDR_SLURM_REMOTE_BASE`` | job run dirs on the cluster | ``$HOME/pipelines`` |
    | ``DDR_SLURM_DATA_ROOT`` / ``_CONFIG`` | data root / project config as the cluster sees them | local ones |
    | ``DDR_SLURM_PARTITION`` ``_ACCOUNT`` ``_QOS`` ``_GPUS_PER_NODE`` ``_CPUS`` ``_MEM`` ``_TIME`` | job defaults | cluster default / — / — / 0 / 4 / 16G / 02:00:00 |
    | ``DDR_SLURM_REQUEUE`` ``_MAIL_TYPE`` ``_MAIL_USER`` | job defaults | — |
    | ``DDR_SLURM_SIGNAL_BEFORE_TIMEOUT`` | seconds before the time limit to stop after the unit in progress | off |
    | ``DDR_SLURM_RETRIES`` | resubmissions of a preempted / requeued / timed-out / node-failed job | 2 |
    | ``DDR_SLURM_POLL_TIMEOUT`` | seconds to wait for one job | 86400 |
    | ``DDR_SLURM_POLL_INTERVAL`` | seconds between job state checks (each is one SSH command) | 2, growing to 5 |
    | ``DDR_SLURM_KEEP_RUN_DIRS`` | keep the remote job dirs (job script, ``slurm-<id>.out/.err``) | removed |

    Every value has a strict form (:mod:`ddr_core.slurm_options`, docs/CLUSTER.md): host, user and the
    paths reach ``ssh`` / ``scp`` arguments, the ``sbatch`` command line and the job script, partly
    unquoted (dagster-slurm 1.22), so a value with whitespace, quotes, ``;``, ``$``, backticks or a line
    break is refused with the variable's name and its allowed form.
    """

    model_config = ConfigDict(extra="forbid")

    host: HostName = Field(max_length=253)
    port: int = Field(22, ge=1, le=65535)
    user: UserName
    key_path: LocalPath
    host_key_checking: Literal["strict", "accept-new", "off"] = "strict"
    known_hosts_file: LocalPath | None = None
    env_path: RemotePath
    remote_base: RemoteBase | None = None
    data_root: RemotePath | None = None
    config_path: RemotePath | None = None
    poll_timeout: int = Field(86400, ge=1)
    poll_interval: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    keep_run_dirs: bool = False
    job: SlurmJobOptions = Field(default_factory=lambda: SlurmJobOptions(cpus_per_task=4, mem="16G",
                                                                         time_limit="02:00:00", gpus_per_node=0,
                                                                         retries=2))

    def __repr__(self) -> str:  # the key path is not secret, but keep reprs short and credential-free
        return f"SlurmSettings(host={self.host!r}, port={self.port}, user={self.user!r}, env_path={self.env_path!r})"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> SlurmSettings:
        """The settings from ``DDR_SLURM_*`` (``env``, default ``os.environ``); an empty variable is unset.

        Raises:
            ValueError: a required variable is missing, or a value does not have its allowed form (the
                message names each such variable and the form).
        """
        env = dict(os.environ if env is None else env)

        def get(name: str, default: str | None = None) -> str | None:
            value = (env.get(f"DDR_SLURM_{name}") or "").strip()
            return value or default

        missing = [f"DDR_SLURM_{n}" for n in ("HOST", "USER", "KEY_PATH", "ENV_PATH") if not get(n)]
        if missing:
            raise ValueError(f"SLURM execution needs {', '.join(missing)} (see docs/CLUSTER.md); "
                             f"for a local test cluster run scripts/slurm/start_local_cluster.sh")
        values: dict[str, Any] = {field: get(name) for field, name in ENV_VARIABLES.items() if get(name)}
        values["job"] = {field: get(name, JOB_ENV_DEFAULTS.get(field)) for field, name in JOB_ENV_VARIABLES.items()
                         if get(name, JOB_ENV_DEFAULTS.get(field)) is not None}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ValueError("invalid SLURM settings (docs/CLUSTER.md): " + "; ".join(
                _env_problem(error) for error in exc.errors())) from None


def _env_problem(error: dict) -> str:
    """One validation error of :meth:`SlurmSettings.from_env` as "<variable> is <value>: <allowed form>"."""
    loc = error["loc"]
    field = str(loc[1]) if loc[0] == "job" and len(loc) > 1 else str(loc[0])
    name = JOB_ENV_VARIABLES.get(field) if loc[0] == "job" else ENV_VARIABLES.get(field)
    value = error.get("input")
    shown = repr(value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "...")
    message = error["msg"].removeprefix("Value error, ")
    if field in _FORMS and not message.startswith("use "):
        message += f"; use {_FORMS[field]}"
    return f"DDR_SLURM_{name or field.upper()} is {shown}: {message}"


def _directives_launcher_class():
    from dagster_slurm import BashLauncher

    class DirectivesBashLauncher(BashLauncher):
        """dagster-slurm's BashLauncher with extra ``#SBATCH`` lines right after the shebang.

        (sbatch reads directives only before the first command. With ``signal_before_timeout``
        dagster-slurm wraps the script in a supervisor and these lines would be lost: not used here.)
        """

        sbatch_directives: list[str] = []

        def prepare_execution(self, *args, **kwargs):
            bad = [line for line in self.sbatch_directives
                   if not line.startswith("#SBATCH --") or any(c in line for c in "\n\r\0")]
            if bad:  # each is one job-script line: a line break would add a shell command to the job
                raise ValueError(f"refusing #SBATCH directives that are not single '#SBATCH --...' lines: {bad!r}")
            plan = super().prepare_execution(*args, **kwargs)
            if self.sbatch_directives:
                plan.payload = [plan.payload[0], *self.sbatch_directives, *plan.payload[1:]]
            return plan

    return DirectivesBashLauncher


def build_slurm_compute(settings: SlurmSettings | None = None, *, debug_mode: bool = False):
    """The ``dagster_slurm.ComputeResource`` (mode ``slurm``, one sbatch job per call) for ``settings``."""
    from dagster_slurm import ComputeResource, SlurmQueueConfig, SlurmResource, SSHConnectionResource

    settings = settings or SlurmSettings.from_env()
    ssh = SSHConnectionResource(host=settings.host, port=settings.port, user=settings.user,
                                key_path=settings.key_path, host_key_checking=settings.host_key_checking,
                                known_hosts_file=settings.known_hosts_file)
    job = settings.job
    queue = SlurmQueueConfig(partition=job.partition or "", time_limit=job.time_limit or "02:00:00",
                             cpus=job.cpus_per_task or 4, gpus_per_node=job.gpus_per_node or 0, mem=job.mem,
                             qos=job.qos, account=job.account)
    polling = ({"status_poll_interval_seconds": settings.poll_interval,
                "status_poll_max_interval_seconds": max(settings.poll_interval, 5.0)}
               if settings.poll_interval else {})
    slurm = SlurmResource(ssh=ssh, queue=queue, remote_base=settings.remote_base, **polling)
    return ComputeResource(mode="slurm", slurm=slurm, default_launcher=_directives_launcher_class()(),
                           pre_deployed_env_path=settings.env_path, debug_mode=debug_mode)


def new_request(stage: str, args: dict[str, Any], *, data_root: str | Path, experiment: str,
                config_path: str | None = None, device: str = "auto", lock_owner: str = "",
                processes: int = 1) -> StageRequest:
    return StageRequest(stage=stage, args=args, data_root=str(data_root), experiment=experiment,
                        config_path=config_path, device=device, invocation_id=uuid.uuid4().hex,
                        lock_owner=lock_owner, processes=processes)


def read_error(request: StageRequest, local_data_root: str | Path) -> dict | None:
    """The payload's error report, or ``None`` when there is none or it cannot be read: it only adds detail
    to a failure, so reading it must never replace the failure itself."""
    path = error_path(local_data_root, request.experiment, request.invocation_id)
    try:
        report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def run_stage_locally(context: dg.AssetExecutionContext, request: StageRequest) -> dict:
    """In-process: the default and the fast path (no subprocess, no pixi, no dagster-slurm).

    The completion / error report files are the channel of a *remote* job; in-process the report is the
    return value, so both files are removed again. (The ``_jobs`` folder itself stays: removing it could
    race another in-process run writing its report there.)
    """
    try:
        return run_stage(request, log=context.log.info)
    except StageFailed as exc:
        error = read_error(request, request.data_root) or {}
        raise dg.Failure(description=str(exc),
                         metadata={"traceback_tail": dg.MetadataValue.text(error.get("traceback_tail", ""))}) from exc
    finally:
        report_path(request.data_root, request.experiment, request.invocation_id).unlink(missing_ok=True)
        error_path(request.data_root, request.experiment, request.invocation_id).unlink(missing_ok=True)


_JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?")
_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")


def remote_shell_path(path: str) -> str:
    """A remote path as one shell word: a leading ``$HOME`` is left for the remote shell to expand (the
    one ``$`` a :data:`~ddr_core.slurm_options.RemoteBase` may hold), the rest is quoted."""
    if path.startswith("$HOME"):
        rest = path[len("$HOME"):]
        return '"$HOME"' + (shlex.quote(rest) if rest else "")
    return shlex.quote(path)


class _JobFiles:
    """The remote folder of one dagster-slurm job, found through public configuration and the job id: its
    log tail (``slurm-<id>.out`` / ``.err``) for failures, then its removal.

    dagster-slurm gives every step its folder under ``<remote_base>/runs/<run id>/`` (``remote_base``:
    ``DDR_SLURM_REMOTE_BASE``, unset: ``$HOME/pipelines``, dagster-slurm's default) and has the job write its
    log there as ``slurm-<job id>.out``; job ids are unique, so the folder holding that file is the job's.
    Two calls in one step (a run over several variants) share the folder: the calls use ``defer_cleanup``
    and the folder is removed here, synchronously, after each call, instead of dagster-slurm's background
    ``rm -rf`` racing the next upload. Without a job id (the job was never submitted) the step fails
    anyway, so dagster-slurm's own deferred clean-up (:meth:`cleanup_deferred_run_dir`) removes it.
    """

    def __init__(self, compute, context: dg.AssetExecutionContext, remote_base: str | None, *,
                 pool_factory=None):
        self.compute, self.context = compute, context
        self.ssh = compute.slurm.ssh
        run_id = context.run.run_id
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"run id {run_id!r} is not a Dagster run id")
        self.runs_dir = f"{remote_base or '$HOME/pipelines'}/runs/{run_id}"
        self.pool_factory = pool_factory

    def _pool(self):
        if self.pool_factory is not None:
            return self.pool_factory(self.ssh)
        from dagster_slurm.helpers import SSHConnectionPool

        return SSHConnectionPool(self.ssh)

    def _job_dir(self, pool, job_id: str) -> str | None:
        """The folder holding ``slurm-<job_id>.out`` one level below this run's folder, or None."""
        found = pool.run(f"find {remote_shell_path(self.runs_dir)} -mindepth 2 -maxdepth 2 -type f "
                         f"-name slurm-{job_id}.out -print -quit 2>/dev/null || true").strip().splitlines()
        path = found[-1].strip() if found else ""
        folder, name = posixpath.split(path)
        run_id = self.runs_dir.rsplit("/", 1)[-1]
        if name != f"slurm-{job_id}.out" or posixpath.basename(posixpath.dirname(folder)) != run_id:
            return None
        return folder

    def log_tail(self, job_id: str | None, lines: int = 40) -> str:
        """The last ``lines`` lines of the job's stdout and stderr files ('' when unreadable)."""
        if not job_id or not _JOB_ID.fullmatch(str(job_id)):  # a job id, nothing else
            return ""
        try:
            with self._pool() as pool:
                folder = self._job_dir(pool, str(job_id))
                if folder is None:
                    return ""
                parts = []
                for suffix in ("out", "err"):
                    path = shlex.quote(f"{folder}/slurm-{job_id}.{suffix}")
                    text = pool.run(f"tail -n {int(lines)} {path} 2>/dev/null || true").rstrip()
                    if text:
                        parts.append(f"--- slurm-{job_id}.{suffix} (last {lines} lines) ---\n{text}")
                return "\n".join(parts)
        except Exception as exc:  # the log is a diagnostic: never hide the job's own failure behind it
            return f"(could not read the job log over SSH: {exc})"

    def fate(self, job_id: str | None) -> tuple[str, list[str]]:
        """(its state in the queue now, '' when not queued; its accounted states, one per run of it: ``sacct
        -D`` lists each requeued run) in one SSH command; ('', []) when unknown."""
        if not job_id or not _JOB_ID.fullmatch(str(job_id)):
            return "", []
        try:
            with self._pool() as pool:
                out = pool.run(f"squeue -h -j {job_id} -o %T 2>/dev/null; echo ---; "
                               f"sacct -n -X -D -P -j {job_id} -o State 2>/dev/null || true")
        except Exception as exc:  # a diagnostic: the failure stands without it
            self.context.log.warning(f"could not ask Slurm how job {job_id} ended: {exc}")
            return "", []
        queued, _, accounted = out.partition("---")
        return (queued.strip().split()[0] if queued.strip() else "",
                [line.split()[0] for line in accounted.splitlines() if line.strip()])

    def cancel(self, job_id: str) -> None:
        """``scancel`` the job (a copy Slurm requeued, which a resubmission replaces)."""
        if _JOB_ID.fullmatch(str(job_id)):
            with self._pool() as pool:
                pool.run(f"scancel {job_id} 2>/dev/null || true")

    def remove(self, job_id: str | None) -> None:
        """Remove the job's folder now (job id known), else leave it to dagster-slurm's deferred clean-up."""
        try:
            if job_id and _JOB_ID.fullmatch(str(job_id)):
                with self._pool() as pool:
                    folder = self._job_dir(pool, str(job_id))
                    if folder is not None:
                        pool.run(f"rm -rf {shlex.quote(folder)}")
                        return
            self.compute.cleanup_deferred_run_dir(self.context)
        except Exception as exc:
            self.context.log.warning(f"could not remove the remote job folder: {exc}")


def run_stage_on_slurm(context: dg.AssetExecutionContext, request: StageRequest, *, local_data_root: str | Path,
                       settings: SlurmSettings | None = None, options: SlurmJobOptions | dict | None = None,
                       compute=None) -> dict:
    """Run ``request`` as one SLURM job; return the payload's completion report.

    ``request.data_root`` must be the data root as the cluster sees it and ``local_data_root`` the same
    directory as this process sees it (a shared filesystem). Raises :class:`dagster.Failure` naming the
    SLURM job id when the job fails: with the payload's error and traceback tail when the stage raised,
    else (the job was killed: out of memory, time limit, ``scancel``, node failure) with the tail of the
    job's own log; and when the job "succeeds" without this invocation's completion report (e.g. a
    cluster without accounting, where the client cannot see how a job ended).
    """
    settings = settings or SlurmSettings.from_env()
    try:
        job = settings.job.merged(options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise dg.Failure(description=f"invalid SLURM job options for {request.stage}: {problems}") from None
    compute = compute or build_slurm_compute(settings)
    launcher = _directives_launcher_class()(sbatch_directives=job.sbatch_directives())
    report_file = report_path(local_data_root, request.experiment, request.invocation_id)
    files = _JobFiles(compute, context, settings.remote_base) if hasattr(compute, "slurm") else None
    context.log.info(f"submitting {request.stage} (invocation {request.invocation_id}) to SLURM "
                     f"{settings.user}@{settings.host}:{settings.port} with {job.extra_slurm_opts()}"
                     + (f" and {job.sbatch_directives()}" if job.sbatch_directives() else ""))
    try:
        compute.run(context=context, payload_path=str(PAYLOAD_SCRIPT), launcher=launcher,
                    extra_slurm_opts=job.extra_slurm_opts(), extras={"request": request.model_dump(mode="json")},
                    poll_timeout=settings.poll_timeout, defer_cleanup=True)
    except Exception as exc:  # dagster-slurm raises RuntimeError("Job N did not complete ...") and others
        error = read_error(request, local_data_root) or {}
        match = re.search(r"[Jj]ob (\d+)", str(exc))
        job_id = error.get("slurm_job_id") or (match.group(1) if match else None)
        log_tail = files.log_tail(job_id) if files else ""
        if files and not settings.keep_run_dirs:
            files.remove(job_id)
        if error:
            cause = error.get("error")
        else:
            cause = (f"{exc} -- the job ended without the payload's error report (killed from outside: out of "
                     f"memory, time limit, scancel, node failure; or the report could not be written, e.g. on a "
                     f"full disk: then the stage's own error is in the log); the tail of its log:\n"
                     f"{log_tail or '(empty)'}")
        interruption = _interruption(error, exc, job_id, files)
        retries = job.retries or 0
        if interruption and context.retry_number < retries:
            context.log.warning(f"SLURM job {job_id} for {request.stage} was interrupted ({interruption}); "
                                f"resubmitting it (retry {context.retry_number + 1} of {retries}): it resumes "
                                f"from its finished units")
            raise dg.RetryRequested(max_retries=retries) from exc
        if interruption:
            cause += (f" [interrupted ({interruption}) on attempt {context.retry_number + 1}; its {retries} "
                      f"resubmission(s) (slurm.retries / DDR_SLURM_RETRIES) are used up: raise retries or "
                      f"time_limit, then re-run: it resumes from its finished units]")
        raise dg.Failure(
            description=f"SLURM job {job_id or '(not submitted)'} for {request.stage} failed: {cause}",
            metadata={"slurm_job_id": str(job_id), "invocation_id": request.invocation_id,
                      "client_error": dg.MetadataValue.text(str(exc)[-2000:]),
                      "traceback_tail": dg.MetadataValue.text(error.get("traceback_tail", "(no payload error report: "
                                                                       "the job died before or outside the stage)")),
                      "job_log_tail": dg.MetadataValue.text(log_tail or "(empty)")},
        ) from exc
    report = _read_report(report_file)
    if files and not settings.keep_run_dirs:
        files.remove((report or {}).get("slurm_job_id"))
    if report is None:
        raise dg.Failure(description=f"the SLURM job for {request.stage} ended without its completion report "
                                     f"{report_file} (invocation {request.invocation_id}); not recording a "
                                     f"materialization. Either the job never ran the stage to its end (a cluster "
                                     f"without accounting lets the client take a vanished job for a finished "
                                     f"one) or the data root is not shared (DDR_SLURM_DATA_ROOT).",
                         metadata={"invocation_id": request.invocation_id})
    if report.get("invocation_id") != request.invocation_id:
        raise dg.Failure(description=f"completion report {report_file} belongs to another invocation")
    context.log.info(f"SLURM job {report.get('slurm_job_id')} finished {request.stage} in "
                     f"{report.get('seconds', 0):.1f}s on {report.get('host')}")
    return report


# Slurm states of a job that did not fail by itself: resubmitted (Dagster's retry), resuming where it was
INTERRUPTED_STATES = ("PREEMPTED", "REQUEUED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL")
_QUEUED_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING",
                  "RESIZING")


def _interruption(error: dict, exc: Exception, job_id: str | None, files: _JobFiles | None) -> str | None:
    """Why the job was interrupted from outside, or None when it failed by itself (the stage raised, out of
    memory, ``scancel``): those are not retried.

    Why here and not through dagster-slurm: dagster-slurm 1.22 ends its monitoring with ``RuntimeError("Job
    N was PREEMPTED")`` or ``"... Final state: TIMEOUT"`` (also when Slurm has requeued the job, which then
    runs again unmonitored) and has no public hook to keep following a requeued job or to resubmit. So the
    one place that calls it classifies the end here -- the payload's own ``interrupted`` report (it stopped
    on the signal before the time limit), the state in dagster-slurm's message, Slurm's accounting (``sacct
    -D``: every run of the job) -- cancels a requeued copy still in the queue (two copies must never write
    the same partition), and lets Dagster's step retry (:class:`dagster.RetryRequested`, no daemon needed)
    resubmit the stage, which resumes from its finished channels, batches and images.
    """
    if error.get("interrupted"):
        return f"stopped after its finished units on {error['interrupted']}"
    if error:  # the stage raised: deterministic, not retried
        return None
    message = re.search(r"(?:was|Final state:) ([A-Z_]+)", str(exc))
    states = [message.group(1)] if message else []
    queued = ""
    if files is not None:
        queued, accounted = files.fate(job_id)
        states += accounted
    interrupted = [state for state in states if state in INTERRUPTED_STATES]
    if queued in _QUEUED_STATES and job_id:  # Slurm requeued it; dagster-slurm stopped following it
        files.cancel(job_id)  # type: ignore[union-attr]
        return f"Slurm requeued it ({', '.join(dict.fromkeys(interrupted)) or queued}); the requeued copy was " \
               f"cancelled"
    return ", ".join(dict.fromkeys(interrupted)) or None


def _read_report(path: Path) -> dict | None:
    """The completion report at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    return report if isinstance(report, dict) else None
