"""Statistics over seeds: mean, std and a t confidence interval; a win / lose / tie verdict."""

from __future__ import annotations

import math
from typing import Any


def mean_ci(values: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample std and the two-sided t confidence interval of the mean (n >= 2)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci": [None, None]}
    m = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": m, "std": None, "ci": [None, None]}
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "std": sd, "ci": [m - half, m + half]}


def verdict(ci: dict[str, Any], higher_is_better: bool = True) -> str:
    """win / lose when the CI excludes 0 (in the better / worse direction), else tie."""
    lo, hi = ci["ci"]
    if lo is None:
        return "n/a"
    if lo > 0:
        return "win" if higher_is_better else "lose"
    if hi < 0:
        return "lose" if higher_is_better else "win"
    return "tie"


def paired_auc_difference(y: Any, a: Any, b: Any, level: float = 0.95) -> dict[str, Any]:
    """AUC(a) - AUC(b) of two scorings of the same rows (labels ``y``), with its standard error and
    two-sided confidence interval by DeLong's method for correlated ROC curves (DeLong, DeLong &
    Clarke-Pearson 1988), in the midrank form of Sun & Xu (2014): O(n log n), no resampling, so it
    holds at millions of rows.

    Each positive's placement is the share of negatives scored below it (ties count half), each
    negative's the share of positives above it; the AUC is the mean placement, and the covariance of
    the two scorings' placements over the positives and over the negatives gives the variance of the
    difference (0 when the two scorings agree on every row). ``diff``, ``se`` and ``ci`` are None when
    a class is missing. ``df`` is the Welch-Satterthwaite degrees of freedom of that variance (a sum of
    a positives' and a negatives' term): about the minority class's count - 1 when it dominates, so a
    caller can take a t quantile where a class has only a few rows (``ci`` is the normal interval)."""
    import numpy as np
    from scipy import stats

    y = np.asarray(y).astype(bool).ravel()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return {"diff": None, "se": None, "ci": [None, None], "level": level, "df": None}
    v10, v01 = [], []
    for s in (a, b):
        s = np.asarray(s, dtype=np.float64).ravel()
        if s.shape != y.shape:
            raise ValueError(f"{s.shape[0]} scores for {y.shape[0]} labels")
        ranks = stats.rankdata(s)
        v10.append((ranks[y] - stats.rankdata(s[y])) / neg)  # negatives below each positive
        v01.append(1.0 - (ranks[~y] - stats.rankdata(s[~y])) / pos)  # positives above each negative
    diff = float(v10[0].mean() - v10[1].mean())
    terms = []  # (variance term, its degrees of freedom) of the positives and of the negatives
    for v, n in ((v10, pos), (v01, neg)):
        if n > 1:
            c = np.cov(np.vstack(v))
            terms.append((max(float(c[0, 0] + c[1, 1] - 2.0 * c[0, 1]) / n, 0.0), n - 1))
    var = sum(t for t, _ in terms)
    se = math.sqrt(var)
    den = sum(t * t / k for t, k in terms)
    df = var * var / den if den > 0 else None
    half = float(stats.norm.ppf(0.5 + level / 2)) * se
    return {"diff": diff, "se": se, "ci": [diff - half, diff + half], "level": level, "df": df}


# ---- heterogeneity of the clusters' architectures (the instance-wise claim) ---------------------------
def majority_field_dims(mean_mask: Any, num_fields: int, embed_dim: int, threshold: float) -> Any:
    """The retraining stage's majority rule (:func:`ihas_lightning.stages.cluster.majority_dims`),
    vectorised over a leading batch: ``mean_mask`` [..., K, F*d] -> kept dims per field [..., K, F]
    (int64). A dim is kept when its mean mask in the cluster is ``>= threshold``; a cluster with no dim
    kept keeps its ``embed_dim`` highest-mean-mask dims (ties: the lower index), as the stage does."""
    import torch

    m = torch.as_tensor(mean_mask)
    keep = m >= threshold
    none = ~keep.any(-1)
    if bool(none.any()):
        order = torch.sort(-m, dim=-1, stable=True).indices[..., :embed_dim]
        top = torch.zeros_like(keep).scatter_(-1, order, True)
        keep = torch.where(none.unsqueeze(-1), top, keep)
    return keep.reshape(*keep.shape[:-1], num_fields, embed_dim).sum(-1)


def dims_difference(dims: Any) -> Any:
    """How much the clusters' architectures differ: the mean over fields of |kept dims of cluster a -
    kept dims of cluster b|, averaged over the K(K-1)/2 pairs of clusters. ``dims`` [..., K, F] ->
    [...] (float64); 0 for one cluster."""
    import torch

    d = torch.as_tensor(dims).double()
    k = d.shape[-2]
    if k < 2:
        return torch.zeros(d.shape[:-2], dtype=torch.float64)
    a, b = torch.triu_indices(k, k, 1)
    return (d[..., a, :] - d[..., b, :]).abs().mean(-1).mean(-1)


def heterogeneity_test(
    masks: Any,
    assign: Any,
    k: int,
    num_fields: int,
    embed_dim: int,
    threshold: float,
    permutations: int = 200,
    seed: int = 0,
    chunk: int = 25,
) -> dict[str, Any]:
    """Do the clusters' architectures differ beyond chance? ``masks`` [n, F*d] (each sample's 0/1 gate
    mask), ``assign`` [n] (its cluster). The statistic (:func:`dims_difference`) of the architectures
    that the majority rule derives from the clusters' mean masks, against its null: the same statistic
    with the sample-to-cluster assignments permuted (``permutations`` seeded shuffles; the cluster sizes
    kept) and the architectures re-derived from each permuted clustering. ``p_value`` = (1 + #null >=
    observed) / (1 + permutations), so its floor is 1 / (1 + permutations).

    ``soft_*``: the same test on the clusters' *expected* open dims per field (the sum of a field's
    mean-mask values, no threshold), on the same permutations. The majority rule is a step at
    ``threshold``: where many dims are open for about half the samples (as when two groups keep
    different fields), random halves flip them and the architecture statistic's null is wide, though the
    clusters' masks differ far beyond chance; the soft statistic has no step, so its null shrinks with
    the rows (the test of the masks; ``docs/heterogeneity.md``).

    Vectorised: the per-cluster mask sums of ``chunk`` permutations are one matrix product (one-hot
    assignments [chunk*K, n] @ masks [n, F*d])."""
    import numpy as np
    import torch

    m = torch.as_tensor(masks).float()
    a = torch.as_tensor(np.asarray(assign)).long()
    n = len(a)
    if n == 0 or k < 2:
        return {"statistic": None, "null_mean": None, "null_q95": None, "p_value": None, "permutations": 0,
                "rows": n, "soft_statistic": None, "soft_p_value": None}  # fmt: skip
    counts = torch.bincount(a, minlength=k).clamp(min=1).float()

    def stat(assignments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, n] -> ([B], [B])
        b = assignments.shape[0]
        onehot = torch.zeros(b, k, n)
        onehot.scatter_(1, assignments.unsqueeze(1), 1.0)
        mean = (onehot.reshape(b * k, n) @ m).reshape(b, k, -1) / counts.view(1, k, 1)
        hard = dims_difference(majority_field_dims(mean, num_fields, embed_dim, threshold))
        soft = dims_difference(mean.reshape(b, k, num_fields, embed_dim).sum(-1))
        return hard, soft

    hard0, soft0 = (float(v[0]) for v in stat(a.unsqueeze(0)))
    g = torch.Generator().manual_seed(int(seed))
    null: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, permutations, chunk):
        b = min(chunk, permutations - start)
        perms = torch.argsort(torch.rand(b, n, generator=g), dim=1)
        null.append(stat(a[perms]))
    out = {"rows": n, "seed": int(seed), "permutations": sum(len(h) for h, _ in null)}
    for prefix, observed, i in (("", hard0, 0), ("soft_", soft0, 1)):
        nv = torch.cat([t[i] for t in null]).numpy() if null else np.zeros(0)
        out.update({f"{prefix}statistic": observed, f"{prefix}null_mean": float(nv.mean()) if len(nv) else None,
                    f"{prefix}null_q95": float(np.quantile(nv, 0.95)) if len(nv) else None,
                    f"{prefix}p_value": (1 + int((nv >= observed - 1e-12).sum())) / (1 + len(nv))})  # fmt: skip
    return out
