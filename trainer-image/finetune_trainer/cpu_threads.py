"""Intra-op threads per process, from the CPUs this process may really use.

PyTorch sizes its thread pool from the machine's cores, not from what the process is given:
a pod with a CPU limit of 4 on a 64-core node runs 64 threads on 4 CPUs' worth of time, and two
trainers on one machine (`finetune run` with nodes: 2) each take every core. Measured on a
2-core machine: the quickstart at 19.1 tokens/s with two trainers fighting, 208 tokens/s with
one thread each. So every launcher divides what is available (the affinity mask, and the
cgroup's CPU quota when it is lower) by the processes that share it, and says what it chose.
A user's OMP_NUM_THREADS always wins. Standard library only (the launcher imports it first).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

ENV_OMP_NUM_THREADS = "OMP_NUM_THREADS"
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


@dataclass(frozen=True)
class CpuBudget:
    cpus: int  # what this process may use: min(affinity, ceil(quota)), at least 1
    source: str  # for the log: "4 CPUs in the affinity mask", "cgroup quota 2.5 CPUs", ...


def cgroup_quota(v2: Path = CGROUP_V2_CPU_MAX, v1_quota: Path = CGROUP_V1_QUOTA,
                 v1_period: Path = CGROUP_V1_PERIOD) -> float | None:
    """The cgroup's CPU quota in CPUs (a pod's limits.cpu), or None when unlimited or unknown."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = int(v1_quota.read_text()), int(v1_period.read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus(quota: float | None = None, affinity: int | None = None) -> CpuBudget:
    """CPUs this process may use (arguments: for tests; by default read from the system)."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota() if quota is None else quota
    if quota is not None and math.ceil(quota) < affinity:
        return CpuBudget(max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g}")
    return CpuBudget(max(1, affinity), f"{affinity} CPUs in the affinity mask")


def threads_per_process(processes: int, budget: CpuBudget | None = None) -> int:
    budget = budget or available_cpus()
    return max(1, budget.cpus // max(1, processes))


def set_threads_env(env: MutableMapping[str, str], processes: int, *, user_env: Mapping[str, str] | None = None,
                    budget: CpuBudget | None = None) -> str:
    """Set OMP_NUM_THREADS in `env` for `processes` sharing this machine's CPUs, unless the user
    set it (in `user_env`, default `env`). Returns the line to log."""
    user_env = env if user_env is None else user_env
    if user_env.get(ENV_OMP_NUM_THREADS):
        return f"intra-op threads per process: {user_env[ENV_OMP_NUM_THREADS]} (OMP_NUM_THREADS, as set)"
    budget = budget or available_cpus()
    threads = threads_per_process(processes, budget)
    env[ENV_OMP_NUM_THREADS] = str(threads)
    return f"intra-op threads per process: {threads} ({budget.source}, {processes} process(es) sharing it)"
