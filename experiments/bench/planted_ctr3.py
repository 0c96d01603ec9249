"""Planted recovery at a 3% base rate: is it the data or the search? (issue 28)

Reads finished ``stage=all`` run dirs of the planted synthetic data and writes one row per run: how many
train positives the bed has, how close the gates-open model (Base) comes to the Bayes-optimal AUC on
validation, what the search selected and when it stopped (``search.stop_when``), and the planted-field
F1 at the search (the gate's per-group masks) and at the clusters (the retrained architectures)::

    python -m experiments.bench.planted_ctr3 --out experiments/results/planted_ctr3 \\
        --run "200k rows, defaults=/runs/synthetic-ctr3/s0" --run "1.6M rows, sparse_search=/runs/big/s0"

Each ``--run LABEL=DIR``: LABEL names the bed and setting; DIR is one run dir (its ``config.yaml`` names
the prepared data, whose ``truth.json`` holds the planted answer and the Bayes AUC).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .runs import _read_json as _load


def _truth(run_dir: Path) -> dict[str, Any]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return _load(Path(str(cfg.dataset.prepared_dir)) / "truth.json")


def _overrides(run_dir: Path) -> str:
    p = run_dir / ".hydra" / "overrides.yaml"
    if not p.is_file():
        return ""
    keep = ("experiment=", "search.", "method.", "dataset.rows=")
    return " ".join(o for o in OmegaConf.load(p) if str(o).startswith(keep))


def run_record(label: str, run_dir: Path) -> dict[str, Any]:
    """One run: the bed, the reference against Bayes, the selection and stop, the F1 at both levels."""
    s = _load(run_dir / "search" / "metrics.json")
    e = _load(run_dir / "evaluate" / "results.json")
    truth = _truth(run_dir)
    sel = s.get("sparsest_selection") or {}
    ref = sel.get("reference") or {}
    rows = {r["model"]: r for r in e.get("rows", [])}
    groups = (s.get("recovery") or {}).get("groups") or {}
    split = (truth.get("params") or {}).get("split") or [0.8]
    n = int((truth.get("params") or {}).get("rows") or 0)
    cands = sel.get("candidates") or []
    return {
        "label": label,
        "overrides": _overrides(run_dir),
        "rows": n,
        "train_positives": round(n * float(split[0]) * float(truth.get("pos_rate") or 0.0)),
        "bayes_val_auc": truth.get("bayes_val_auc"),
        "base_val_auc": ref.get("val_auc"),
        "stop_when": sel.get("stop_when", "no_new_choice"),
        "search_epochs": len(cands),
        "chosen_epoch": sel.get("chosen_epoch"),
        "fallback": sel.get("fallback") is not None,
        "open_share": s.get("open_share"),
        "search_group_f1": {g: v.get("f1") for g, v in groups.items()},
        "cluster_min_f1": (e.get("recovery") or {}).get("min_f1"),
        "field_dims": _load(run_dir / "cluster" / "cluster.json").get("field_dims"),
        "test_auc": {m: rows[m]["test_auc"] for m in ("Base", "iHAS-1", "iHAS") if m in rows},
        "guard_fallbacks": (e.get("retrain_guard") or {}).get("fallbacks"),
        "wall_s": _load(run_dir / "pipeline.json").get("total_seconds"),
    }


def _f(v: Any, d: int = 4) -> str:
    return "-" if v is None else f"{v:.{d}f}" if isinstance(v, float) else str(v)


def markdown(recs: list[dict[str, Any]], note: str = "") -> str:
    head = (
        "| run | train positives | Bayes val AUC | Base val AUC | stop_when | search epochs | chosen | "
        "open share | F1 per group (search) | worst cluster F1 | test AUC Base / iHAS-1 / iHAS | "
        "dims per field per cluster | clusters on Base (retrain guard) | wall s |"
    )
    lines = [
        "# Planted recovery at a 3% base rate (`python -m experiments.bench.planted_ctr3`)",
        "",
        "One row per `stage=all` run of the planted synthetic data. *Base val AUC* is the gates-open pretrained "
        "model, the no-harm selection's reference; *Bayes* is the true click probability's AUC on the same rows. "
        "*F1 per group (search)*: the search's mean gate mask per latent group against the group's planted "
        "fields, a field counting when its mean mask over its 16 dims is at least 0.5 (so it reads 0 when "
        "the gate keeps one or two dims per field); *worst cluster F1*: the retrained architectures, the "
        "issue's measure (a field counts with one kept dim). *chosen* is the selected search epoch (gates "
        "open: none was admissible). *wall s*: the whole `stage=all` run, 1 torch thread, two runs side by side.",
        *(["", note] if note else []),
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in recs:
        f1 = " / ".join(_f(v, 3) for v in r["search_group_f1"].values()) or "-"
        auc = " / ".join(_f(r["test_auc"].get(m)) for m in ("Base", "iHAS-1", "iHAS"))
        dims = " / ".join(",".join(str(x) for x in d) for d in (r["field_dims"] or []))
        chosen = "gates open" if r["fallback"] else _f(r["chosen_epoch"])
        lines.append(
            f"| {r['label']} | {r['train_positives']:,} | {_f(r['bayes_val_auc'])} | {_f(r['base_val_auc'])} | "
            f"{r['stop_when']} | {r['search_epochs']} | {chosen} | {_f(r['open_share'], 3)} | {f1} | "
            f"{_f(r['cluster_min_f1'], 3)} | {auc} | {dims} | {_f(r['guard_fallbacks'])} | {_f(r['wall_s'], 0)} |"
        )
    lines += ["", "Overrides of each run:", ""]
    lines += [f"* {r['label']}: `{r['overrides']}`" for r in recs]
    return "\n".join(lines) + "\n"


def parse_runs(specs: list[str], needs: str, what: str) -> list[tuple[str, Path]]:
    """``--run LABEL=DIR`` values as (label, dir); one-line SystemExit where DIR lacks the file ``needs``."""
    out = []
    for spec in specs:
        label, _, d = spec.partition("=")
        if not d or not (Path(d) / needs).is_file():
            raise SystemExit(f"error: --run {spec!r}: not {what}")
        out.append((label, Path(d)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output path without suffix (.json and .md)")
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=DIR")
    ap.add_argument("--note", default="", help="a paragraph for the report's head (provenance)")
    args = ap.parse_args(argv)
    recs = [
        run_record(label, d)
        for label, d in parse_runs(args.run, "search/metrics.json", "LABEL=DIR of a finished run dir")
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(recs, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(recs, args.note))
    print(args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
