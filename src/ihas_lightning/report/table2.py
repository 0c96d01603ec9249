"""The paper's Table 2 (every method's test AUC / logloss, params) and Figure 4 (inference time), read
from the run dirs of a multirun (no W&B needed).

:func:`collect` walks a directory for Hydra job dirs (``<job>/.hydra/config.yaml``) and reads each
``stage=all`` job's ``evaluate/results.json`` (the method's final row) and ``pipeline.json`` (wall
time). A job without results is listed by name with its overrides, never dropped silently.
:func:`write_report` then writes, per dataset, ``table2_<dataset>.{md,csv}`` and
``figure4_<dataset>.png`` plus ``report.json``: per method the test AUC and logloss (mean ± std over
seeds), the paired difference from iHAS with a 95% t-interval (win / lose / tie: the interval
excludes 0 or not), params (embedding values and dense), inference ms on the whole test split, and the
pipeline's wall time.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..stats import mean_ci, verdict

# the paper's Table 2 order; anything else follows
ORDER = ["base", "ihas", "pep", "autofield", "optembed", "adafs_soft", "adafs_hard", "optfs"]
REFERENCE = "ihas"


def collect(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(finished runs, missing or failed runs) of every Hydra job dir under ``root``."""
    from omegaconf import OmegaConf

    ok: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for cfg_file in sorted(Path(root).glob("**/.hydra/config.yaml")):
        job = cfg_file.parent.parent
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
            missing.append({"job": str(job), "reason": f"unreadable .hydra/config.yaml ({e})"})
            continue
        if stage != "all":
            continue  # e.g. the report's own run dir
        ov = job / ".hydra" / "overrides.yaml"
        overrides = [str(x) for x in OmegaConf.load(ov)] if ov.is_file() else []
        base = {"job": str(job), "method": method, "display": display, "dataset": dataset, "seed": seed,
                "backbone": backbone, "transfer_from": None if transfer in (None, "") else str(transfer),
                "overrides": overrides}  # fmt: skip
        res = job / "evaluate" / "results.json"
        err = job / "error.txt"
        if err.is_file():  # written by a job that failed inside a multirun
            missing.append({**base, "reason": f"failed: {err.read_text().strip()}"})
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
                                                        "dense_params", "inference_ms")} for x in r["rows"]},
            "case_study": r.get("case_study"),
            "has_case_study": (job / "evaluate" / "figure6_case_study.png").is_file(),
        }  # fmt: skip
        sm = job / "search" / "metrics.json"
        if sm.is_file():
            extra["p_hist"] = (json.loads(sm.read_text()).get("gate") or {}).get("p_hist")
        ok.append({**base, **extra, "row": final["model"], "wall_seconds": wall,
                   **{k: final.get(k) for k in ("test_auc", "test_logloss", "val_auc", "val_logloss", "params",
                                                 "embedding_params", "dense_params", "inference_ms")}})  # fmt: skip
    return ok, missing


def _order(method: str) -> tuple[int, str]:
    return (ORDER.index(method) if method in ORDER else len(ORDER), method)


def summarize(runs: list[dict[str, Any]], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """One record per method (of one dataset): means, stds, paired differences from ``reference``."""
    # one row per method *variant*: runs of one method with another display name (e.g. PEP at iHAS's
    # size, `method.display="PEP (iHAS size)"`) get their own row
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["method"], r["display"]), []).append(r)
    ref = {r["seed"]: r for (m, _), rs in by.items() if m == reference for r in rs}
    out = []
    for key in sorted(by, key=lambda k: (*_order(k[0]), k[1])):
        rs = by[key]
        method = key[0]
        rec: dict[str, Any] = {"method": method, "display": rs[0]["display"], "row": rs[0]["row"],
                               "seeds": sorted(r["seed"] for r in rs)}  # fmt: skip
        for k in (
            "test_auc",
            "test_logloss",
            "embedding_params",
            "dense_params",
            "inference_ms",
            "wall_seconds",
        ):
            rec[k] = mean_ci([float(r[k]) for r in rs if r.get(k) is not None])
        if method != reference and ref:
            common = sorted(set(ref) & {r["seed"] for r in rs})
            mine = {r["seed"]: r for r in rs}
            for k, better in (("test_auc", True), ("test_logloss", False)):
                d = mean_ci([mine[s][k] - ref[s][k] for s in common])
                rec[f"{k}_minus_{reference}"] = {**d, "verdict": verdict(d, better), "seeds": common}
        out.append(rec)
    return out


def _pm(c: dict[str, Any], d: int = 4) -> str:
    if c["mean"] is None:
        return "-"
    return f"{c['mean']:.{d}f}" + (f" ± {c['std']:.{d}f}" if c.get("std") is not None else "")


def _diff(c: dict[str, Any] | None) -> str:
    if not c or c["mean"] is None:
        return "-"
    if c["ci"][0] is None:
        return f"{c['mean']:+.4f} (n=1)"
    return f"{c['mean']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] {c['verdict']}"


COLUMNS = ["method", "seeds", "test AUC", "AUC - iHAS [95% CI]", "test logloss", "logloss - iHAS [95% CI]",
           "embedding params", "dense params", "inference ms", "wall s"]  # fmt: skip


def rows(summary: list[dict[str, Any]], reference: str = REFERENCE) -> list[list[Any]]:
    out = []
    for r in summary:
        out.append([r["display"], len(r["seeds"]), _pm(r["test_auc"]), _diff(r.get(f"test_auc_minus_{reference}")),
                    _pm(r["test_logloss"]), _diff(r.get(f"test_logloss_minus_{reference}")),
                    f"{r['embedding_params']['mean']:,.0f}" if r["embedding_params"]["mean"] is not None else "-",
                    f"{r['dense_params']['mean']:,.0f}" if r["dense_params"]["mean"] is not None else "-",
                    _pm(r["inference_ms"], 2), f"{r['wall_seconds']['mean']:.1f}" if r["wall_seconds"]["mean"] else "-"])  # fmt: skip
    return out


def markdown(dataset: str, summary: list[dict[str, Any]], missing: list[dict[str, Any]], root: Path) -> str:
    lines = [f"# Table 2: {dataset}", "",
             f"From the run dirs under `{root}`. Test AUC / logloss: mean ± std over seeds; the difference from "
             "iHAS is paired by seed with a 95% t-interval (win / lose: the interval excludes 0, else tie; "
             "positive AUC and negative logloss differences favour the method over iHAS). Params: the model "
             "used at inference, embedding values and dense parts. Inference: whole test split, ms. Wall: the "
             "whole stage=all pipeline, s.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows(summary)]
    if missing:
        lines += ["", "## Missing or failed runs", ""]
        lines += [f"* `{m['job']}` ({m.get('method', '?')}, seed {m.get('seed', '?')}): {m['reason']}"
                  for m in missing]  # fmt: skip
    return "\n".join(lines) + "\n"


def figure4(dataset: str, summary: list[dict[str, Any]], path: Path) -> Path:
    """Inference time per method on the whole test split, mean with std error bars (paper Figure 4)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = [r["display"] for r in summary]
    means = [r["inference_ms"]["mean"] or 0.0 for r in summary]
    errs = [r["inference_ms"]["std"] or 0.0 for r in summary]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names)), 3.5), dpi=100)
    colors = ["#C44E52" if r["method"] == REFERENCE else "#4C72B0" for r in summary]
    ax.bar(range(len(names)), means, yerr=errs, color=colors, capsize=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("inference, whole test split (ms)")
    ax.set_title(f"Figure 4: inference time ({dataset})", fontsize=9)
    fig.tight_layout()
    from .figures import save_png

    return save_png(fig, path)


def write_table2(ds: str, runs: list[dict[str, Any]], missing: list[dict[str, Any]], root: Path, out: Path,
                 logger: Any = None) -> dict[str, Any]:  # fmt: skip
    """Table 2 and Figure 4 of one dataset's runs into ``out``."""
    summary = summarize(runs)
    (out / f"table2_{ds}.md").write_text(markdown(ds, summary, missing, root))
    with open(out / f"table2_{ds}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows(summary))
    fig = figure4(ds, summary, out / f"figure4_{ds}.png") if summary else None
    if logger is not None:
        from ..loggers import log_image, log_table

        log_table(logger, f"table2/{ds}", COLUMNS, rows(summary))
        if fig is not None:
            log_image(logger, f"figure4/{ds}", fig)
    return {"summary": summary, "runs": runs, "files": [f"table2_{ds}.md"]}


def write_report(root: Path, out: Path | None = None, logger: Any = None) -> dict[str, Any]:
    """Collect the runs under ``root`` and write Table 2 / Figure 4 (``out`` default root/report)."""
    from .build import write_reports

    return write_reports(root, out, logger=logger, kind="table2")
