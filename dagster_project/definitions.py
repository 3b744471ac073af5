"""The ddr code location: ``dagster dev`` (pyproject's ``[tool.dagster]``) or ``dagster dev -w workspace.yaml``."""

from __future__ import annotations

import dagster as dg

from dagster_project.jobs import JOBS
from dagster_project.resources import ComputeResource, DdrStorage
from dagster_project.schedules import SCHEDULES
from ddr_assets import ALL_ASSETS

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=JOBS,
    schedules=SCHEDULES,
    resources={"storage": DdrStorage(), "compute": ComputeResource()},
)
