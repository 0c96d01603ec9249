"""How many torch threads a run uses (``trainer.threads``, default ``auto``), chosen once per process.

``auto`` = the cores this process may use, divided by the jobs of a multirun that run at once:

* cores: the CPU affinity mask (``taskset``, SLURM's ``--cpus-per-task``), capped by a cgroup CPU
  quota (containers, CI) -- cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``;
* parallel jobs: ``hydra.launcher.n_jobs`` of a parallel launcher (``hydra/launcher=local|joblib``;
  -1 = one per core), else 1.

torch's own default is every core of the machine, whatever the quota and however many jobs share it:
several jobs x 2+ threads on 2 cores makes every small parallel op wait at a barrier (issue 15:
a 10-20x slower sparse step). An integer is used as given.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger("ihas_lightning")
AUTO = "auto"
_CHOSEN: dict[str, Any] = {}


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, v1 ``cpu/cpu.cfs_*``), None without one."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q, p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q.is_file() and p.is_file():
            quota = int(q.read_text())
            return None if quota <= 0 else quota / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cores(root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its affinity mask, capped by a cgroup quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota(root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def parallel_jobs(cores: int) -> int:
    """Jobs of the current multirun that run at the same time (1 outside a parallel multirun)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return 1
        n = hc.launcher.get("n_jobs")
    except (ValueError, ImportError, AttributeError):  # not under Hydra, or a launcher without n_jobs
        return 1
    if n is None:
        return 1
    n = int(n)
    return cores if n < 0 else max(1, n)  # joblib: -1 = one per core


def check(value: Any) -> None:
    if value == AUTO or value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config key 'trainer.threads': must be 'auto' or an integer >= 1 (got {value!r})")


def choose(value: Any, cores: int | None = None, jobs: int | None = None) -> tuple[int, str]:
    """(threads, why) for a ``trainer.threads`` value."""
    check(value)
    if value not in (AUTO, None):
        return int(value), "trainer.threads"
    cores = usable_cores() if cores is None else cores
    jobs = parallel_jobs(cores) if jobs is None else jobs
    return max(1, cores // jobs), f"auto: {cores} usable core(s) / {jobs} parallel job(s)"


def apply(cfg: Any) -> int:
    """Set torch's intra-op threads from ``trainer.threads`` (once per process; logged once)."""
    import torch

    value = (cfg.get("trainer") or {}).get("threads", AUTO)
    threads, why = choose(value)
    if _CHOSEN.get("threads") != threads:
        torch.set_num_threads(threads)
        if not _CHOSEN:
            log.info("torch threads: %d (%s)", threads, why)
        _CHOSEN["threads"] = threads
    return threads
