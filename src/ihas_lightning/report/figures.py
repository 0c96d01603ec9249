"""Figures of the run outputs: the gate-probability histogram (paper Figure 3).

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
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
