"""glibc ``malloc`` settings for training (``trainer.malloc_tuning``, default on; issue 15).

A training step allocates and frees the same few large buffers every batch: the lookup output and its
gradient (batch x fields x 16 floats, 5 MiB at batch 2048 on Criteo), the first layer's input gradient,
the merged row gradients. glibc serves a block above its mmap threshold (128 KiB, raised on the fly
after the first such block is freed, per arena) with a fresh ``mmap`` and returns it to the kernel on
``free``; a block at the top of a heap above the trim threshold is returned too. Each fresh mapping is
then paid again as page faults, and the kernel zeroes every 4 KiB page: measured 100-2,000 minor faults
per step, varying from run to run (the thresholds move with the allocation history and differ between
the main arena and the OpenMP workers' arenas), and more per step with 2 threads than with 1.

Fixed thresholds end that: blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the
heap, and up to 256 MiB of free heap top is kept for the next step. The faults drop to ~0 per step; the
speed-up is measured side by side on the CLI path by ``experiments/bench/bench_alloc.py``. The cost is memory the
process keeps after a peak (at most the trim threshold above what is in use).

The settings are process-wide and applied once, before the first fit; ``mallopt`` exists only in glibc,
so elsewhere (musl, macOS, Windows) this does nothing. ``LD_PRELOAD`` of jemalloc/tcmalloc is an
alternative the user can choose outside Python; with it, ``mallopt`` is glibc's and changes nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from typing import Any

from .errors import ConfigError

log = logging.getLogger("ihas_lightning")

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: glibc refuses a larger value
TRIM_THRESHOLD = 256 << 20
_STATE: dict[str, bool] = {}


def check(value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"config key 'trainer.malloc_tuning': must be true or false (got {value!r})")


def tune(enabled: bool = True) -> bool:
    """Fix glibc's mmap and trim thresholds (once per process). True when they are set now or were
    set before; False when disabled or not glibc."""
    if not enabled:
        return False
    if "applied" in _STATE:
        return _STATE["applied"]
    ok = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)  # the running process's symbols: glibc's mallopt
            ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
        except (OSError, AttributeError):
            ok = False
    _STATE["applied"] = ok
    log.debug(
        "malloc tuning: %s", "mmap threshold 32 MiB, trim threshold 256 MiB" if ok else "not glibc, skipped"
    )
    return ok


def apply(cfg: Any) -> bool:
    """``tune`` from ``trainer.malloc_tuning`` (default true)."""
    value = (cfg.get("trainer") or {}).get("malloc_tuning", True)
    check(value)
    return tune(value)
