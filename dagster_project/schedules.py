"""Schedules and automation: the pipeline on a timer, and statistics that follow their activations.

- ``nightly_capture`` (off until switched on in the UI or with ``dagster schedule start``): every night
  requests the ``activations`` partition of each default capture group. A capture whose plan is
  complete finishes at once (resumable: nothing is regenerated); a partial one resumes.
  :func:`capture_schedule` builds the same kind of schedule for other groups and times (a lab's own
  schedule; tests/test_lab_deployment.py ticks one every minute).
- ``timestep_stats`` carries ``AutomationCondition.eager()``: when an ``activations`` partition is
  materialized, the daemon's automation sensor requests the statistics of the variants it records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from dagster_project.jobs import activations_job
from dagster_project.run_tags import ddr_run_tags
from ddr_assets.partitions import project


def capture_schedule(name: str, cron_schedule: str, groups: Sequence[str] | None = None,
                     run_config: Mapping[str, Any] | None = None,
                     default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED,
                     description: str | None = None, run_key_time: str = "%Y%m%d") -> dg.ScheduleDefinition:
    """A schedule of ``capture_activations`` runs, one per capture group per tick.

    ``groups``: the capture groups (default: those of the config's default variants, read at each tick).
    ``run_config``: the runs' config (e.g. a light capture). Each run's key is ``<group>-<tick date and
    time>`` (``run_key_time``: a strftime format, the date by default; a schedule that ticks more often than
    daily needs the time too, e.g. ``"%Y%m%d%H%M"``), so a tick evaluated twice (daemon restart) launches
    nothing twice; the runs are tagged ``ddr/launched_by: <name>``.
    """

    @dg.schedule(name=name, job=activations_job, cron_schedule=cron_schedule, default_status=default_status,
                 description=description or f"capture_activations of {list(groups) if groups else 'the default capture groups'} "
                                            f"on '{cron_schedule}'; resumes unfinished captures.")
    def _capture(context: dg.ScheduleEvaluationContext):
        cfg = project()
        wanted = list(groups) if groups else list(dict.fromkeys(cfg.capture_of(v) for v in cfg.default_variants))
        for group in wanted:
            yield dg.RunRequest(run_key=f"{group}-{context.scheduled_execution_time.strftime(run_key_time)}", partition_key=group,
                                run_config=dict(run_config or {}),
                                tags={**ddr_run_tags(["activations"], group), "ddr/launched_by": name})

    return _capture


nightly_capture = capture_schedule(
    "nightly_capture", "0 2 * * *",
    description="Nightly: (re)capture the default variants' capture groups; resumes unfinished ones.")


SCHEDULES = [nightly_capture]
