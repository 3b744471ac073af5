"""The code location of tests/test_lab_deployment.py: ddr's definitions plus a capture schedule that ticks
every minute on the tiny model (the schedule a lab would run nightly, built by the same factory).

Runs execute in process (one process per run instead of one per step): the test is about the daemon and
the storage, not the executor, and each step process would import torch again on a busy CI machine.
"""

from __future__ import annotations

import dagster as dg

from dagster_project import definitions as ddr
from dagster_project.schedules import capture_schedule

IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
LIGHT_CAPTURE = {"n_prompts": 6, "batch_size": 4, "num_inference_steps": 8, "seed": 1}

lab_test_capture = capture_schedule(
    "lab_test_capture", "* * * * *", groups=["tiny"], run_key_time="%Y%m%d%H%M",
    run_config={**IN_PROCESS, "ops": {"activations": {"config": LIGHT_CAPTURE}}},
    description="tests/test_lab_deployment.py: a light tiny capture every minute")

defs = dg.Definitions.merge(ddr.defs, dg.Definitions(schedules=[lab_test_capture]))
