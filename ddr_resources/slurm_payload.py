"""SLURM job payload, uploaded and executed as a plain script by dagster-slurm (``python slurm_payload.py``).

Under Dagster Pipes it reads the stage request from the Pipes extras (``request``), runs it with
:func:`ddr_core.cluster_payload.run_stage` (which writes the completion report only on success) and
reports where the report is; without Pipes it takes a request JSON file like
``python -m ddr_core.cluster_payload``. The cluster venv needs ``ddr`` (with torch) and
``dagster-pipes`` only.

Slurm's signal before the time limit (``#SBATCH --signal=B:USR1@N``, the ``signal_before_timeout`` job
option) reaches this process itself (dagster-slurm's job script ``exec``s it): it asks the stage to stop
after the unit of work in progress (:func:`ddr_core.progress.request_stop`); the error report then says
``interrupted`` and the Dagster side resubmits the stage, which resumes from the finished units.
"""

import os
import signal
import sys

from ddr_core.cluster_payload import StageRequest, main, report_path, run_stage
from ddr_core.progress import request_stop


def stop_on_time_limit_signal(signum: int, _frame) -> None:
    request_stop(f"Slurm's signal {signal.Signals(signum).name} before the job's time limit")


def run_under_pipes() -> int:
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        request = StageRequest.model_validate(pipes.get_extra("request"))
        report = run_stage(request, log=pipes.log.info)
        pipes.report_custom_message({
            "ddr_report": str(report_path(request.data_root, request.experiment, request.invocation_id)),
            "seconds": report["seconds"],
        })
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, stop_on_time_limit_signal)
    sys.exit(run_under_pipes() if "DAGSTER_PIPES_CONTEXT" in os.environ else main())
