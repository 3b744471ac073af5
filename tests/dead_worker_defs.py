"""A tiny code location for the dead-worker tests: two cheap assets in the pool ``gpu``, with the
executor and the sensor that ``dagster_project.definitions`` ships (tests/test_operations.py checks that
it does), without loading torch or the real assets (seconds, not tens of seconds, per process).

``gpu_hold`` writes its pid to ``$DDR_TEST_HOLD_MARKER`` and then waits (at most 120 s) for the file
``<marker>.release``: a step that holds the ``gpu`` slot for as long as a test needs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg

from dagster_project.worker_guard import free_dead_worker_pool_slots, guarded_executor


@dg.asset(pool="gpu")
def gpu_hold() -> None:
    marker = Path(os.environ["DDR_TEST_HOLD_MARKER"])
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not marker.with_name(marker.name + ".release").exists():
        time.sleep(0.05)


@dg.asset(pool="gpu")
def gpu_cheap() -> None:
    """Nothing: it only needs the slot."""


defs = dg.Definitions(
    assets=[gpu_hold, gpu_cheap],
    jobs=[dg.define_asset_job("hold_gpu", selection=[gpu_hold]),
          dg.define_asset_job("cheap_gpu", selection=[gpu_cheap])],
    sensors=[free_dead_worker_pool_slots],
    executor=guarded_executor,
)
