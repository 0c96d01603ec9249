"""Per-cluster embedding dimensions heatmap: the paper's Figure 5 (case study, RQ5).

Rows are clusters, columns are fields, each cell the number of embedding dimensions the
majority rule kept for that field in that cluster (0 = the field is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def dims_heatmap(
    field_dims: Sequence[Sequence[int]],
    field_names: Sequence[str],
    path: str | Path,
    sizes: Sequence[int] | None = None,
    max_dim: int | None = None,
    title: str = "iHAS: embedding dims per field and cluster (paper Fig. 5)",
) -> Path:
    """Write the heatmap PNG to ``path`` and return it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dims = np.asarray(field_dims, dtype=float)
    k, f = dims.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * f + 2.0), max(1.8, 0.6 * k + 1.4)))
    im = ax.imshow(dims, cmap="YlGnBu", vmin=0, vmax=max_dim or max(1.0, float(dims.max())), aspect="auto")
    ax.set_xticks(range(f))
    ax.set_xticklabels(list(field_names), rotation=60, ha="right", fontsize=8)
    ylabels = [f"cluster {c}" + (f" (n={sizes[c]})" if sizes is not None else "") for c in range(k)]
    ax.set_yticks(range(k))
    ax.set_yticklabels(ylabels, fontsize=8)
    for c in range(k):
        for j in range(f):
            v = int(dims[c, j])
            ax.text(
                j,
                c,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > dims.max() / 2 else "black",
            )
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="dims")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
