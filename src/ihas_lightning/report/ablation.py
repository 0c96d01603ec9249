"""The paper's Table 3 (transfer of frozen selectors to other backbones, RQ2), Table 4 (ablations
iHAS-1..4, RQ3) and Figures 3, 5 and 6, from the run dirs of a multirun (see :func:`.table2.collect`).

Every comparison is paired by seed: the difference A - B per seed, its mean and 95% t-interval, and a
verdict (A better / B better / tie: the interval excludes 0 or not; higher AUC and lower logloss are
better). Each table's markdown ends with the paper's claims, each with its interval.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from ..stats import mean_ci
from .common import _pm, missing_lines, sweep_label
from .tables import _md

# ---- paired comparisons --------------------------------------------------------------------------------
Series = dict[Any, dict[str, Any]]  # seed -> {"test_auc", "test_logloss", ...}


def paired(a: Series, b: Series) -> dict[str, Any]:
    """A - B over the seeds both have, for AUC and logloss, with verdicts from A's side."""
    common = sorted(set(a) & set(b), key=str)
    out: dict[str, Any] = {"seeds": common}
    for key, higher in (("test_auc", True), ("test_logloss", False)):
        vals = [
            a[s][key] - b[s][key] for s in common if a[s].get(key) is not None and b[s].get(key) is not None
        ]
        c = mean_ci(vals)
        lo, hi = c["ci"]
        if lo is None:
            v = "n/a"
        elif lo > 0:
            v = "better" if higher else "worse"
        elif hi < 0:
            v = "worse" if higher else "better"
        else:
            v = "tie"
        out[key] = {**c, "verdict": v}
    return out


def _ci(c: dict[str, Any]) -> str:
    if not c or c.get("mean") is None:
        return "-"
    if c["ci"][0] is None:
        return f"{c['mean']:+.4f} (n=1)"
    return f"{c['mean']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] {c['verdict']}"


def claim_line(label: str, cmp: dict[str, Any], a: str, b: str) -> str:
    """``label: A - B  AUC ...; logloss ...`` with the verdict from A's side."""
    return (f"* {label}: {a} - {b} over {len(cmp['seeds'])} seeds: AUC {_ci(cmp['test_auc'])}; "
            f"logloss {_ci(cmp['test_logloss'])}")  # fmt: skip


def _series(runs: list[dict[str, Any]], row: str | None = None) -> Series:
    """seed -> metrics of the final row (or of ``row``) of each run."""
    out: Series = {}
    for r in runs:
        src = r if row is None else (r.get("rows") or {}).get(row)
        if src is not None and src.get("test_auc") is not None:
            out[r["seed"]] = src
    return out


def _stats(series: Series) -> dict[str, Any]:
    return {k: mean_ci([float(v[k]) for v in series.values() if v.get(k) is not None])
            for k in ("test_auc", "test_logloss", "embedding_params", "dense_params", "inference_ms",
                      "inference_exact_ms")}  # fmt: skip


def _write(out: Path, stem: str, md: str, columns: list[str], rows: list[list[Any]]) -> None:
    (out / f"{stem}.md").write_text(md)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)


def _exact(r: dict[str, Any]) -> str:
    c = r.get("inference_exact_ms") or {}
    return _pm(c, 2) if c.get("mean") is not None else "-"


TIMING = ("Inference: ms on a fixed number of test rows (`evaluate.timing_rows`, drawn with replacement when the "
          "test split is smaller), each model on the path it is served with (routed iHAS: the routing "
          "`routing=auto` serves); the exact routing's time in its own column.")  # fmt: skip


def _params(c: dict[str, Any]) -> str:
    return f"{c['mean']:,.0f}" if c.get("mean") is not None else "-"


# ---- Table 3: transfer ---------------------------------------------------------------------------------
BACKBONE_ORDER = ["mlp", "fm", "wide_deep", "deepfm", "dcn"]
T3_ROWS = [("base", "original"), ("adafs_soft", "AdaFS-soft"), ("ihas", "iHAS")]
T3_COLUMNS = ["backbone", "model", "seeds", "test AUC", "AUC - original [95% CI]", "test logloss",
              "logloss - original [95% CI]", "embedding params", "dense params", "inference ms (served)",
              "exact routing ms"]  # fmt: skip


def table3(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backbone: original (Base), AdaFS-soft and iHAS (transferred), paired against original."""
    backbones = sorted({r["backbone"] for r in runs},
                       key=lambda b: (BACKBONE_ORDER.index(b) if b in BACKBONE_ORDER else 99, b))  # fmt: skip
    out: dict[str, Any] = {}
    for b in backbones:
        mine = [r for r in runs if r["backbone"] == b]
        series = {m: _series([r for r in mine if r["method"] == m]) for m, _ in T3_ROWS}
        if not any(series.values()):
            continue
        rec: dict[str, Any] = {}
        for m, label in T3_ROWS:
            rec[m] = {"label": label, "seeds": sorted(series[m], key=str), **_stats(series[m])}
            if m != "base" and series["base"] and series[m]:
                rec[m]["minus_original"] = paired(series[m], series["base"])
        if series["ihas"] and series["adafs_soft"]:
            rec["ihas_minus_adafs_soft"] = paired(series["ihas"], series["adafs_soft"])
        out[b] = rec
    return out


def table3_markdown(
    dataset: str, t3: dict[str, Any], root: Path, missing: list[dict[str, Any]]
) -> tuple[str, list]:
    rows = []
    for b, rec in t3.items():
        for m, label in T3_ROWS:
            r = rec[m]
            d = r.get("minus_original") or {}
            rows.append([b, label, len(r["seeds"]), _pm(r["test_auc"]), _ci(d.get("test_auc")),
                         _pm(r["test_logloss"]), _ci(d.get("test_logloss")), _params(r["embedding_params"]),
                         _params(r["dense_params"]), _pm(r["inference_ms"], 2), _exact(r)])  # fmt: skip
    lines = [f"# Table 3: transfer of the frozen selectors to other backbones ({dataset})", "",
             f"From the run dirs of the sweep `{sweep_label(root)}`. original = the backbone without selection (Base); AdaFS-soft "
             "and iHAS reuse the frozen controller / Bernoulli gates of an MLP search (`transfer.from`). Test "
             "AUC / logloss: mean ± std over seeds; differences from original are paired by seed, 95% "
             f"t-interval (better / worse / tie: the interval excludes 0 or not). {TIMING}", ""]  # fmt: skip
    lines += _md(T3_COLUMNS, rows).splitlines()
    lines += ["", "## The paper's claims (RQ2)", ""]
    for b, rec in t3.items():
        if rec["ihas"].get("minus_original"):
            lines.append(
                claim_line(f"(i) {b} gains from iHAS", rec["ihas"]["minus_original"], "iHAS", "original")
            )
        if rec.get("ihas_minus_adafs_soft"):
            lines.append(claim_line(f"(ii) {b}: iHAS transfers better than AdaFS-soft",
                                    rec["ihas_minus_adafs_soft"], "iHAS", "AdaFS-soft"))  # fmt: skip
    lines += missing_lines(missing)
    return "\n".join(lines) + "\n", rows


# ---- Table 4: ablations ---------------------------------------------------------------------------------
# (label, method, row of that method's run; None = its final row)
T4_ROWS = [("Base", "base", None), ("iHAS-1", "ihas", "iHAS-1"), ("iHAS-2", "ihas_2", None),
           ("iHAS-3", "ihas_3", None), ("iHAS-4", "ihas_4", None), ("iHAS", "ihas", None)]  # fmt: skip
T4_COLUMNS = ["model", "what it is", "seeds", "test AUC", "AUC - iHAS [95% CI]", "test logloss",
              "logloss - iHAS [95% CI]", "embedding params", "dense params", "inference ms (served)",
              "exact routing ms"]  # fmt: skip
T4_WHAT = {
    "Base": "all fields, uniform dims",
    "iHAS-1": "search model, deterministic masks",
    "iHAS-2": "search + one model on all samples",
    "iHAS-3": "no polarization term",
    "iHAS-4": "one probability vector for all samples",
    "iHAS": "search, cluster, retrain, routing",
}


def table4(runs: list[dict[str, Any]]) -> dict[str, Any]:
    mlp = [r for r in runs if r["backbone"] == "mlp" and not r.get("transfer_from")]
    series = {label: _series([r for r in mlp if r["method"] == m], row) for label, m, row in T4_ROWS}
    rows: dict[str, Any] = {}
    for label, _m, _r in T4_ROWS:
        rows[label] = {"seeds": sorted(series[label], key=str), **_stats(series[label])}
        if label != "iHAS" and series[label] and series["iHAS"]:
            rows[label]["minus_ihas"] = paired(series[label], series["iHAS"])
    claims: dict[str, Any] = {}
    for key, a, b in (("i_vs_base", "iHAS", "Base"), ("ii_ihas_vs_ihas1", "iHAS", "iHAS-1"),
                      ("ii_ihas1_vs_ihas2", "iHAS-1", "iHAS-2"), ("iii_polarization", "iHAS", "iHAS-3"),
                      ("iv_instance_wise", "iHAS", "iHAS-4")):  # fmt: skip
        if series[a] and series[b]:
            claims[key] = {"a": a, "b": b, **paired(series[a], series[b])}
    own = own_cluster([r for r in mlp if r["method"] == "ihas"])
    if own is not None:
        claims["v_own_cluster"] = own
    return {"rows": rows, "claims": claims, "heterogeneity": heterogeneity(mlp)}


def delong_pair(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Test AUC of run ``a``'s final model - run ``b``'s on the same test rows, with DeLong's 95% interval
    (:func:`~ihas_lightning.stats.paired_auc_difference`), from each run's ``evaluate/test_scores.npz``;
    None when a run has no scores, or the two were scored on different rows."""
    import numpy as np

    from ..stats import paired_auc_difference

    if not a.get("scores") or not b.get("scores"):
        return None
    sa, sb = np.load(a["scores"]), np.load(b["scores"])
    if sa["y"].shape != sb["y"].shape or not np.array_equal(sa["y"], sb["y"]):
        return {"diff": None, "se": None, "ci": [None, None], "note": "different test rows"}
    d = paired_auc_difference(sa["y"], sa["logits"], sb["logits"])
    lo, hi = d["ci"]
    d["verdict"] = "n/a" if lo is None else ("better" if lo > 0 else "worse" if hi < 0 else "tie")
    return d


def heterogeneity(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The instance-wise claim per seed: the iHAS run's heterogeneity test (do its clusters'
    architectures differ beyond chance?) and iHAS - iHAS-2 (one cluster: the majority dims on all samples)
    on the same seed's test rows, as a paired AUC difference with DeLong's interval."""
    ihas = {r["seed"]: r for r in runs if r["method"] == "ihas"}
    two = {r["seed"]: r for r in runs if r["method"] == "ihas_2"}
    out = []
    for seed in sorted(set(ihas) | set(two), key=str):
        rec: dict[str, Any] = {"seed": seed, "test": (ihas.get(seed) or {}).get("heterogeneity")}
        if seed in ihas and seed in two:
            rec["ihas_minus_ihas2"] = delong_pair(ihas[seed], two[seed])
        out.append(rec)
    return {"per_seed": out}


def heterogeneity_markdown(h: dict[str, Any]) -> list[str]:
    recs = [r for r in h.get("per_seed", []) if r.get("test") or r.get("ihas_minus_ihas2")]
    if not recs:
        return []
    lines = ["", "## Is iHAS instance-wise here? (docs/heterogeneity.md)", "",
             "Heterogeneity: mean over fields (and cluster pairs) of |kept dims of one cluster - of another|, "
             "against the same statistic with the validation rows' cluster assignments permuted and the "
             "architectures re-derived by the majority rule (p: permutation p-value). iHAS - iHAS-2: the same "
             "seed's test rows, DeLong's 95% interval of the paired AUC difference. Masks p: the same test on the "
             "clusters' expected open dims per field (no threshold).", "",
             "| seed | heterogeneity | null mean | p | masks p | iHAS - iHAS-2 test AUC [95% CI] |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in recs:
        t = r.get("test") or {}
        d = r.get("ihas_minus_ihas2") or {}
        stat = "-" if t.get("statistic") is None else f"{t['statistic']:.3f}"
        null = "-" if t.get("null_mean") is None else f"{t['null_mean']:.3f}"
        p = "-" if t.get("p_value") is None else f"{t['p_value']:.4f}"
        sp = "-" if t.get("soft_p_value") is None else f"{t['soft_p_value']:.4f}"
        if d.get("diff") is None:
            diff = d.get("note", "-") if d else "-"
        else:
            diff = f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] {d['verdict']}"
        lines.append(f"| {r['seed']} | {stat} | {null} | {p} | {sp} | {diff} |")
    return lines


def own_cluster(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Claim (v): per run, the mean over clusters of (own model - mean of the other models) on the
    cluster's test samples; then mean and 95% CI over seeds, and how often the own model is best."""
    per_run = [r["case_study"] for r in runs if r.get("case_study")]
    if not per_run:
        return None
    out: dict[str, Any] = {"runs": len(per_run)}
    for key in ("auc", "logloss"):
        vals = []
        for cs in per_run:
            d = [
                c[f"own_minus_others_{key}"]
                for c in cs["per_cluster"]
                if c.get(f"own_minus_others_{key}") is not None
            ]
            if d:
                vals.append(sum(d) / len(d))
        out[f"own_minus_others_{key}"] = mean_ci(vals)
        cells = [c[f"own_is_best_{key}"] for cs in per_run for c in cs["per_cluster"]]
        out[f"own_best_share_{key}"] = sum(cells) / len(cells) if cells else None
    return out


def table4_markdown(
    dataset: str, t4: dict[str, Any], root: Path, missing: list[dict[str, Any]]
) -> tuple[str, list]:
    rows = []
    for label, _m, _r in T4_ROWS:
        r = t4["rows"][label]
        d = r.get("minus_ihas") or {}
        rows.append([label, T4_WHAT[label], len(r["seeds"]), _pm(r["test_auc"]), _ci(d.get("test_auc")),
                     _pm(r["test_logloss"]), _ci(d.get("test_logloss")), _params(r["embedding_params"]),
                     _params(r["dense_params"]), _pm(r["inference_ms"], 2), _exact(r)])  # fmt: skip
    lines = [f"# Table 4: ablations ({dataset})", "",
             f"From the run dirs of the sweep `{sweep_label(root)}` (MLP backbone). iHAS-1 is the search row of each iHAS run. Test "
             "AUC / logloss: mean ± std over seeds; differences from iHAS paired by seed with a 95% t-interval "
             f"(better / worse / tie for the row against iHAS). {TIMING}", ""]  # fmt: skip
    lines += _md(T4_COLUMNS, rows).splitlines()
    lines += ["", "## The paper's claims (RQ3, RQ5)", ""]
    names = {"i_vs_base": "(i) iHAS beats Base", "ii_ihas_vs_ihas1": "(ii) iHAS > iHAS-1",
             "ii_ihas1_vs_ihas2": "(ii) iHAS-1 > iHAS-2", "iii_polarization": "(iii) polarization helps",
             "iv_instance_wise": "(iv) instance-wise helps"}  # fmt: skip
    for key, label in names.items():
        c = t4["claims"].get(key)
        if c:
            lines.append(claim_line(label, c, c["a"], c["b"]))
    own = t4["claims"].get("v_own_cluster")
    if own:
        oa, ol = own["own_minus_others_auc"], own["own_minus_others_logloss"]

        def fmt(c: dict[str, Any]) -> str:
            if c["mean"] is None:
                return "-"
            if c["ci"][0] is None:
                return f"{c['mean']:+.4f} (n=1)"
            return f"{c['mean']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]"

        lines.append(f"* (v) own-cluster model better (Figure 6), {own['runs']} iHAS runs: own - other models on a "
                     f"cluster's test samples, AUC {fmt(oa)} (own best in {own['own_best_share_auc']:.0%} of "
                     f"clusters), logloss {fmt(ol)} (own best in {own['own_best_share_logloss']:.0%})")  # fmt: skip
    lines += heterogeneity_markdown(t4.get("heterogeneity") or {})
    lines += missing_lines(missing)
    return "\n".join(lines) + "\n", rows


# ---- figures ---------------------------------------------------------------------------------------------
def figure3(dataset: str, runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Gate-probability histograms (test split, pooled over seeds) of iHAS and iHAS-3 side by side."""
    from .figures import histograms_side_by_side_png

    hists = {}
    for method, label in (("ihas", "iHAS (with polarization)"), ("ihas_3", "iHAS-3 (without)")):
        hs = [
            r["p_hist"] for r in runs if r["method"] == method and r.get("p_hist") and r["backbone"] == "mlp"
        ]
        if hs:
            counts = [sum(h["counts"][i] for h in hs) for i in range(len(hs[0]["counts"]))]
            hists[f"{label}, {len(hs)} runs"] = {"counts": counts, "edges": hs[0]["edges"]}
    if len(hists) < 2:
        return None
    return histograms_side_by_side_png(
        hists, path, f"Figure 3: Bernoulli gate probabilities, test split ({dataset})"
    )


def copy_run_figure(runs: list[dict[str, Any]], method: str, rel: str, dest: Path) -> Path | None:
    """The figure ``rel`` of the lowest-seed run of ``method`` (e.g. Figure 5 / 6 of one iHAS run)."""
    cands = sorted((r for r in runs if r["method"] == method and r["backbone"] == "mlp" and not r.get("transfer_from")),
                   key=lambda r: str(r["seed"]))  # fmt: skip
    for r in cands:
        src = Path(r.get("path") or r["job"]) / rel
        if src.is_file():
            shutil.copyfile(src, dest)
            return dest
    return None


def write_table3(
    dataset: str, runs: list[dict[str, Any]], missing: list[dict[str, Any]], root: Path, out: Path
) -> dict[str, Any]:
    t3 = table3(runs)
    md, rows = table3_markdown(dataset, t3, root, missing)
    _write(out, f"table3_{dataset}", md, T3_COLUMNS, rows)
    return {"table3": t3, "files": [f"table3_{dataset}.md", f"table3_{dataset}.csv"], "rows": rows}


def write_table4(
    dataset: str, runs: list[dict[str, Any]], missing: list[dict[str, Any]], root: Path, out: Path
) -> dict[str, Any]:
    t4 = table4(runs)
    md, rows = table4_markdown(dataset, t4, root, missing)
    _write(out, f"table4_{dataset}", md, T4_COLUMNS, rows)
    files = [f"table4_{dataset}.md", f"table4_{dataset}.csv"]
    figs = {
        "figure3": figure3(dataset, runs, out / f"figure3_{dataset}.png"),
        "figure5": copy_run_figure(runs, "ihas", "cluster/dims_heatmap.png", out / f"figure5_{dataset}.png"),
        "figure6": copy_run_figure(
            runs, "ihas", "evaluate/figure6_case_study.png", out / f"figure6_{dataset}.png"
        ),
    }
    return {"table4": t4, "files": files + [p.name for p in figs.values() if p], "rows": rows,
            "figures": {k: str(v) for k, v in figs.items() if v}}  # fmt: skip
