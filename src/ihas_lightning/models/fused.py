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
clusters' remaining layers have the same kinds (:class:`StackedTails`), they run side by side as one
chain over all clusters' columns: block-diagonal linear layers and concatenated batchnorm statistics,
so K clusters cost one op per layer instead of K (this module at batch 4096 on the Criteo-shaped set:
0.66 -> 0.51 ms per batch).

It costs one lookup per id of ``K + sum_c H1_c`` floats (34 for two clusters of the paper's MLP)
instead of the router's K-float lookup plus a dispatch of each cluster's rows to its own lookups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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
        self.stacked = StackedTails.of(list(self.rest))  # None: the layers differ, run each cluster's

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


class StackedTails(nn.Module):
    """K clusters' remaining layers (each ``[B, H_c] -> [B, 1]``) as one chain ``[B, sum H_c] -> [B, K]``:
    a linear layer becomes the block-diagonal of the clusters' weights (column c of the output sees only
    cluster c's columns), a batchnorm (eval) the concatenation of their statistics, ReLU / dropout (eval)
    act elementwise. Each output column equals its cluster's own layers up to float summation order
    (the added terms are exact zeros). Serving only: built from eval-mode, frozen copies."""

    ELEMENTWISE = (nn.ReLU, nn.Dropout, nn.Identity)

    def __init__(self, kinds: list[str], eps: list[float]):
        super().__init__()
        self.kinds, self.eps = kinds, eps

    @classmethod
    def of(cls, rests: Sequence[nn.Module]) -> StackedTails | None:
        """The stacked chain of ``rests`` (``nn.Sequential`` each), or None when their layers differ in
        kind or count, or a layer is not linear / batchnorm / elementwise."""
        if not rests or not all(isinstance(r, nn.Sequential) for r in rests):
            return None
        layers = [list(r) for r in rests]
        if len({len(x) for x in layers}) != 1:
            return None
        kinds: list[str] = []
        eps: list[float] = []
        tensors: list[list[torch.Tensor]] = []
        for same in zip(*layers):
            if all(isinstance(m, nn.Linear) for m in same):
                w = torch.block_diag(*[m.weight.detach() for m in same])
                b = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                               for m in same])  # fmt: skip
                kinds.append("linear")
                tensors.append([w, b])
            elif all(isinstance(m, nn.BatchNorm1d) and m.track_running_stats and m.affine for m in same):
                if len({m.eps for m in same}) != 1:
                    return None
                kinds.append("batchnorm")
                eps.append(float(same[0].eps))
                tensors.append([torch.cat([getattr(m, a).detach() for m in same])
                                for a in ("running_mean", "running_var", "weight", "bias")])  # fmt: skip
            elif all(isinstance(m, nn.ReLU) for m in same):
                kinds.append("relu")
                tensors.append([])
            elif all(isinstance(m, cls.ELEMENTWISE) and not isinstance(m, nn.ReLU) for m in same):
                continue  # dropout / identity: nothing at serving time
            else:
                return None
        if not kinds or kinds[-1] != "linear" or tensors[-1][0].shape[0] != len(rests):
            return None
        out = cls(kinds, eps)
        for i, ts in enumerate(tensors):
            for j, t in enumerate(ts):
                out.register_buffer(f"t{i}_{j}", t.clone(), persistent=False)
        return out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        eps = iter(self.eps)
        for i, kind in enumerate(self.kinds):
            if kind == "linear":
                h = F.linear(h, getattr(self, f"t{i}_0"), getattr(self, f"t{i}_1"))
            elif kind == "batchnorm":
                mean, var, w, b = (getattr(self, f"t{i}_{j}") for j in range(4))
                h = F.batch_norm(h, mean, var, w, b, training=False, eps=next(eps))
            else:
                h = F.relu(h)
        return h


def fusable(router: nn.Module | None, models: Sequence[nn.Module]) -> bool:
    """True when a router and its cluster models' serving layouts can share one table."""
    return (
        isinstance(router, LinearRouter)
        and len(models) == router.k
        and all(isinstance(m, FoldedMLP) for m in models)
    )
