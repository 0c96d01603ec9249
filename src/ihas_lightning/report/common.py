"""What every report table shares: :func:`collect` (the runs of a sweep dir), how the sweep dir and its
jobs are named in a committed table (relative, never an absolute machine path), the failed-runs list
and the mean ± std format. The bottom layer of ``ihas_lightning.report``'s tables: it imports none of
them (the import contract in ``pyproject.toml``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def sweep_label(root: Path) -> str:
    """The sweep dir as a committed table names it: relative to the working dir it ran from when it lies
    under it, else by its name (never an absolute machine path)."""
    root = Path(root)
    try:
        rel = root.resolve().relative_to(Path.cwd().resolve())
        return str(rel) if str(rel) != "." else root.resolve().name
    except ValueError:
        return root.name


def _relative(text: str, root: Path) -> str:
    """``text`` with the sweep dir's absolute path replaced by its label (a job's error message)."""
    label = sweep_label(root)
    for form in {str(Path(root).resolve()), str(Path(root))}:
        if form not in (".", ""):
            text = text.replace(form, label)
    return text


def collect(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(finished runs, missing or failed runs) of every Hydra job dir under ``root``."""
    from omegaconf import OmegaConf

    ok: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for cfg_file in sorted(Path(root).glob("**/.hydra/config.yaml")):
        job = cfg_file.parent.parent
        name = str(job.relative_to(root)) if job != Path(root) else job.name
        try:
            cfg = OmegaConf.load(cfg_file)
            stage = str(OmegaConf.select(cfg, "stage.name", default=""))
            method = str(OmegaConf.select(cfg, "method.name", default="?"))
            display = str(OmegaConf.select(cfg, "method.display", default=None) or method)
            dataset = str(OmegaConf.select(cfg, "dataset.name", default="?"))
            seed = OmegaConf.select(cfg, "seed", default=None)
            backbone = str(
                OmegaConf.select(cfg, "model.backbone", default="mlp", throw_on_resolution_failure=False)
            )
            transfer = OmegaConf.select(cfg, "transfer.from", default=None, throw_on_resolution_failure=False)
        except Exception as e:  # noqa: BLE001 - an unreadable job config is a missing run
            missing.append({"job": name, "path": str(job), "reason": f"unreadable .hydra/config.yaml ({e})"})
            continue
        if stage != "all":
            continue  # e.g. the report's own run dir
        ov = job / ".hydra" / "overrides.yaml"
        overrides = [str(x) for x in OmegaConf.load(ov)] if ov.is_file() else []
        base = {"job": name, "path": str(job), "method": method, "display": display, "dataset": dataset, "seed": seed,
                "backbone": backbone, "transfer_from": None if transfer in (None, "") else str(transfer),
                "overrides": overrides}  # fmt: skip
        res = job / "evaluate" / "results.json"
        err = job / "error.txt"
        if err.is_file():  # written by a job that failed inside a multirun
            missing.append({**base, "reason": f"failed: {_relative(err.read_text().strip(), root)}"})
            continue
        if not res.is_file():
            missing.append(
                {**base, "reason": "no evaluate/results.json (the job failed or is still running)"}
            )
            continue
        r = json.loads(res.read_text())
        # what the run actually used (resolved; a job's saved config may hold interpolations)
        base["backbone"] = str(r.get("backbone") or backbone)
        base["transfer_from"] = r.get("transfer_from")
        final = next((x for x in r["rows"] if x["model"] == r.get("final_row")), None)
        if final is None:
            missing.append({**base, "reason": "results.json has no final row"})
            continue
        pipe = job / "pipeline.json"
        wall = json.loads(pipe.read_text()).get("total_seconds") if pipe.is_file() else None
        extra: dict[str, Any] = {
            # every row of the run (e.g. iHAS-1, the search row of an iHAS run, for Table 4)
            "rows": {x["model"]: {k: x.get(k) for k in ("test_auc", "test_logloss", "embedding_params",
                                                        "dense_params", "inference_ms", "inference_exact_ms")}
                     for x in r["rows"]},
            "case_study": r.get("case_study"),
            "has_case_study": (job / "evaluate" / "figure6_case_study.png").is_file(),
            "heterogeneity": r.get("heterogeneity"),
            "served_routing": r.get("served_routing"),
            "timing_rows": r.get("timing_rows"),
            "timing_rows_replaced": r.get("timing_rows_replaced"),
            "retrained_budget": r.get("retrained_budget"),
            "retrain_guard": r.get("retrain_guard"),
            "scores": str(job / "evaluate" / "test_scores.npz")
            if (job / "evaluate" / "test_scores.npz").is_file() else None,
        }  # fmt: skip
        sm = job / "search" / "metrics.json"
        if sm.is_file():
            extra["p_hist"] = (json.loads(sm.read_text()).get("gate") or {}).get("p_hist")
        ok.append({**base, **extra, "row": final["model"], "wall_seconds": wall,
                   **{k: final.get(k) for k in ("test_auc", "test_logloss", "val_auc", "val_logloss", "params",
                                                 "embedding_params", "dense_params", "inference_ms",
                                                 "inference_exact_ms")}})  # fmt: skip
    return ok, missing


def _pm(c: dict[str, Any], d: int = 4) -> str:
    if c["mean"] is None:
        return "-"
    return f"{c['mean']:.{d}f}" + (f" ± {c['std']:.{d}f}" if c.get("std") is not None else "")


def missing_lines(missing: list[dict[str, Any]]) -> list[str]:
    """The '## Missing or failed runs' section: each failed or missing job once, by its dir in the sweep."""
    if not missing:
        return []
    seen: set[str] = set()
    lines = ["", "## Missing or failed runs", ""]
    for m in missing:
        if m["job"] in seen:
            continue
        seen.add(m["job"])
        lines.append(f"* `{m['job']}` ({m.get('method', '?')}, seed {m.get('seed', '?')}): {m['reason']}")
    return lines
