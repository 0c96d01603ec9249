"""``trainer.malloc_tuning``: fixed glibc thresholds (ihas_lightning/allocator.py)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from ihas_lightning import allocator
from ihas_lightning.errors import ConfigError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a fresh process: is a 1 MiB block (above glibc's default 128 KiB mmap threshold) served by mmap?
PROBE = """
import ctypes, sys
import torch
from ihas_lightning.allocator import tune

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = tune(sys.argv[1] == "on")
before = libc.mallinfo2().hblkhd
x = torch.empty(1 << 18)  # 1 MiB of float32
print(applied, libc.mallinfo2().hblkhd - before)
"""


def test_bad_values_are_config_errors():
    for bad in (1, "yes", None):
        with pytest.raises(ConfigError, match="trainer.malloc_tuning"):
            allocator.check(bad)
    allocator.check(True)
    allocator.check(False)
    assert allocator.tune(False) is False


@pytest.mark.skipif(not GLIBC or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_tuned_blocks_come_from_the_heap_not_fresh_mappings():
    """Untuned, glibc mmaps a fresh 1 MiB block (and page-faults it in again after every free); tuned,
    it comes from the heap, whose freed memory is kept for the next step."""
    out = {}
    for mode in ("on", "off"):
        p = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        applied, mapped = p.stdout.split()
        out[mode] = (applied == "True", int(mapped))
    assert out["on"] == (True, 0)
    assert out["off"][0] is False and out["off"][1] >= 1 << 20


def test_the_cli_rejects_a_bad_value_in_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "stage=search", "trainer.malloc_tuning=3",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error")]
    assert lines and "trainer.malloc_tuning" in lines[0]
    assert "Traceback" not in p.stderr
