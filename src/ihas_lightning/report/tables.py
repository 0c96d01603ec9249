"""The results table of the evaluation (Base, the method's search model and its final model, e.g. the
paper's Table 4 rows Base / iHAS-1 / iHAS; Figure 4 timing) and
the planted-field recovery table (synthetic data), as rich tables (stdout), Markdown and W&B rows."""

from __future__ import annotations

from typing import Any

RESULT_COLUMNS = [
    "model",
    "val AUC",
    "val logloss",
    "test AUC",
    "test logloss",
    "params",
    "embedding params",
    "dense params",
    "inference ms",
    "exact routing ms",
    "note",
]
CLUSTER_COLUMNS = ["cluster", "val rows", "val AUC", "val logloss", "test rows", "test AUC", "test logloss",
                   "test CTR", "open dims", "params", "model"]  # fmt: skip
RECOVERY_COLUMNS = [
    "cluster",
    "group",
    "purity",
    "selected fields",
    "relevant fields",
    "precision",
    "recall",
    "F1",
]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def result_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for r in results["rows"]:
        rows.append(
            [
                r["model"],
                r.get("val_auc"),
                r.get("val_logloss"),
                r.get("test_auc"),
                r.get("test_logloss"),
                r.get("params"),
                r.get("embedding_params"),
                r.get("dense_params"),
                r.get("inference_ms"),
                r.get("inference_exact_ms"),
                r.get("note", "")
                + (f" (served: {r['served_routing']} routing)" if r.get("served_routing") else ""),
            ]
        )
    return rows


def cluster_rows(results: dict[str, Any]) -> list[list[Any]]:
    """Per-cluster metrics of the routed model, then the pooled row (all clusters together)."""
    rows = [
        [c["cluster"], c.get("val_samples"), c.get("val_auc"), c.get("val_logloss"), c.get("test_samples"),
         c.get("test_auc"), c.get("test_logloss"), c.get("test_positive_rate"), c.get("embedding_width"),
         c.get("params"), "Base (retrain guard)" if c.get("fallback") == "base" else "retrained"]
        for c in results.get("per_cluster", [])
    ]  # fmt: skip
    final = results.get("final_row", "iHAS")
    ihas = next((r for r in results["rows"] if r["model"] == final), None)
    if ihas is not None:
        rows.append(["pooled", results.get("val_rows"), ihas.get("val_auc"), ihas.get("val_logloss"),
                     results.get("test_rows"), ihas.get("test_auc"), ihas.get("test_logloss"), None, None,
                     ihas.get("params"), None])  # fmt: skip
    return rows


def recovery_rows(recovery: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for r in recovery["per_cluster"]:
        rows.append(
            [r["cluster"], r["group"], r["purity"], ", ".join(r["selected"]), ", ".join(r["relevant"]),
             r["precision"], r["recall"], r["f1"]]
        )  # fmt: skip
    return rows


def group_rows(recovery: dict[str, Any]) -> list[list[Any]]:
    return [
        [r["group"], r["cluster"], r["share_in_cluster"], r["precision"], r["recall"], r["f1"]]
        for r in recovery["per_group"]
    ]


def _md(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _timing_line(results: dict[str, Any]) -> str:
    routing = ""
    if results.get("routing_params") is not None:
        routing = (
            f"Routing cost (search embedding + gate + centroids, shared by all clusters): "
            f"{_fmt(results.get('routing_params'))} params. "
        )
    rows = results.get("timing_rows")
    if rows is not None:
        drawn = "drawn with replacement from" if results.get("timing_rows_replaced") else "a seeded sample of"
        timed = (f"inference: ms to score {_fmt(rows)} test rows ({drawn} the {_fmt(results.get('test_rows'))}-row "
                 f"test split, seeded; a fixed count, so per-call overhead does not decide it), batches of "
                 f"{results.get('batch_size')}, one warm-up batch, min of {results.get('timing_repeats')} passes; "
                 "each model on the path it is served with")  # fmt: skip
        if results.get("served_routing"):
            timed += (f" (routed: the {results['served_routing']} routing, as routing=auto serves it: "
                      f"{results.get('served_routing_reason')}; the exact routing's time beside it)")  # fmt: skip
    else:  # results written before the fixed timing sample
        timed = (
            f"inference: whole test split ({_fmt(results.get('test_rows'))} rows, batch "
            f"{results.get('batch_size')}), one warm-up batch, min of {results.get('timing_repeats')} runs"
        )
    return f"{routing}params = embedding values (kept rows x dims) + dense (backbone, selector); {timed}."


# a permutation p below this is "beyond chance" (docs/heterogeneity.md: p small (< 0.01))
HETEROGENEITY_ALPHA = 0.01


def heterogeneity_verdict(het: dict[str, Any]) -> str:
    """One line a user reads first: is iHAS instance-wise on this run? The gate masks' test answers it
    (the architectures' test has no power where many dims are open for about half the samples, e.g.
    two clusters of equal size that keep different fields: docs/heterogeneity.md); both are named."""
    soft, arch = het.get("soft_p_value"), het["p_value"]
    p = arch if soft is None else soft
    what = "gate masks" if soft is not None else "architectures"
    tail = (f" The retrained architectures are {het['statistic']:.3f} dims per field apart: "
            f"{'beyond' if arch < HETEROGENEITY_ALPHA else 'within'} what random clusters of these sizes get "
            f"(p = {arch:.4f}).")  # fmt: skip
    if het["statistic"] == 0 and not het.get("soft_statistic"):
        return "**Instance-wise here: no.** Every cluster has the same gates and architecture (p = 1)."
    if p < HETEROGENEITY_ALPHA:
        return (
            f"**Instance-wise here: yes.** The clusters' {what} differ beyond chance (p = {p:.4f} < {HETEROGENEITY_ALPHA})."
            + tail
        )
    return (
        f"**Instance-wise here: not shown.** The clusters' {what} differ no more than random clusters' (p = {p:.4f})."
        + tail
    )


def heterogeneity_lines(het: dict[str, Any] | None) -> list[str]:
    """How much the clusters' architectures differ, against chance (``results['heterogeneity']``)."""
    if not het or het.get("statistic") is None:
        return []
    return [
        heterogeneity_verdict(het),
        "",
        f"Heterogeneity of the clusters' architectures: {het['statistic']:.3f} kept dims per field apart "
        f"(mean over fields and cluster pairs, re-derived on {_fmt(het['rows'])} validation rows; the retrained "
        f"architectures: {het['trained_statistic']:.3f}); under the null (cluster assignments permuted "
        f"{het['permutations']} times, architectures re-derived by the majority rule): mean "
        f"{het['null_mean']:.3f}, 95th percentile {het['null_q95']:.3f}; permutation p = {het['p_value']:.4f}"
        f" (floor {1 / (1 + het['permutations']):.4f}). See docs/heterogeneity.md.",
    ] + _soft_lines(het)


def _soft_lines(het: dict[str, Any]) -> list[str]:
    if het.get("soft_statistic") is None:
        return []
    return [
        "",
        f"The clusters' gate masks (expected open dims per field, no threshold): {het['soft_statistic']:.3f} apart; "
        f"null mean {het['soft_null_mean']:.3f}, 95th percentile {het['soft_null_q95']:.3f}; permutation "
        f"p = {het['soft_p_value']:.4f} (the majority rule's step makes the architectures' null wide where many "
        "dims are open for about half the samples).",
    ]


def guard_lines(results: dict[str, Any]) -> list[str]:
    """How many retrained cluster models the retrain guard replaced by Base (``results['retrain_guard']``)."""
    g = results.get("retrain_guard")
    if not g or g.get("mode") != "base":
        return []
    if g.get("skipped"):
        return [f"Retrain guard (method.retrain_guard: base): skipped, {g['skipped']}."]
    fell = g.get("fallback_clusters") or []
    which = f" (cluster {', '.join(map(str, fell))})" if fell else ""
    return [
        f"Retrain guard (method.retrain_guard: base): {g['fallbacks']} of {g['clusters']} cluster models fell back "
        f"to Base{which}: a retrained model is kept only where it is provably within search.tolerance of Base "
        "on its cluster's validation rows (paired logloss and DeLong AUC bounds); see docs/search.md."
    ]


def _truth_lines(results: dict[str, Any]) -> list[str]:
    t = results.get("derived_vs_truth")
    if not t:
        return []
    lines = [
        f"Derived architecture vs truth.json: kept fields {', '.join(t['kept_fields'])}; relevant "
        f"{', '.join(t['relevant_fields'])}; precision {t['precision']:.3f}, recall {t['recall']:.3f}, "
        f"F1 {t['f1']:.3f}."
    ]
    if t.get("kept_value_share_relevant") is not None:
        lines.append(
            f"Kept feature values: {t['kept_value_share_relevant']:.3f} of the relevant fields' values, "
            f"{t['kept_value_share_noise']:.3f} of the noise fields'."
        )
    return lines


def results_markdown(results: dict[str, Any]) -> str:
    title = results.get("display", "iHAS")
    parts = [
        f"# {title} results: {results.get('dataset', '')}",
        "",
        _md(RESULT_COLUMNS, result_rows(results)),
        "",
        _timing_line(results),
    ]
    if results.get("derived_vs_truth"):
        parts += [""] + _truth_lines(results)
    if heterogeneity_lines(results.get("heterogeneity")):
        parts += [""] + heterogeneity_lines(results.get("heterogeneity"))
    if guard_lines(results):
        parts += [""] + guard_lines(results)
    if results.get("warnings"):
        parts += ["", "## Warnings", ""] + [f"* {w}" for w in results["warnings"]]
    if results.get("per_cluster"):
        parts += [
            "",
            f"## Per cluster and pooled (routed samples; clustering input: {results.get('cluster_input')})",
            "",
            _md(CLUSTER_COLUMNS, cluster_rows(results)),
            "",
            "Open dims per field (the retrained model's embedding size of each field):",
            "",
        ]
        parts += [
            f"* cluster {c['cluster']}: "
            + " ".join(map(str, c["field_dims"]))
            + (" (Base's model: the retrain guard's fallback)" if c.get("fallback") == "base" else "")
            for c in results["per_cluster"]
        ]
    rec = results.get("recovery")
    if rec:
        parts += [
            "",
            "## Recovery of the planted fields (per cluster)",
            "",
            _md(RECOVERY_COLUMNS, recovery_rows(rec)),
        ]
        parts += [
            "",
            "## Per true group",
            "",
            _md(["group", "cluster", "share in cluster", "precision", "recall", "F1"], group_rows(rec)),
        ]
    return "\n".join(parts) + "\n"


def print_results(results: dict[str, Any]) -> None:
    """Print the results (and recovery) tables to stdout with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    t = Table(
        title=f"{results.get('method', 'ihas')} results ({results.get('dataset', '')}, validation and test splits)"
    )
    for c in RESULT_COLUMNS:
        t.add_column(c, justify="left" if c in ("model", "note") else "right")
    for row in result_rows(results):
        t.add_row(*[_fmt(v) for v in row])
    console.print(t)
    console.print(_timing_line(results))
    for line in (
        _truth_lines(results) + heterogeneity_lines(results.get("heterogeneity")) + guard_lines(results)
    ):
        console.print(line)
    if results.get("per_cluster"):
        c = Table(title="Routed iHAS per cluster and pooled")
        for col in CLUSTER_COLUMNS:
            c.add_column(col, justify="right")
        for row in cluster_rows(results):
            c.add_row(*[_fmt(v) for v in row])
        console.print(c)
    for w in results.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}")
    rec = results.get("recovery")
    if rec:
        r = Table(
            title="Recovery of the planted relevant fields, per cluster (cluster -> majority latent group)"
        )
        for c in RECOVERY_COLUMNS:
            r.add_column(c, justify="right" if c not in ("selected fields", "relevant fields") else "left")
        for row in recovery_rows(rec):
            r.add_row(*[_fmt(v, 3) for v in row])
        console.print(r)
        g = Table(title="Per true group (its majority cluster)")
        for c in ["group", "cluster", "share in cluster", "precision", "recall", "F1"]:
            g.add_column(c, justify="right")
        for row in group_rows(rec):
            g.add_row(*[_fmt(v, 3) for v in row])
        console.print(g)
