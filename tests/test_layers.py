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


MAX_FUNCTION_LINES = 80


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:function (lines)`` of every function under ``root`` longer than ``limit`` lines (def line to
    last line, decorators excluded)."""
    import ast

    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.name} ({n} lines)")
    return out


def test_long_functions_finds_a_long_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(pkg) == [f"pkg/m.py:long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_function_in_the_package_is_over_80_lines():
    """Each stage's run reads as a short sequence of named steps (issue 30); `make lint` runs this."""
    assert long_functions(ROOT / "src" / "ihas_lightning") == []
