"""The paper's Table 2 (every method's test AUC / logloss, params) and Figure 4 (inference time), read
from the run dirs of a multirun (no W&B needed).

:func:`collect` walks a directory for Hydra job dirs (``<job>/.hydra/config.yaml``) and reads each
``stage=all`` job's ``evaluate/results.json`` (the method's final row) and ``pipeline.json`` (wall
time). A job without results is listed by name with its overrides, never dropped silently.
:func:`write_report` then writes, per dataset, ``table2_<dataset>.{md,csv}`` and
``figure4_<dataset>.png`` plus ``report.json``: per method the test AUC and logloss (mean ± std over
seeds), the paired difference from iHAS with a 95% t-interval (win / lose / tie: the interval
excludes 0 or not), params (embedding values and dense), inference ms on a fixed number of test rows
(``evaluate.timing_rows``) on the path each model is served with (iHAS: the routing ``routing=auto``
picks; the exact routing's time in its own column), the pipeline's wall time, and iHAS's heterogeneity
test per seed (``docs/heterogeneity.md``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..stats import mean_ci, verdict
from .common import _pm, collect, missing_lines, sweep_label  # noqa: F401 - collect re-exported

# the paper's Table 2 order; anything else follows
ORDER = ["base", "ihas", "pep", "autofield", "optembed", "adafs_soft", "adafs_hard", "optfs"]
REFERENCE = "ihas"


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
                               "seeds": sorted(r["seed"] for r in rs),
                               "served_routing": sorted({r["served_routing"] for r in rs if r.get("served_routing")}),
                               "retrained_budget": [r["retrained_budget"] for r in rs if r.get("retrained_budget")],
                               "retrain_guard": [{**r["retrain_guard"], "seed": r["seed"]} for r in rs
                                                 if (r.get("retrain_guard") or {}).get("mode") == "base"]}  # fmt: skip
        for k in (
            "test_auc",
            "test_logloss",
            "embedding_params",
            "dense_params",
            "inference_ms",
            "inference_exact_ms",
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


def _diff(c: dict[str, Any] | None) -> str:
    if not c or c["mean"] is None:
        return "-"
    if c["ci"][0] is None:
        return f"{c['mean']:+.4f} (n=1)"
    return f"{c['mean']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] {c['verdict']}"


COLUMNS = ["method", "seeds", "test AUC", "AUC - iHAS [95% CI]", "test logloss", "logloss - iHAS [95% CI]",
           "embedding params", "dense params", "inference ms (served)", "exact routing ms", "wall s"]  # fmt: skip


def rows(summary: list[dict[str, Any]], reference: str = REFERENCE) -> list[list[Any]]:
    out = []
    for r in summary:
        out.append([r["display"], len(r["seeds"]), _pm(r["test_auc"]), _diff(r.get(f"test_auc_minus_{reference}")),
                    _pm(r["test_logloss"]), _diff(r.get(f"test_logloss_minus_{reference}")),
                    f"{r['embedding_params']['mean']:,.0f}" if r["embedding_params"]["mean"] is not None else "-",
                    f"{r['dense_params']['mean']:,.0f}" if r["dense_params"]["mean"] is not None else "-",
                    _pm(r["inference_ms"], 2) + (f" ({'/'.join(r['served_routing'])})" if r.get("served_routing") else ""),
                    _pm(r["inference_exact_ms"], 2) if r.get("inference_exact_ms") else "-",
                    f"{r['wall_seconds']['mean']:.1f}" if r["wall_seconds"]["mean"] else "-"])  # fmt: skip
    return out


def timing_note(runs: list[dict[str, Any]]) -> str:
    """How the inference column was timed (the runs' ``evaluate.timing_rows``; older results: whole split)."""
    counts = sorted({r["timing_rows"] for r in runs if r.get("timing_rows")})
    if not counts:
        return "Inference: whole test split, ms (results written before the fixed timing sample)."
    replaced = any(r.get("timing_rows_replaced") for r in runs)
    return (f"Inference: ms to score {'/'.join(f'{c:,}' for c in counts)} test rows, a fixed count so that per-call "
            f"overhead does not decide the figure ({'the test split drawn with replacement, seeded, where it is smaller' if replaced else 'a seeded sample of the test split'}), "
            "each model on the path it is served with: for iHAS the routing that `routing=auto` serves (fast where "
            "evaluate judged it within 0.001 AUC of the exact routing on validation, else exact; named in "
            "brackets), with the exact routing's time in its own column.")  # fmt: skip


def budget_note(summary: list[dict[str, Any]]) -> list[str]:
    """PEP's retrained budget per method row, where a run retrained another budget than configured."""
    out = []
    for r in summary:
        b = r.get("retrained_budget") or []
        fell = [x for x in b if x.get("fallback")]
        if fell:
            got = ", ".join(f"seed {x.get('seed', '?')}: {x['budget']:g} (configured {x['requested']:g}; "
                            f"reached {', '.join(x.get('reached') or []) or 'none'})" for x in fell)  # fmt: skip
            out.append(f"* {r['display']}: the configured retrain budget was not reached in {len(fell)} of "
                       f"{len(b)} runs; retrained at the sparsest budget reached: {got}.")  # fmt: skip
        elif b:
            vals = sorted({x["budget"] for x in b})
            out.append(
                f"* {r['display']}: retrained at budget {', '.join(f'{v:g}' for v in vals)} in every run."
            )
    return out


def guard_note(summary: list[dict[str, Any]]) -> list[str]:
    """Per method row with the retrain guard (iHAS): how many cluster models fell back to Base, by seed."""
    out = []
    for r in summary:
        gs = sorted(r.get("retrain_guard") or [], key=lambda g: str(g["seed"]))
        if not gs:
            continue
        fell = sum(g.get("fallbacks", 0) for g in gs)
        total = sum(g.get("clusters", 0) for g in gs if not g.get("skipped"))  # the guarded clusters
        per = ", ".join(f"seed {g['seed']}: " + ("skipped (no Base)" if g.get("skipped") else
                        f"{g.get('fallbacks', 0)}/{g.get('clusters', 0)}") for g in gs)  # fmt: skip
        out.append(f"* {r['display']}: {fell} of {total} cluster models fell back to Base ({per}).")
    return out


def heterogeneity_section(runs: list[dict[str, Any]], method: str = REFERENCE) -> list[str]:
    """Per iHAS run: how much its clusters' architectures differ, the null and the permutation p."""
    hs = sorted(((r["seed"], r["heterogeneity"]) for r in runs
                 if r["method"] == method and (r.get("heterogeneity") or {}).get("statistic") is not None),
                key=lambda t: str(t[0]))  # fmt: skip
    if not hs:
        return []
    lines = ["", "## Heterogeneity of iHAS's clusters (docs/heterogeneity.md)", "",
             "Mean over fields (and cluster pairs) of |kept dims of one cluster - of another|, re-derived on "
             "validation rows; the null permutes the rows' cluster assignments and re-derives the architectures by "
             "the majority rule; p is the permutation p-value (floor 1/(1+permutations)). Masks: the same test on "
             "the clusters' expected open dims per field (no threshold), on the same permutations.", "",
             "| seed | statistic | retrained architectures | null mean | null 95th pct | permutations | p | masks: statistic | null mean | p |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for seed, h in hs:
        lines.append(f"| {seed} | {h['statistic']:.3f} | {h.get('trained_statistic', float('nan')):.3f} | "
                     f"{h['null_mean']:.3f} | {h['null_q95']:.3f} | {h['permutations']} | {h['p_value']:.4f} | "
                     f"{_f3(h.get('soft_statistic'))} | {_f3(h.get('soft_null_mean'))} | {_f3(h.get('soft_p_value'), 4)} |")  # fmt: skip
    return lines


def _f3(v: float | None, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def markdown(dataset: str, summary: list[dict[str, Any]], missing: list[dict[str, Any]], root: Path,
             runs: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    runs = runs or []
    lines = [f"# Table 2: {dataset}", "",
             f"From the run dirs of the sweep `{sweep_label(root)}`. Test AUC / logloss: mean ± std over seeds; the "
             "difference from iHAS is paired by seed with a 95% t-interval (win / lose: the interval excludes 0, "
             "else tie; positive AUC and negative logloss differences favour the method over iHAS). Params: the "
             f"model used at inference, embedding values and dense parts. {timing_note(runs)} Wall: the whole "
             "stage=all pipeline, s.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows(summary)]
    notes = budget_note(summary)
    if notes:
        lines += ["", "## Retrained budgets (PEP)", "", *notes]
    guard = guard_note(summary)
    if guard:
        lines += ["", "## Retrain guard (a cluster model not provably no worse than Base serves Base's; docs/search.md)",
                  "", *guard]  # fmt: skip
    lines += heterogeneity_section(runs)
    lines += missing_lines(missing)
    return "\n".join(lines) + "\n"


def figure4(dataset: str, summary: list[dict[str, Any]], path: Path, ylabel: str = "inference (ms)") -> Path:
    """Inference time per method on the served path (a fixed number of test rows), mean with std error
    bars (paper Figure 4)."""
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
    ax.set_ylabel(ylabel)
    ax.set_title(f"Figure 4: inference time ({dataset})", fontsize=9)
    fig.tight_layout()
    from .figures import save_png

    return save_png(fig, path)


def write_table2(ds: str, runs: list[dict[str, Any]], missing: list[dict[str, Any]], root: Path, out: Path,
                 logger: Any = None) -> dict[str, Any]:  # fmt: skip
    """Table 2 and Figure 4 of one dataset's runs into ``out``."""
    summary = summarize(runs)
    (out / f"table2_{ds}.md").write_text(markdown(ds, summary, missing, root, runs))
    with open(out / f"table2_{ds}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows(summary))
    counts = sorted({r["timing_rows"] for r in runs if r.get("timing_rows")})
    ylabel = (f"ms per {'/'.join(f'{c:,}' for c in counts)} test rows, served path" if counts
              else "inference, whole test split (ms)")  # fmt: skip
    fig = figure4(ds, summary, out / f"figure4_{ds}.png", ylabel) if summary else None
    if logger is not None:
        from ..loggers import log_image, log_table

        log_table(logger, f"table2/{ds}", COLUMNS, rows(summary))
        if fig is not None:
            log_image(logger, f"figure4/{ds}", fig)
    return {"summary": summary, "runs": runs, "files": [f"table2_{ds}.md"]}
