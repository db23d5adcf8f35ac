"""How many CPU cores this process may use, inside a container too.

The CPU affinity (`os.sched_getaffinity`) shows the cores a process may run on, not a
container's CPU limit: Docker's `--cpus` and a Kubernetes CPU limit set the cgroup's CPU quota
instead, and a process that starts one thread per visible core there is throttled. Standard
library only: `scripts/serve.py` uses it before anything heavy is imported, and the worker
sizes its decode pool with it (`handler/preparation.py`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cores(cgroup: Path = CGROUP) -> int:
    """CPU cores this process may use: its CPU affinity, capped by a container's CPU limit (the
    cgroup's CPU quota, v2 `cpu.max` or v1 `cpu.cfs_quota_us`), which the affinity does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota in cores (quota / period), or None where there is none or none can be read."""
    try:
        if (cgroup / "cpu.max").is_file():  # v2: "max 100000" or "800000 100000"
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:  # v1: -1 for none
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None
