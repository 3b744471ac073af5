"""The ddr code location: ``dagster dev`` (pyproject's ``[tool.dagster]``) or ``dagster dev -w workspace.yaml``."""

from __future__ import annotations

import dagster as dg

from dagster_project.cli_checks import refuse_bad_cli_command
from dagster_project.jobs import JOBS
from dagster_project.schedules import SCHEDULES
from dagster_project.worker_guard import free_dead_worker_pool_slots, guarded_executor
from ddr_assets import ALL_ASSETS
from ddr_core.shared_root import apply_umask_from_env
from ddr_resources.resources import ComputeResource, DdrStorage

# DDR_UMASK (a lab's group-shared data root, docs/DEPLOYMENT.md): set in every process that loads this code
# location (daemon, UI, run workers, `dagster asset materialize`) before any run writes a file
apply_umask_from_env()

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=[free_dead_worker_pool_slots],
    # each DDR_* variable set when the code location loads is a dg.EnvVar, resolved when a run launches; the
    # launchpad's resources config wins over it (ddr_resources/resources.py)
    resources={"storage": DdrStorage.from_env(), "compute": ComputeResource.from_env()},
    # Dagster's default executor plus the worker record and freeing of dead runs' pool slots
    executor=guarded_executor,
)

# `dagster asset materialize` / `dagster job execute` without DAGSTER_HOME or with a wrong partition key: one
# line naming the fix instead of a run on a throw-away instance or a traceback (dagster_project/cli_checks.py)
refuse_bad_cli_command(defs)
