"""How many torch threads a run uses (``trainer.threads``, default ``auto``), chosen once per process.

``auto`` = the cores this process may use, divided by the jobs of a multirun that run at once, chosen
once at the start of the run and kept for the whole run, so a seed gives the same numbers under any
load. ``adaptive`` starts from the same count and re-chooses it while training from step times and
the load of other processes (:func:`thread_tuner`): faster on a busy machine, but a switch changes the
numbers in the last bits (not under ``trainer.deterministic=true``, which keeps the count).


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
import statistics
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger("ihas_lightning")
AUTO = "auto"
ADAPTIVE = "adaptive"
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
    if value in (AUTO, ADAPTIVE) or value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"config key 'trainer.threads': must be 'auto', 'adaptive' or an integer >= 1 (got {value!r})"
        )


def adapts(value: Any, deterministic: Any = False) -> bool:
    """Whether the count is re-chosen while training: only ``adaptive``, and not when deterministic."""
    return value == ADAPTIVE and not deterministic


def choose(
    value: Any, cores: int | None = None, jobs: int | None = None, deterministic: Any = False
) -> tuple[int, str]:
    """(threads, why) for a ``trainer.threads`` value: ``auto`` is kept for the whole run, ``adaptive``
    is re-chosen while a fit runs (:func:`thread_tuner`; not under ``trainer.deterministic=true``)."""
    check(value)
    if value not in (AUTO, ADAPTIVE, None):
        return int(value), "trainer.threads"
    cores = usable_cores() if cores is None else cores
    jobs = parallel_jobs(cores) if jobs is None else jobs
    n = max(1, cores // jobs)
    name = ADAPTIVE if value == ADAPTIVE else AUTO
    if n == 1:
        tuned = ""
    elif adapts(value, deterministic):
        tuned = f"; while training: re-chosen up to {n} from step times and free cores, the first fit at 1"
    elif value == ADAPTIVE:
        tuned = "; kept for the whole run (trainer.deterministic=true)"
    else:
        tuned = "; kept for the whole run"
    return n, f"{name}: {cores} usable core(s) / {jobs} parallel job(s){tuned}"


def apply(cfg: Any) -> int:
    """Set torch's intra-op threads from ``trainer.threads`` (once per process; logged once)."""
    import torch

    tcfg = cfg.get("trainer") or {}
    threads, why = choose(tcfg.get("threads", AUTO), deterministic=tcfg.get("deterministic"))
    if _CHOSEN.get("threads") != threads:
        torch.set_num_threads(threads)
        if not _CHOSEN:
            log.info("torch threads: %d (%s)", threads, why)
        _CHOSEN["threads"] = threads
    return threads


class OtherLoad:
    """The cores that *other* processes kept busy on this process's CPUs since :meth:`reset`: the non-idle
    time of the affinity mask's CPUs in ``/proc/stat`` (user, system, irq, steal ...) minus this process's
    own CPU time (every thread of it), over the elapsed time. Linux only; :meth:`busy` is ``None`` where it
    cannot be read, under a cgroup quota smaller than the mask (host CPUs then say nothing about the
    quota), and until ``min_window`` seconds have passed (``/proc/stat`` counts in 10 ms ticks).

    What it is for: the tuner need not try 2 threads when the second core is already taken."""

    def __init__(self, stat: Path = Path("/proc/stat"), cpus: set[int] | None = None, own=None,
                 min_window: float = 0.2, quota_root: Path = Path("/sys/fs/cgroup")):  # fmt: skip
        import time

        try:
            self.cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
        except AttributeError:  # not Linux
            self.cpus = set()
        quota = cgroup_quota(quota_root)
        if quota is not None and math.ceil(quota) < len(self.cpus):
            self.cpus = set()
        self.stat, self.own, self.min_window = stat, own or time.process_time, min_window
        self.tick = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._start: tuple[int, int, float] | None = None
        self.reset()

    @property
    def n(self) -> int:
        return len(self.cpus)

    @property
    def available(self) -> bool:
        return self._start is not None

    def _read(self) -> tuple[int, int, float] | None:
        """(non-idle ticks, all ticks) of the mask's CPUs, and this process's CPU seconds."""
        if not self.cpus:
            return None
        try:
            busy = total = 0
            for line in self.stat.read_text().splitlines():
                if not line.startswith("cpu") or line[3:4] in (" ", ""):
                    continue
                name, *v = line.split()
                if int(name[3:]) in self.cpus:
                    t = [int(x) for x in v[:8]]  # user nice system idle iowait irq softirq steal
                    total += sum(t)
                    busy += sum(t) - t[3] - t[4]
        except (OSError, ValueError, IndexError):
            return None
        return busy, total, self.own()

    def reset(self) -> None:
        self._start = self._read()

    def busy(self) -> float | None:
        """Cores used by other processes on average since :meth:`reset` (None: unknown, or too soon)."""
        now = self._read()
        if now is None or self._start is None:
            return None
        seconds = (now[1] - self._start[1]) / self.tick / self.n  # elapsed, from the CPUs' own ticks
        if seconds < self.min_window:
            return None
        others = (now[0] - self._start[0]) / self.tick - (now[2] - self._start[2])
        return max(0.0, others / seconds)


class _Tuning:
    """What the thread tuner does at each Lightning hook (see :func:`thread_tuner`); the Callback class
    that mixes it in is made in :func:`thread_tuner`, so importing this module does not import Lightning."""

    def __init__(
        self,
        max_threads: int,
        probe: int,
        first_check: int,
        max_every: int,
        warmup: int,
        backoff: int,
        load: Any,
    ) -> None:
        self.max_threads, self.probe_batches, self.first_check = max_threads, probe, first_check
        self.max_every, self.backoff = max_every, backoff
        self.current = min(max_threads, int(_CHOSEN.get("tuned", 1)))
        self.every = first_check
        self.countdown = first_check
        self.probing: int | None = None  # the count being probed
        self.probe_times: list[float] = []
        self.recent: list[float] = []
        self.recent_fwd: list[float] = []  # the forward passes of those batches (per sample)
        self._t0: float | None = None
        self._n = 1  # the batch's rows
        self._fwd_seen = False  # this batch's first backward has come
        self._ignore = False  # this batch's probe was ended in its forward: not measured
        self.history: list[tuple[int, int]] = []  # (global step, threads) at each switch
        self.probe_seconds = 0.0  # spent at the probed count (what probing cost at most)
        self.skip = warmup
        self.load = OtherLoad() if load is None else load
        self.skipped = 0  # probes of more threads skipped: the spare cores were busy
        self.others = 0.0  # the cores other processes kept busy, at the last read

    def _set(self, n: int) -> None:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def on_train_start(self, trainer, pl_module):
        self._set(self.current)
        self.load.reset()

    def _target(self) -> int | None:
        """The count the next check tries; 0: skip the check (no room for more than 1 thread);
        None: not known yet (the load's window is too short)."""
        max_threads = self.max_threads
        if self.current == max_threads or not self.load.available:
            return 1 if self.current != 1 else max_threads
        others = self.load.busy()
        if others is None:
            return None
        self.others = others
        room = min(max_threads, max(1, math.floor(self.load.n - others + 0.75)))
        if room > self.current:
            return room
        return 1 if self.current != 1 else 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()
        self._n = max(1, int(batch[1].shape[0]))
        self._fwd_seen = self._ignore = False

    def on_before_backward(self, trainer, pl_module, loss):
        if self._t0 is None or self._fwd_seen or self.skip > 0:
            return
        self._fwd_seen = True  # the first backward of the batch (a bi-level step has more)
        fwd = (time.perf_counter() - self._t0) / self._n
        if self.probing is None:
            self.recent_fwd = (self.recent_fwd + [fwd])[-16:]
        elif self.recent_fwd and fwd > 1.5 * statistics.median(self.recent_fwd):
            self.probe_seconds += fwd * self._n
            self._ignore = True  # the probed count lost already: the rest of the batch at the current
            self._end_check(trainer, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        dt = (time.perf_counter() - self._t0) / self._n
        if self.skip > 0:
            self.skip -= 1
            return
        if self._ignore:
            return
        if self.probing is None:
            self.recent = (self.recent + [dt])[-16:]
            self.countdown -= 1
            if self.countdown <= 0:
                self._start_check()
            return
        self.probe_times.append(dt)
        self.probe_seconds += dt * self._n
        ref = statistics.median(self.recent)
        if len(self.probe_times) < self.probe_batches and dt <= 1.5 * ref:
            return
        self._end_check(trainer, statistics.median(self.probe_times))

    def _start_check(self) -> None:
        """A check is due: start probing the target count, or (no room) stay and look again later."""
        target = self._target()
        if target is None:
            return  # read the load again after the next batch
        if target == 0:  # the spare cores are busy: stay, look again after `every` batches
            if not _CHOSEN.get("stayed"):  # once per process, at INFO
                _CHOSEN["stayed"] = True
                log.info("torch threads: staying at 1 while other processes keep %.1f of the %d "
                         "cores busy (re-checked while training)", self.others, self.load.n)  # fmt: skip
            self.skipped += 1
            self.countdown, self.recent, self.recent_fwd = self.every, [], []
            self.load.reset()
            return
        self.probing, self.probe_times = target, []
        self._set(self.probing)

    def _end_check(self, trainer, other: float | None) -> None:
        """End a probe: switch to the probed count when its median ``other`` (per sample) is 15%
        faster than the current count's recent median; ``other=None``: the probe lost early."""
        assert self.probing is not None
        ref = statistics.median(self.recent) if self.recent else float("inf")
        if other is not None and other < 0.85 * ref:
            # the first switch of the process at INFO, later ones at DEBUG (the console stays quiet)
            level = logging.INFO if not _CHOSEN.get("switched") else logging.DEBUG
            _CHOSEN["switched"] = True
            log.log(level, "torch threads: %d -> %d (measured: %.2f vs %.2f us/sample; re-checked while "
                    "training; a run bitwise reproducible under any load: trainer.deterministic=true)",
                    self.current, self.probing, ref * 1e6, other * 1e6)  # fmt: skip
            self.history.append((int(trainer.global_step), self.probing))
            self.current = self.probing
            self.every = min(self.first_check * self.backoff, self.max_every)
        else:
            self.every = min(self.every * self.backoff, self.max_every)
        self.probing = None
        self._set(self.current)
        self.countdown, self.recent, self.recent_fwd = self.every, [], []
        self.load.reset()

    def on_train_end(self, trainer, pl_module):
        _CHOSEN["tuned"] = self.current  # the next fit of this process starts here
        self._set(self.max_threads)  # stages outside a fit run at the configured count


def thread_tuner(
    max_threads: int,
    probe: int = 3,
    first_check: int = 4,
    max_every: int = 6400,
    warmup: int = 3,
    backoff: int = 4,
    load: Any = None,
):
    """``trainer.threads=adaptive`` (opt-in) while a fit runs: re-choose the thread count, up to ``max_threads``, from
    the measured step times and the load of other processes (a Lightning callback).

    Why: the cores a process may use are not the cores that are free. When another process keeps a core
    busy, every parallel op waits at a barrier for the thread that shares it: the sparse step's many small
    ops collapse with 2 threads and do not with 1 (issue 15). So at each check the tuner compares the
    current count's recent batches (per sample, median) with ``probe`` batches at another count, and
    keeps the faster; a switch needs a 15% faster median (no flapping on noise).

    Which count a check tries: where other processes' load can be read (:class:`OtherLoad`, ``load``;
    Linux, over at least 0.2 s since the last check), the room they leave, ``floor(cores - others +
    0.75)`` threads capped at ``max_threads``, when that is more than the current count; else 1 thread
    (a check against 1 costs little). At 1 thread with no more room (the spare cores are taken) the check
    is skipped at no cost and the load is read again at the next one, which does not back off. Where the
    load cannot be read: ``max_threads`` from 1, 1 from any other count.

    Where a fit starts: the count this process's previous fit ended on, else 1 thread. The costs are
    lopsided: on a busy machine a batch at 2 threads costs 2.5-3x a batch at 1, on a quiet one a batch at
    1 thread costs 1.3-1.6x a batch at 2; starting at 1 bounds the worse case. The first ``warmup``
    batches of a fit are not measured (first-touch allocations); the first check comes ``first_check``
    batches later. After a check that keeps the count the next comes ``backoff`` times further away (at
    most ``max_every`` batches); after a switch, ``first_check * backoff`` batches later. A probe batch
    more than 1.5x slower than the recent median ends the probe at once, and so does a probe batch whose
    forward pass (batch start to the first backward) is more than 1.5x slower than the recent forwards:
    then its backward and optimizer step, the part that collapses on a busy core, already run at the
    current count, so probing the slow count costs about one forward pass. A switch is logged.

    Reproducibility: a switch can change a run's numbers in the last bits, and training amplifies them.
    Our own ops do not depend on the thread count (the row-wise Adam's merge, the lookups, the GEMMs
    tested here), but PyTorch's vectorised elementwise kernels split their range by thread count and
    compute each chunk's tail on the scalar path: at a 409-row batch of the 624-wide gate, 1 of 255,216
    sigmoid values differs between 1 and 2 threads. So a run that the tuner switched is not bitwise
    reproducible when the machine's load differs. That is why the default, ``auto``, keeps one count for
    the whole run (as do ``adaptive`` under ``trainer.deterministic=true`` and an integer): the same
    seed gives the same numbers."""
    from lightning.pytorch.callbacks import Callback

    class ThreadTuner(_Tuning, Callback):
        """The thread tuner as a Lightning callback (its hooks are :class:`_Tuning`'s)."""

    return ThreadTuner(max_threads, probe, first_check, max_every, warmup, backoff, load)
