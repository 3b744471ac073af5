"""Schedules and automation: the pipeline on a timer, and statistics that follow their activations.

- ``nightly_capture`` (off until switched on in the UI or with ``dagster schedule start``): every night
  requests the ``activations`` partition of each default capture group. A capture whose plan is
  complete finishes at once (resumable: nothing is regenerated); a partial one resumes.
- ``timestep_stats`` carries ``AutomationCondition.eager()``: when an ``activations`` partition is
  materialized, the daemon's automation sensor requests the statistics of the variants it records.
"""

import dagster as dg

from dagster_project.jobs import activations_job
from dagster_project.run_tags import ddr_run_tags
from ddr_assets.partitions import project


@dg.schedule(job=activations_job, cron_schedule="0 2 * * *", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Nightly: (re)capture the default variants' capture groups; resumes unfinished ones.")
def nightly_capture(context: dg.ScheduleEvaluationContext):
    cfg = project()
    groups = list(dict.fromkeys(cfg.capture_of(v) for v in cfg.default_variants))
    for group in groups:
        yield dg.RunRequest(run_key=f"{group}-{context.scheduled_execution_time:%Y%m%d}", partition_key=group,
                            tags={**ddr_run_tags(["activations"], group), "ddr/launched_by": "nightly_capture"})


SCHEDULES = [nightly_capture]
