"""Helpers shared by the acceptance and tuning scripts: run ``stage=all`` in a subprocess (the path
users run), read a finished run dir into one flat summary, and paired statistics over seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ihas_lightning.stats import mean_ci, verdict  # noqa: F401 - re-exported for the bench scripts

# the shared real samples (relative to ``shared/``) and how each is split
SAMPLES = {
    "criteo": ("data", "criteo", "Lapis-Hong_Wide-ResDNN"),
    "avazu": ("data", "avazu", "Lapis-Hong_Wide-ResDNN"),
}


def shared_dir() -> Path:
    return Path(os.environ.get("IHAS_SHARED_DIR", Path(__file__).resolve().parents[2].parent / "shared"))


def sample_overrides(dataset: str, split: str, prepared_root: Path) -> list[str]:
    """Hydra overrides for a shared sample: ``given`` (its train/dev/test files) or ``random`` (the
    paper's seeded 80/10/10 split of its train file). Raises SystemExit naming a missing file."""
    d = shared_dir().joinpath(*SAMPLES[dataset])
    files = {"train": d / "train.csv", "val": d / "dev.csv", "test": d / "test.csv"}
    for f in files.values() if split == "given" else [files["train"]]:
        if not f.is_file():
            raise SystemExit(f"error: {f}: shared sample missing (set IHAS_SHARED_DIR to the shared/ folder)")
    prepared = prepared_root / f"{dataset}-{split}"
    if split == "given":
        paths = [f"dataset.{s}_path={p}" for s, p in files.items()]
    elif split == "random":
        paths = [f"dataset.raw_path={files['train']}"]
    else:
        raise SystemExit(f"error: unknown split {split!r} (given | random)")
    return [f"dataset={dataset}", *paths, f"dataset.prepared_dir={prepared}"]


def run_stage_all(overrides: list[str], run_dir: Path, log_path: Path, threads: int | None = None) -> float:
    """``python -m ihas_lightning stage=all hydra.run.dir=<run_dir> <overrides>``; returns the wall time
    of the process (start-up included). A failure stops the caller with a one-line message."""
    cmd = [sys.executable, "-m", "ihas_lightning", "stage=all", "logger=none",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        msg = [ln for ln in lines if ln.startswith("error:")][-1:] or lines[-1:] or ["(no output)"]
        raise SystemExit(f"run {run_dir.name} failed: {msg[0]} (log: {log_path})")
    return seconds


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """One flat record of a finished ``stage=all`` run dir (rows, search, clusters, timing)."""
    res = json.loads((run_dir / "evaluate" / "results.json").read_text())
    search = json.loads((run_dir / "search" / "metrics.json").read_text())
    cluster = json.loads((run_dir / "cluster" / "cluster.json").read_text())
    pipe = run_dir / "pipeline.json"
    rows = {r["model"]: r for r in res["rows"]}
    pol = search.get("gate", {}).get("polarization", {})
    out: dict[str, Any] = {
        "rows": {
            m: {k: r.get(k) for k in ("val_auc", "val_logloss", "test_auc", "test_logloss", "params")}
            for m, r in rows.items()
        },
        "search": {
            "open_share": search.get("open_share"),
            "gate_steps": search.get("gate_steps"),
            "search_every": search.get("budget", {}).get("search_every"),
            "batch_size": search.get("budget", {}).get("batch_size"),
            "best_epoch": search.get("best_epoch"),
            "pretrain_epochs": search.get("pretrain_epochs"),
            "share_valley_found": pol.get("share_valley_found"),
            "share_p_in_0.1_0.9": pol.get("share_p_in_0.1_0.9"),
            "open_share_per_field": search.get("open_share_per_field"),
            "instance_structure": search.get("gate", {}).get("instance_structure"),
            "warnings": search.get("warnings", []),
            "fallback": (search.get("sparsest_selection") or {}).get("fallback"),
            "chosen_epoch": (search.get("sparsest_selection") or {}).get("chosen_epoch"),
        },
        "base_best_epoch": _read_json(run_dir / "base" / "search" / "metrics.json").get("best_epoch"),
        "clusters": [
            {
                k: c.get(k)
                for k in (
                    "cluster",
                    "val_samples",
                    "val_auc",
                    "test_samples",
                    "test_auc",
                    "test_logloss",
                    "test_positive_rate",
                    "embedding_width",
                    "params",
                )
            }
            for c in res["per_cluster"]
        ],  # fmt: skip
        "cluster_input": res.get("cluster_input"),
        "field_names": cluster.get("field_names"),
        "field_dims": cluster.get("field_dims"),
        "warnings": res.get("warnings", []),
        "retrain_guard": res.get("retrain_guard"),
        "pipeline_seconds": _read_json(pipe).get("total_seconds"),
    }
    if "recovery" in res:
        rec = res["recovery"]
        out["recovery"] = {
            "per_cluster": [
                {
                    k: c[k]
                    for k in (
                        "cluster",
                        "group",
                        "purity",
                        "selected",
                        "relevant",
                        "precision",
                        "recall",
                        "f1",
                    )
                }
                for c in rec["per_cluster"]
            ],
            "min_f1": rec["min_f1"],
            "mean_f1": sum(c["f1"] for c in rec["per_cluster"]) / len(rec["per_cluster"]),
        }
    return out


def _read_json(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text()) if p.is_file() else {}


def fmt(v: Any, d: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{d}f}"
    return str(v)


def fmt_ci(c: dict[str, Any], d: int = 4, signed: bool = False) -> str:
    if c["mean"] is None:
        return "-"
    s = "+" if signed else ""
    if c["ci"][0] is None:
        return f"{c['mean']:{s}.{d}f}"
    return f"{c['mean']:{s}.{d}f} [{c['ci'][0]:{s}.{d}f}, {c['ci'][1]:{s}.{d}f}]"
