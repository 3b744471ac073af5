"""The deployment's side of the dead-worker guard (:mod:`ddr_resources.run_guard`): the executor, the run
launcher and the sensor that give a killed run's pool slots back.

* :data:`guarded_executor` (the executor of every job in :mod:`dagster_project.definitions`: CLI, UI and
  daemon runs) runs Dagster's executor inside a :class:`~ddr_resources.run_guard.RunGuard`; runs executed
  in process (``dg.materialize``, ``make demo``) ignore the job's executor and are guarded from the setup
  of :class:`~ddr_resources.resources.ComputeResource` instead.
  It also gives the run its ``ddr/*`` tags (:mod:`dagster_project.run_tags`).
* :class:`DeadWorkerAwareRunLauncher` (``run_launcher`` in ``dagster_project/dagster.yaml``) is
  Dagster's default launcher plus :meth:`~DeadWorkerAwareRunLauncher.check_run_worker_health`, so
  run monitoring in the daemon (``run_monitoring.enabled``) marks such a run failed even when no
  other run wants the pool.
* the sensor :data:`free_dead_worker_pool_slots` (running by default) frees the slots of dead runs in
  the daemon: the run queue keeps a GPU run QUEUED while the pool looks full, so no guarded worker
  would ever start to free them.

The instance imports this module for its run launcher (webserver, daemon): it imports only
:mod:`ddr_resources.run_guard`, never the assets.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster._core.definitions.executor_definition import multi_or_in_process_executor
from dagster._core.execution.retries import RetryMode
from dagster._core.execution.step_dependency_config import StepDependencyConfig
from dagster._core.executor.base import Executor
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher

from dagster_project.run_tags import tag_run
from ddr_resources.run_guard import RunGuard, WorkerRecord, free_dead_slot_holders, judge_worker


class WorkerGuardExecutor(Executor):
    """Dagster's executor (``inner``) inside a :class:`RunGuard`."""

    def __init__(self, inner: Executor) -> None:
        self._inner = inner

    @property
    def retries(self) -> RetryMode:
        return self._inner.retries

    @property
    def step_dependency_config(self) -> StepDependencyConfig:
        return self._inner.step_dependency_config

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[dg.DagsterEvent]:
        # the run list's ddr/* tags (variant, block, stage, ...), whoever launched the run (UI, CLI, daemon)
        tag_run(plan_context.instance, plan_context.dagster_run, execution_plan.step_keys_to_execute)
        with RunGuard(plan_context.instance, plan_context.dagster_run):
            yield from self._inner.execute(plan_context, execution_plan)


def _create_guarded_executor(init_context: dg.InitExecutorContext) -> Executor:
    creation = multi_or_in_process_executor.executor_creation_fn
    assert creation is not None
    return WorkerGuardExecutor(creation(init_context))


guarded_executor = dg.ExecutorDefinition(
    name="ddr_guarded_executor",
    config_schema=multi_or_in_process_executor.config_schema,
    requirements=multi_or_in_process_executor.get_requirements,
    executor_creation_fn=_create_guarded_executor,
    description="Dagster's multiprocess (default) or in-process executor, plus ddr's worker guard: records "
                "the run worker, frees the pool slots of runs whose worker died (ddr_resources/run_guard.py).",
)


# --------------------------------------------------------------------------------------------------
# The sensor: with a daemon, queued runs wait for a free slot before any worker (and guard) starts
# --------------------------------------------------------------------------------------------------


@dg.sensor(
    name="free_dead_worker_pool_slots",
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Gives back the pool slots of runs whose worker died (kill -9, OOM killer): fails such a run "
                "if it is still in progress and frees its slots, once none of its processes runs any more "
                "(ddr_resources/run_guard.py). Requests no runs.",
)
def free_dead_worker_pool_slots(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """The daemon's side of the guard. The run queue holds back a run whose first steps need a full pool,
    so no worker -- and no guard in it -- starts while a dead run holds the slot; the run launcher's
    health check covers only runs still STARTED, and the code server marks a run it launched FAILURE
    itself when its worker dies, without freeing the slot. This sensor frees them all."""
    actions = free_dead_slot_holders(context.instance)
    for action in actions:
        context.log.info(action)
    return dg.SkipReason("; ".join(actions) or "no run with a dead worker holds a pool slot")


# --------------------------------------------------------------------------------------------------
# The run launcher: run monitoring (daemon) can tell that a worker died
# --------------------------------------------------------------------------------------------------


class DeadWorkerAwareRunLauncher(DefaultRunLauncher):
    """Dagster's default run launcher that answers run monitoring's health check from the worker
    record (:func:`judge_worker`). A dead worker's pool slots are freed here, at once, and the daemon
    then marks the run FAILURE with the reason. Configure in ``dagster.yaml``::

        run_launcher:
          module: dagster_project.worker_guard
          class: DeadWorkerAwareRunLauncher
        run_monitoring:
          enabled: true
    """

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        verdict = judge_worker(run)
        if verdict.state == "dead":
            # run monitoring marks the run failed right after this; the slots go back now (Dagster alone
            # frees a finished run's slots only with free_slots_after_run_end_seconds, blind to orphaned
            # step processes that may still use the GPU -- the verdict already waited for those)
            if self._instance.event_log_storage.supports_global_concurrency_limits:
                self._instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            return CheckRunHealthResult(WorkerStatus.FAILED, verdict.reason)
        # "unknown" is reported as running: monitoring fails every other status, and a run we cannot
        # judge must not lose its slot
        return CheckRunHealthResult(WorkerStatus.RUNNING, verdict.reason)

    def get_run_worker_debug_info(self, run: dg.DagsterRun, include_container_logs: bool | None = True) -> str:
        record = WorkerRecord.from_tags(run.tags, run.run_id)
        return f"ddr worker guard: {record.describe() if record else 'no worker recorded'}; {judge_worker(run).reason}"
