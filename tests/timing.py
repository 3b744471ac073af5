"""CPU-time budgets for tests: what a busy machine does not inflate.

A wall-clock threshold measures the machine as much as the code: on a shared 2-core CI runner a step that takes 20 s
idle can take 60 s, and the test flakes. Budgets of work done in this process are taken in its CPU time
(:func:`time.process_time`), budgets of work done by child processes in theirs (:func:`children_cpu_seconds`).
Where the claim is "does not wait" (a lock that fails at once), wall time is the measure and the bound is set far
from the alternative (the wait it would otherwise do), not near the idle time.
"""

from __future__ import annotations

import resource


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process's finished, waited-for children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
