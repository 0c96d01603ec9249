"""Per-cluster embedding dimensions heatmap: the paper's Figure 5 (case study, RQ5).

Each cell is the number of embedding dimensions the majority rule kept for a field in a cluster
(0 = the field is dropped). With few fields, clusters are rows and fields columns (as in the paper);
with many (Criteo's 39), fields are rows, so every field name stays horizontal and legible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: above this many fields the heatmap is drawn with fields as rows
TRANSPOSE_ABOVE = 16


def dims_heatmap(
    field_dims: Sequence[Sequence[int]],
    field_names: Sequence[str],
    path: str | Path,
    sizes: Sequence[int] | None = None,
    max_dim: int | None = None,
    title: str = "iHAS: embedding dims per field and cluster (paper Fig. 5)",
) -> Path:
    """Write the heatmap PNG to ``path`` (atomically) and return it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dims = np.asarray(field_dims, dtype=float)
    k, f = dims.shape
    clusters = [f"cluster {c}" + (f"\n(n={sizes[c]})" if sizes is not None else "") for c in range(k)]
    fields = list(field_names)
    tall = f > TRANSPOSE_ABOVE
    grid = dims.T if tall else dims
    rows, cols = (fields, clusters) if tall else (clusters, fields)
    if tall:
        figsize = (max(4.0, 1.1 * k + 3.0), max(3.0, 0.26 * f + 1.6))
    else:
        figsize = (max(4.0, 0.55 * f + 2.0), max(1.8, 0.6 * k + 1.4))
    fig, ax = plt.subplots(figsize=figsize)
    vmax = max_dim or max(1.0, float(dims.max()))
    im = ax.imshow(grid, cmap="YlGnBu", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=0 if tall else 60, ha="center" if tall else "right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7 if tall else 8)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            v = int(grid[r, c])
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > vmax / 2 else "black")  # fmt: skip
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04 if tall else 0.03, pad=0.02, label="dims")
    fig.tight_layout()
    from .figures import save_png

    return save_png(fig, path, dpi=110)
