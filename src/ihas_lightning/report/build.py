"""``stage=report`` and the multirun callback: which of the paper's tables a sweep dir holds, written
per dataset into ``<dir>/report`` (plus ``report.json``).

``report.table``: ``auto`` (default) picks from the runs found -- Table 3 when a run has another
backbone than the MLP or transfers a selector, Table 4 when a run is an ablation (iHAS-2..4), else
Table 2 -- or one of ``table2`` | ``table3`` | ``table4``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .ablation import T3_COLUMNS, T4_COLUMNS, write_table3, write_table4
from .common import collect, sweep_label
from .table2 import write_table2

KINDS = ("auto", "table2", "table3", "table4")
ABLATIONS = ("ihas_2", "ihas_3", "ihas_4")


def kinds_of(runs: list[dict[str, Any]], requested: str = "auto") -> list[str]:
    if requested != "auto":
        return [requested]
    kinds = []
    if any(r.get("backbone", "mlp") != "mlp" or r.get("transfer_from") for r in runs):
        kinds.append("table3")
    if any(r["method"] in ABLATIONS for r in runs):
        kinds.append("table4")
    return kinds or ["table2"]


def write_reports(
    root: Path, out: Path | None = None, logger: Any = None, kind: str = "auto"
) -> dict[str, Any]:
    """Collect the runs under ``root`` and write the tables and figures (``out`` default root/report)."""
    from ..utils import write_json

    if kind not in KINDS:
        raise ValueError(f"report.table must be one of {list(KINDS)} (got {kind!r})")
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    ok, missing = collect(root)
    datasets = sorted({r["dataset"] for r in ok} | {m["dataset"] for m in missing if "dataset" in m})
    # named relative to where it ran (or by its name): the report is committed, a machine path is not
    report: dict[str, Any] = {"root": sweep_label(root), "datasets": {}, "missing": missing, "files": []}
    for ds in datasets:
        runs = [r for r in ok if r["dataset"] == ds]
        miss = [m for m in missing if m.get("dataset") == ds]
        entry: dict[str, Any] = {"runs": runs, "kinds": kinds_of(runs, kind)}
        for k in entry["kinds"]:
            if k == "table2":
                res = write_table2(ds, runs, miss, root, out, logger)
                entry["summary"] = res["summary"]
            elif k == "table3":
                res = write_table3(ds, runs, miss, root, out)
                entry["table3"] = res["table3"]
            else:
                res = write_table4(ds, runs, miss, root, out)
                entry["table4"] = res["table4"]
                entry["figures"] = res["figures"]
            report["files"] += res["files"]
            if logger is not None and k != "table2":
                _log(logger, k, ds, res, out)
        report["datasets"][ds] = entry
    write_json(out / "report.json", _portable(report))
    return report


def _portable(obj: Any, key: str = "") -> Any:
    """``obj`` without the jobs' absolute paths (``path``, ``scores``), and an override's absolute path
    shown relative to the working dir, else as ``.../<its name>``: what report.json holds."""
    if isinstance(obj, dict):
        return {k: _portable(v, k) for k, v in obj.items() if k not in ("path", "scores")}
    if isinstance(obj, list):
        return [_portable(v, key) for v in obj]
    if key == "overrides" and isinstance(obj, str) and "=" in obj:
        name, value = obj.split("=", 1)
        return f"{name}={portable_path(value)}"
    if isinstance(obj, str) and "/" in obj:  # a message naming a file (e.g. a skipped guard's Base)
        return _ABS_PATH.sub(lambda m: portable_path(m.group(0)), obj)
    return obj


#: an absolute path inside a message (not the "/s" of "rows/s": a slash after a word character)
_ABS_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)*[\w.+-]+")


def portable_path(value: str) -> str:
    """An absolute path as a committed file may name it: relative to the working dir when under it,
    else ``.../<last component>``; anything else unchanged."""
    if not value.startswith("/"):
        return value
    try:
        return str(Path(value).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return f".../{Path(value).name}"


def _log(logger: Any, kind: str, ds: str, res: dict[str, Any], out: Path) -> None:
    from ..loggers import log_image, log_table

    log_table(logger, f"{kind}/{ds}", T3_COLUMNS if kind == "table3" else T4_COLUMNS, res["rows"])
    het = (res.get("table4") or {}).get("heterogeneity", {}).get("per_seed") or []
    if het:
        rows = [[r["seed"], *[(r.get("test") or {}).get(k) for k in ("statistic", "null_mean", "p_value",
                                                                     "soft_p_value")],
                 *[(r.get("ihas_minus_ihas2") or {}).get("diff")],
                 *((r.get("ihas_minus_ihas2") or {}).get("ci") or [None, None])] for r in het]  # fmt: skip
        log_table(logger, f"{kind}/{ds}/heterogeneity", ["seed", "heterogeneity", "null mean", "p", "masks p",
                                                         "iHAS - iHAS-2 AUC", "ci low", "ci high"], rows)  # fmt: skip
    for name in res["files"]:
        if name.endswith(".png"):
            log_image(logger, f"{name[:-4].replace('_', '/', 1)}", out / name)
