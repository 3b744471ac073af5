"""Several stage calls as parallel SLURM jobs: submit all, wait for all (:func:`run_stages_on_slurm`).

Used where one materialization has independent parts (``timestep_stats`` with ``channel_shards: N``: one job
per channel range, merged after). Each call is :func:`ddr_resources.slurm.run_stage_on_slurm` (the one
code path of a SLURM job: options, error reports, log tails, interruption classification), run in a thread
of its own with a dagster-slurm compute resource of its own, so the N jobs are queued and run at once.

dagster-slurm 1.22.0 (pinned) submits one job per blocking ``run()`` and assumes one call per step at a time.
Through its public configuration only:

- its remote folder is a function of the step (``<remote_base>/runs/<run id>/<step>``), so parallel calls
  would share one Pipes message file and payload: each fan-out call gets its own ``remote_base``,
  ``<remote_base>/fanout/<invocation id>`` (the environment is pre-deployed, ``DDR_SLURM_ENV_PATH``, so
  nothing big is staged there), removed after the call unless ``DDR_SLURM_KEEP_RUN_DIRS``;
- the job ids it records in the run's tags (to re-attach after a Dagster restart) are read from the run as
  it was when the step started, so sibling calls of one step never adopt each other's jobs; a re-executed
  run may find the last one recorded, as with sequential calls (then its report is missing and the call
  fails, naming the invocation);
- its ``run()`` installs SIGINT/SIGTERM handlers, which Python allows only in the main thread: the one
  adaptation here replaces the ``signal`` module *as that client module sees it* by one whose ``signal()``
  installs from the main thread only (elsewhere it returns the installed handler); the main thread's
  handlers stay, jobs keep running on the cluster on a signal, as with dagster-slurm's own handler.
  tests/test_slurm_fanout.py checks the client still calls ``signal.signal`` through that module global.

An interrupted job (preempted, requeued, time limit, node failure: what :func:`run_stage_on_slurm` answers
with :class:`dagster.RetryRequested`) is resubmitted alone, up to the job's ``retries``; the others keep
running. A job that fails by itself fails the call once every other job has ended (what they finished is
kept on the data root, so a re-run redoes only the failed part).
"""

from __future__ import annotations

import re
import signal
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import dagster as dg

from ddr_core.slurm_options import SlurmJobOptions
from ddr_core.stage_request import StageRequest

_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
RunOne = Callable[[StageRequest], dict]
DEFAULT_REMOTE_BASE = "$HOME/pipelines"  # dagster-slurm's default (ddr_resources.slurm._JobFiles)


class _MainThreadSignals:
    """The ``signal`` module as dagster-slurm's client sees it: ``signal.signal`` installs only from the main
    thread (elsewhere it returns the installed handler and installs nothing); the rest is ``signal`` itself."""

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    @staticmethod
    def signal(signum: int, handler: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            return signal.signal(signum, handler)
        return signal.getsignal(signum)


def _install_thread_safe_signals() -> None:
    from dagster_slurm.pipes_clients import slurm_pipes_client

    if not isinstance(slurm_pipes_client.signal, _MainThreadSignals):
        slurm_pipes_client.signal = _MainThreadSignals()


def fanout_settings(settings: Any, key: str) -> Any:
    """``settings`` with the ``remote_base`` of the fan-out call ``key``: ``<remote_base>/fanout/<key>``."""
    if not _KEY.fullmatch(key):  # it becomes part of a remote shell path
        raise ValueError(f"fan-out key {key!r} must match {_KEY.pattern}")
    base = settings.remote_base or DEFAULT_REMOTE_BASE
    return type(settings).model_validate({**settings.model_dump(), "remote_base": f"{base}/fanout/{key}"})


def _remove_remote_folder(settings: Any, context: Any) -> None:
    """Remove a fan-out call's ``remote_base`` (its job folder is already gone; empty folders are left)."""
    from dagster_slurm.helpers import SSHConnectionPool

    from ddr_resources.slurm import build_slurm_compute, remote_shell_path

    try:
        with SSHConnectionPool(build_slurm_compute(settings).slurm.ssh) as pool:
            pool.run(f"rm -rf {remote_shell_path(settings.remote_base)}")
    except Exception as exc:  # tidying up must never hide the call's own result
        context.log.warning(f"could not remove the fan-out folder {settings.remote_base}: {exc}")


def run_stages_on_slurm(context: dg.AssetExecutionContext, requests: Sequence[StageRequest], *,
                        local_data_root: str | Path, settings: Any = None,
                        options: SlurmJobOptions | dict | None = None,
                        run_one: RunOne | None = None) -> list[dict]:
    """Run every request as its own SLURM job, all at once; return their completion reports in order.

    ``run_one`` (tests) replaces the submission of one request; by default it is
    :func:`~ddr_resources.slurm.run_stage_on_slurm` with a fan-out client (module docstring).

    Raises:
        dagster.Failure: after every job has ended, when any failed (naming how many and the first one's
            error); an interrupted job is first resubmitted up to ``retries`` times.
    """
    from ddr_resources.slurm import SlurmSettings, run_stage_on_slurm

    settings = settings or SlurmSettings.from_env()
    try:
        retries = settings.job.merged(options).retries or 0
    except ValueError:  # invalid options: run_stage_on_slurm fails each call naming the field
        retries = 0
    if run_one is None:
        _install_thread_safe_signals()

        def run_one(request: StageRequest) -> dict:
            mine = fanout_settings(settings, request.invocation_id)
            try:
                return run_stage_on_slurm(context, request, local_data_root=local_data_root, settings=mine,
                                          options=options)
            finally:
                if not mine.keep_run_dirs:
                    _remove_remote_folder(mine, context)

    def one(request: StageRequest) -> dict:
        attempt = 0
        while True:
            try:
                return run_one(request)
            except dg.RetryRequested:
                attempt += 1
                if attempt > retries:
                    raise dg.Failure(description=f"the SLURM job for {request.stage} {request.args} was interrupted "
                                                 f"{attempt} times; its {retries} resubmission(s) (slurm.retries / "
                                                 f"DDR_SLURM_RETRIES) are used up: raise retries or time_limit, "
                                                 f"then re-run (finished parts are kept)") from None
                context.log.warning(f"resubmitting {request.stage} {request.args} alone (resubmission {attempt} "
                                    f"of {retries}); the other jobs keep running")
                request = request.model_copy(update={"invocation_id": uuid.uuid4().hex})

    if not requests:
        return []
    context.log.info(f"submitting {len(requests)} {requests[0].stage} jobs to SLURM at once")
    with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="ddr-slurm-fanout") as pool:
        futures = [pool.submit(one, request) for request in requests]
        wait(futures)
    failed = [(request, future.exception()) for request, future in zip(requests, futures, strict=True)
              if future.exception() is not None]
    if failed:
        def described(error: BaseException) -> str:
            return getattr(error, "description", None) or f"{type(error).__name__}: {error}"

        for request, error in failed:  # every job's own error (job id, log tail), not only the first one's
            context.log.error(f"{request.stage} {request.args} failed: {described(error)}")
        request, error = failed[0]
        metadata = dict(getattr(error, "metadata", None) or {})
        metadata["failed_jobs"] = dg.MetadataValue.json([{"args": r.args, "invocation_id": r.invocation_id,
                                                          "error": described(e)[-2000:]} for r, e in failed])
        raise dg.Failure(
            description=f"{len(failed)} of {len(requests)} {request.stage} jobs failed (the other "
                        f"{len(requests) - len(failed)} finished; their work is kept and a re-run skips it). "
                        f"First, {request.args}: {described(error)}",
            metadata=metadata,
        ) from error
    return [future.result() for future in futures]
