"""``experiment=sparse_search`` against the defaults, seed by seed (issue 28, planted-field recovery).

Reads run dirs made with ``experiment=sparse_search`` (``stage=search`` then ``stage=cluster``, or
``stage=all``) and the committed ``acceptance_real.json`` (the defaults, same data, same seeds, the same
gates-open pretraining: Base). Writes ``<out>.json`` and ``<out>.md``::

    python -m experiments.bench.sparse_search_report --out experiments/results/sparse_search \\
        --run synthetic=/path/to/runs/synthetic --run criteo-ctr3=/path/to/runs/criteo-ctr3 ...

Each ``--run NAME=DIR``: NAME is a setting of ``acceptance_real.json``; DIR holds ``s<seed>/`` run dirs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ihas_lightning.stats import mean_ci, verdict


def _load(p: Path) -> dict[str, Any] | None:
    return json.loads(p.read_text()) if p.exists() else None


def _run(d: Path) -> dict[str, Any]:
    """One sparse_search run dir: the search model, the clusters' recovery, the final iHAS if evaluated."""
    s = _load(d / "search" / "metrics.json") or {}
    c = _load(d / "cluster" / "cluster.json") or {}
    e = _load(d / "evaluate" / "results.json") or {}
    rows = {r["model"]: r for r in e.get("rows", [])}
    rec = c.get("recovery") or {}
    sel = s.get("sparsest_selection") or {}
    return {
        "seed": int(d.name[1:]),
        "ihas1_test_auc": s.get("test/auc"),
        "ihas1_test_logloss": s.get("test/logloss"),
        "open_share": s.get("open_share"),
        "fallback": bool(sel.get("fallback")) if "fallback" in sel else s.get("open_share") == 1.0,
        "search_epochs": (s.get("epochs_run") or 0) - (s.get("pretrain_epochs") or 0),
        "search_fit_seconds": s.get("fit_seconds"),
        "min_f1": rec.get("min_f1"),
        "mean_f1": (sum(x["f1"] for x in rec["per_cluster"]) / len(rec["per_cluster"])) if rec else None,
        "field_dims": c.get("field_dims"),
        "ihas_test_auc": (rows.get("iHAS") or {}).get("test_auc"),
        "ihas_test_logloss": (rows.get("iHAS") or {}).get("test_logloss"),
    }


def _default(setting: dict[str, Any], seed: int) -> dict[str, Any] | None:
    for r in setting["runs"]:
        if int(r["seed"]) == seed:
            rows = r["rows"]
            rec = r.get("recovery") or {}
            return {
                "base_test_auc": rows["Base"]["test_auc"],
                "base_test_logloss": rows["Base"]["test_logloss"],
                "constant_test_logloss": rows["Constant"]["test_logloss"],
                "ihas1_test_auc": rows["iHAS-1"]["test_auc"],
                "ihas_test_auc": rows["iHAS"]["test_auc"],
                "open_share": r["search"]["open_share"],
                "min_f1": rec.get("min_f1"),
            }
    return None


def _ci(vals: list[float]) -> dict[str, Any] | None:
    # float noise (a fallback's model is Base's weights, scored twice) is no difference
    vals = [0.0 if abs(v) < 1e-7 else v for v in vals if v is not None and math.isfinite(v)]
    return mean_ci(vals) if len(vals) >= 2 else None


def _fmt(ci: dict[str, Any] | None, sign: bool = True) -> str:
    if ci is None:
        return "-"
    f = "{:+.4f}" if sign else "{:.3f}"
    lo, hi = ci["ci"]
    return f"{f.format(ci['mean'])} [{f.format(lo)}, {f.format(hi)}]"


def summarise(runs: dict[str, Path], acceptance: dict[str, Any]) -> dict[str, Any]:
    settings = {s["name"]: s for s in acceptance["settings"]}
    out: dict[str, Any] = {}
    for name, root in runs.items():
        per = []
        for d in sorted(root.glob("s*"), key=lambda p: int(p.name[1:])):
            if not (d / "search" / "metrics.json").exists():
                continue
            r = _run(d)
            r["default"] = _default(settings[name], r["seed"]) if name in settings else None
            per.append(r)
        paired = [r for r in per if r["default"]]
        s1 = [r["ihas1_test_auc"] - r["default"]["base_test_auc"] for r in paired]
        s1d = [r["ihas1_test_auc"] - r["default"]["ihas1_test_auc"] for r in paired]
        fin = [
            r["ihas_test_auc"] - r["default"]["base_test_auc"]
            for r in paired
            if r["ihas_test_auc"] is not None
        ]
        at_const = sum(r["ihas1_test_logloss"] >= r["default"]["constant_test_logloss"] for r in paired)
        out[name] = {
            "seeds": [r["seed"] for r in per],
            "runs": per,
            "ihas1_minus_base_auc": _ci(s1),
            "ihas1_minus_default_ihas1_auc": _ci(s1d),
            "ihas_minus_base_auc": _ci(fin),
            "min_f1": _ci([r["min_f1"] for r in per]),
            "default_min_f1": _ci([r["default"]["min_f1"] for r in paired]),
            "fallbacks": sum(r["fallback"] for r in per),
            "ihas1_at_or_above_constant": at_const,
            "min_f1_at_least_0.9": sum((r["min_f1"] or 0) >= 0.9 for r in per),
        }
    return out


def markdown(res: dict[str, Any]) -> str:
    head = (
        "| data | seeds | fallbacks | open share (mean) | cluster field F1, min per run: sparse_search | "
        "defaults | runs with F1 >= 0.9 | iHAS-1 - Base test AUC | verdict | iHAS-1 - default iHAS-1 | "
        "iHAS - Base (stage=all runs) | iHAS-1 at/above constant logloss |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, r in res.items():
        opens = [x["open_share"] for x in r["runs"] if x["open_share"] is not None]
        d = r["ihas1_minus_base_auc"]
        lines.append(
            f"| {name} | {', '.join(map(str, r['seeds']))} | {r['fallbacks']}/{len(r['runs'])} | "
            f"{sum(opens) / len(opens):.3f} | {_fmt(r['min_f1'], False)} | {_fmt(r['default_min_f1'], False)} | "
            f"{r['min_f1_at_least_0.9']}/{len(r['runs'])} | {_fmt(d)} | {verdict(d) if d else '-'} | "
            f"{_fmt(r['ihas1_minus_default_ihas1_auc'])} | {_fmt(r['ihas_minus_base_auc'])} | "
            f"{r['ihas1_at_or_above_constant']} |"
        )
    per = [
        "\n## Per seed\n",
        "| data | seed | F1 min (defaults) | open share | search epochs | iHAS-1 test AUC (Base) | iHAS test AUC | field dims per cluster |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        for x in r["runs"]:
            dflt = x["default"] or {}
            f1 = "-" if x["min_f1"] is None else f"{x['min_f1']:.3f}"
            f1d = "-" if dflt.get("min_f1") is None else f"{dflt['min_f1']:.3f}"
            ih = "-" if x["ihas_test_auc"] is None else f"{x['ihas_test_auc']:.4f}"
            base = "-" if not dflt else f"{dflt['base_test_auc']:.4f}"
            dims = " / ".join(",".join(map(str, c)) for c in (x["field_dims"] or []))
            per.append(
                f"| {name} | {x['seed']} | {f1} ({f1d}) | {x['open_share']:.3f} | {x['search_epochs']} | "
                f"{x['ihas1_test_auc']:.4f} ({base}) | {ih} | {dims} |"
            )
    return head + "\n".join(lines) + "\n" + "\n".join(per) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=DIR (DIR holds s<seed>/ run dirs)")
    ap.add_argument("--acceptance", default="experiments/results/acceptance_real.json")
    ap.add_argument("--out", default="experiments/results/sparse_search")
    ap.add_argument("--note", default="", help="a paragraph written above the table")
    a = ap.parse_args(argv)
    runs = {}
    for spec in a.run:
        name, _, d = spec.partition("=")
        if not d or not Path(d).is_dir():
            raise SystemExit(f"error: --run {spec!r}: expected NAME=DIR with an existing DIR")
        runs[name] = Path(d)
    res = summarise(runs, json.loads(Path(a.acceptance).read_text()))
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = "# `experiment=sparse_search` against the defaults (issue 28)\n\n" + (
        a.note + "\n\n" if a.note else ""
    )
    out.with_suffix(".md").write_text(md + markdown(res))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
