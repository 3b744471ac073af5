"""SLURM job payload: runs ``ddr_core.cluster_payload.main`` in the cluster's venv.

Uploaded and executed as a plain script by dagster-slurm (``python slurm_payload.py``); imports no
Dagster (only ``dagster_pipes`` through ddr_core.cluster_payload), so the cluster venv needs ``ddr``
(with torch) and ``dagster-pipes`` only.
"""

import sys

from ddr_core.cluster_payload import main

if __name__ == "__main__":
    sys.exit(main())
