"""Figures of the run outputs: the gate-probability histogram (paper Figure 3), with and without
polarization side by side, and the case-study matrix of the cluster models (paper Figure 6).

With the polarization regularizer the Bernoulli probabilities p_ij split into two modes (one near
0, the kept dims high), and the automatic threshold searcher cuts in the valley between them;
without it they are heavy-tailed and hard to separate. Rendered with matplotlib's Agg backend (no
display needed), written atomically.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path


def gate_histogram_png(
    hist: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "gate probabilities",
    threshold: float | None = None,
) -> Path:
    """Bar plot of ``{"counts": [...], "edges": [...]}`` (shares of all p_ij) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(hist["counts"], dtype=float)
    edges = np.asarray(hist["edges"], dtype=float)
    if len(edges) != len(counts) + 1:
        raise ValueError("histogram edges must be one longer than counts")
    share = counts / counts.sum() if counts.sum() > 0 else counts
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color="#4C72B0", edgecolor="white")
    if threshold is not None:
        ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"mean threshold {threshold:.2f}")
        ax.legend(loc="upper center")
    ax.set_xlim(0, 1)
    ax.set_xlabel("Bernoulli gate probability p")
    ax.set_ylabel("share of (sample, dim) pairs")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def histograms_side_by_side_png(
    hists: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike, title: str
) -> Path:
    """Paper Figure 3: one panel per ``{label: {"counts", "edges"}}`` (e.g. iHAS vs iHAS-3), shared y."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(hists)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.3), dpi=100, sharey=True, squeeze=False)
    for ax, (label, h) in zip(axes[0], hists.items()):
        counts = np.asarray(h["counts"], dtype=float)
        edges = np.asarray(h["edges"], dtype=float)
        share = counts / counts.sum() if counts.sum() > 0 else counts
        ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color="#4C72B0", edgecolor="white")
        ax.set_xlim(0, 1)
        ax.set_xlabel("Bernoulli gate probability p")
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("share of (sample, dim) pairs")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def case_study_png(
    case: Mapping[str, Sequence[Sequence[float | None]]], path: str | os.PathLike, title: str
) -> Path:
    """Paper Figure 6 as matrices: rows = the cluster whose model predicts, columns = the cluster whose
    test samples are scored; AUC and logloss side by side, the diagonal (own cluster) outlined in blue."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), dpi=100, squeeze=False)
    for ax, key, cmap in zip(axes[0], ("auc", "logloss"), ("Greens", "Reds_r")):
        m = np.asarray([[np.nan if v is None else v for v in row] for row in case[key]], dtype=float)
        k = m.shape[0]
        im = ax.imshow(m, cmap=cmap, aspect="equal")
        lo, hi = np.nanmin(m) if np.isfinite(m).any() else 0.0, np.nanmax(m) if np.isfinite(m).any() else 1.0
        for i in range(k):
            for j in range(k):
                txt = "-" if np.isnan(m[i, j]) else f"{m[i, j]:.4f}"
                # the colour map is dark at its good end: white text there
                good = (m[i, j] - lo) / (hi - lo) if hi > lo and not np.isnan(m[i, j]) else 0.0
                good = good if key == "auc" else 1.0 - good
                ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                        fontweight="bold" if i == j else "normal", color="white" if good > 0.6 else "black")  # fmt: skip
            # the own-cluster cell
            ax.add_patch(
                plt.Rectangle((i - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="#1f77b4", linewidth=2.5)
            )
        ax.set_xticks(range(k))
        ax.set_xticklabels([f"samples of {j}\n(n={case['samples'][j]})" for j in range(k)], fontsize=7)
        ax.set_yticks(range(k))
        ax.set_yticklabels([f"model {i}" for i in range(k)], fontsize=8)
        ax.set_title(f"test {key}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write a matplotlib figure to ``path`` atomically (a temp sibling, then a rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path
