"""The layer contract (pyproject [tool.importlinter]): stages never import each other; lower layers never
import higher ones. Also run by `make lint`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_checkpoint_is_loaded_with_weights_only_false():
    hits = [p for p in (ROOT / "src").rglob("*.py") if "weights_only=False" in p.read_text()]
    assert hits == []
