"""Fast-routed iHAS in one lookup: the distilled router and every cluster model's folded first layer
share one table, so each row's ids are read once.

The distilled router (:class:`~.router.LinearRouter`) is a bag-sum of K numbers per id; a folded
cluster model (:class:`~.compact.FoldedMLP`) starts with a bag-sum of H1 numbers per kept id. Both
sum over the same ids, so one table with ``K + sum_c H1_c`` columns per id (a cluster's columns are 0
for the fields it dropped) gives, in one ``embedding_bag``:

    h = [router logits (K) | cluster 0's first layer (H1) | cluster 1's first layer | ...]

Each row's cluster is the argmax of the first K columns (the router's own assignment, to the bit:
the same sums in the same order), and its logit is its cluster's remaining layers (``16 -> 8 -> 1``
for the paper's MLP) on its own columns. The remaining layers are run for every cluster on the whole
batch and each row takes its own (no data-dependent shapes: the graph exports as it is). When the
clusters' remaining layers have the same kinds (:func:`stacked_tails`), they run side by side as one
chain over all clusters' columns: block-diagonal linear layers and concatenated batchnorm statistics,
so K clusters cost one op per layer instead of K (this module at batch 4096 on the Criteo-shaped set:
0.66 -> 0.51 ms per batch).

It costs one lookup per id of ``K + sum_c H1_c`` floats (34 for two clusters of the paper's MLP)
instead of the router's K-float lookup plus a dispatch of each cluster's rows to its own lookups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .compact import FoldedMLP, bag_sum
from .router import LinearRouter


class FusedRouting(nn.Module):
    def __init__(self, router: LinearRouter, models: Sequence[FoldedMLP]):
        super().__init__()
        if len(models) != router.k:
            raise ValueError(f"{len(models)} cluster models for a {router.k}-way router")
        vocab = router.vocab_sizes
        for c, m in enumerate(models):
            if not isinstance(m, FoldedMLP):
                raise ValueError(f"cluster {c}: FusedRouting needs folded cluster models (FoldedMLP)")
            if m.num_fields != len(vocab) or any(vocab[f] != v for f, v in zip(m.kept_fields, m.kept_vocab)):
                raise ValueError(f"cluster {c}: its fields differ from the router's")
        self.k = router.k
        offsets = router.offsets.clone()
        self.register_buffer("offsets", offsets, persistent=False)
        width = self.k + sum(m.hidden for m in models)
        w = router.weight.weight.detach()
        table = torch.zeros(sum(vocab), width, dtype=w.dtype)
        self.segments: list[tuple[int, int]] = []
        with torch.no_grad():
            table[:, : self.k] = w
            col = self.k
            for m in models:
                for s, f in enumerate(m.kept_fields):
                    g, src = int(offsets[f]), int(m.offsets[s])
                    table[g : g + vocab[f], col : col + m.hidden] = m.table[src : src + vocab[f]]
                self.segments.append((col, m.hidden))
                col += m.hidden
        self.table = nn.Parameter(table, requires_grad=False)
        bias = torch.cat([router.bias.detach(), *[m.b1.detach() for m in models]])
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.rest = nn.ModuleList([m.rest for m in models])  # shared with the cluster models
        self.stacked = stacked_tails(list(self.rest))  # None: the layers differ, run each cluster's

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B], cluster [B]) of ids ``x [B, F]``."""
        h = bag_sum(x.long() + self.offsets, self.table) + self.bias
        clusters = h[:, : self.k].argmax(1)
        if self.stacked is not None:
            logits = self.stacked(h[:, self.k :])
        else:
            logits = torch.stack(
                [
                    rest(h[:, start : start + n]).squeeze(-1)
                    for rest, (start, n) in zip(self.rest, self.segments)
                ],
                1,
            )
        return logits.gather(1, clusters.unsqueeze(1)).squeeze(1), clusters


def stacked_tails(rests: Sequence[nn.Module]) -> nn.Sequential | None:
    """K clusters' remaining layers (each ``[B, H_c] -> [B, 1]``) as one chain ``[B, sum H_c] -> [B, K]``:
    a linear layer becomes the block-diagonal of the clusters' weights (column c of the output sees only
    cluster c's columns), a batchnorm (eval) the concatenation of their statistics, ReLU stays, dropout
    (eval) goes. Each output column equals its cluster's own layers up to float summation order (the
    added terms are exact zeros). Serving only: frozen copies in eval mode. None when the layers differ
    in kind or count, or a layer is not linear / batchnorm / ReLU / dropout."""
    if not rests or not all(isinstance(r, nn.Sequential) for r in rests):
        return None
    layers = [list(r) for r in rests]
    if len({len(x) for x in layers}) != 1:
        return None
    out: list[nn.Module] = []
    with torch.no_grad():
        for same in zip(*layers):
            if all(isinstance(m, nn.Linear) for m in same):
                lin = nn.Linear(sum(m.in_features for m in same), sum(m.out_features for m in same))
                lin.weight.copy_(torch.block_diag(*[m.weight for m in same]))
                lin.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features)
                                          for m in same]))  # fmt: skip
                out.append(lin)
            elif all(isinstance(m, nn.BatchNorm1d) and m.track_running_stats and m.affine for m in same):
                if len({m.eps for m in same}) != 1:
                    return None
                bn = nn.BatchNorm1d(sum(m.num_features for m in same), eps=same[0].eps)
                for a in ("running_mean", "running_var", "weight", "bias"):
                    getattr(bn, a).copy_(torch.cat([getattr(m, a) for m in same]))
                out.append(bn)
            elif all(isinstance(m, nn.ReLU) for m in same):
                out.append(nn.ReLU())
            elif not all(isinstance(m, (nn.Dropout, nn.Identity)) for m in same):
                return None
    if not out or not isinstance(out[-1], nn.Linear) or out[-1].out_features != len(rests):
        return None
    return nn.Sequential(*out).eval().requires_grad_(False)


def fusable(router: nn.Module | None, models: Sequence[nn.Module]) -> bool:
    """True when a router and its cluster models' serving layouts can share one table."""
    return (
        isinstance(router, LinearRouter)
        and len(models) == router.k
        and all(isinstance(m, FoldedMLP) for m in models)
    )
