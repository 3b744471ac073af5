"""Several stage calls as parallel SLURM jobs: submit all, wait for all (:func:`run_stages_on_slurm`).

Used where one materialization has independent parts (``timestep_stats`` with ``channel_shards: N``: one job
per channel range, merged after). Each call is :func:`ddr_resources.slurm.run_stage_on_slurm` (the one
code path of a SLURM job: options, error reports, log tails, interruption classification), run in a thread
of its own with a dagster-slurm client of its own, so the N jobs are queued and run at the same time.

Why the client is adapted (dagster-slurm 1.22.0, pinned): its ``run()`` submits one job and blocks until it
ends, and assumes one call per Dagster step at a time:

- its remote folder is a function of the step (``<remote_base>/runs/<run id>/<step>``), so parallel calls
  would share one ``messages.jsonl`` and payload: each fan-out call gets the sibling folder
  ``<step>__<invocation id>`` (same depth, so :class:`ddr_resources.slurm._JobFiles` finds its log);
- it records the job id in the run's tags and, on the next call of the step, *adopts* a job it finds there
  (to survive a Dagster restart): a sibling shard would adopt another shard's job. Fan-out calls neither
  record nor adopt; a restarted run resubmits the shards that have not finished (finished ones are skipped
  before any job is submitted);
- it installs SIGINT/SIGTERM handlers, which Python allows only in the main thread: in a fan-out thread
  the installation is skipped (the main thread's handlers stay; jobs keep running on the cluster, as they
  do with the handler dagster-slurm would have installed).

``tests/test_slurm_fanout.py`` checks that these private hooks still exist, so an upgrade that moves them
fails there, not on a cluster.

An interrupted job (preempted, requeued, time limit, node failure: what :func:`run_stage_on_slurm` answers
with :class:`dagster.RetryRequested`) is resubmitted alone, up to the job's ``retries``; the others keep
running. A job that fails by itself fails the call once every other job has ended (what they finished is
kept on the data root, so a re-run redoes only the failed part).
"""

from __future__ import annotations

import functools
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
FANOUT_CLIENT_HOOKS = ("_get_remote_run_dir", "_find_reattachable_job", "_store_job_tags")


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


def adapt_fanout_client(client: Any, key: str) -> Any:
    """``client`` (a dagster-slurm ``SlurmPipesClient``) with its own remote folder ``<step>__<key>`` and
    without job adoption or job tags (module docstring)."""
    if not _KEY.fullmatch(key):  # it becomes part of a remote shell path
        raise ValueError(f"fan-out key {key!r} must match {_KEY.pattern}")
    step_dir = client._get_remote_run_dir
    client._get_remote_run_dir = lambda remote_base, run_id, op_context: (
        f"{step_dir(remote_base, run_id, op_context)}__{key}")
    client._find_reattachable_job = lambda *args, **kwargs: None
    client._store_job_tags = lambda *args, **kwargs: None
    return client


@functools.cache
def fanout_compute_class() -> type:
    """dagster-slurm's ``ComputeResource`` with a ``fanout_key``: when set, its clients are adapted for that call."""
    from dagster_slurm import ComputeResource

    class FanoutComputeResource(ComputeResource):
        fanout_key: str = ""

        def get_pipes_client(self, context: Any, launcher: Any = None) -> Any:
            client = super().get_pipes_client(context, launcher=launcher)
            return adapt_fanout_client(client, self.fanout_key) if self.fanout_key else client

    return FanoutComputeResource


def fanout_compute(settings: Any, key: str) -> Any:
    """The dagster-slurm compute resource of one fan-out call ``key`` (its own folder, no job adoption)."""
    from ddr_resources.slurm import build_slurm_compute

    _install_thread_safe_signals()
    return build_slurm_compute(settings, fanout_key=key)


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
        def run_one(request: StageRequest) -> dict:
            return run_stage_on_slurm(context, request, local_data_root=local_data_root, settings=settings,
                                      options=options, compute=fanout_compute(settings, request.invocation_id))

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
        request, error = failed[0]
        description = getattr(error, "description", None) or f"{type(error).__name__}: {error}"
        raise dg.Failure(
            description=f"{len(failed)} of {len(requests)} {request.stage} jobs failed (the other "
                        f"{len(requests) - len(failed)} finished; their work is kept and a re-run skips it). "
                        f"First, {request.args}: {description}",
            metadata=getattr(error, "metadata", None) or {},
        ) from error
    return [future.result() for future in futures]
