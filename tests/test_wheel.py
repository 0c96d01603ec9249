"""An installed wheel works outside the repository: conf/ ships as package data."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    pytest.importorskip("setuptools")
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), "-q"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "deprecat" not in (r.stdout + r.stderr).lower()
    whl = next(wheels.glob("ihas_lightning-*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    assert "ihas_lightning/conf/config.yaml" in names and "ihas_lightning/conf/method/ihas.yaml" in names
    # the lab (benchmarks, acceptance, tuning, bad inputs) lives in experiments/, not in the package
    assert not [n for n in names if "/bench/" in n or n.startswith(("bench/", "experiments/"))], names

    # a fresh venv with the wheel; the other packages (torch, lightning, ...) from this environment
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "host_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "-q", str(whl)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("IHAS_CONF_DIR", "PYTHONPATH")}
    env["WANDB_MODE"] = "offline"
    r = subprocess.run([str(py), "-m", "ihas_lightning", "stage=all", "trainer=debug", "logger=none",
                        "dataset.rows=2000", "hydra.run.dir=run"], cwd=work, capture_output=True, text=True,
                       env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    where = subprocess.run([str(py), "-c", "import ihas_lightning; print(ihas_lightning.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env).stdout  # fmt: skip
    assert str(venv) in where  # the installed copy ran, not the repository's
    assert (work / "run" / "evaluate" / "results.json").is_file()
