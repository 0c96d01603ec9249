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
batch and each row takes its own (no data-dependent shapes: the graph exports as it is).

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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B], cluster [B]) of ids ``x [B, F]``."""
        h = bag_sum(x.long() + self.offsets, self.table) + self.bias
        clusters = h[:, : self.k].argmax(1)
        logits = torch.stack(
            [rest(h[:, start : start + n]).squeeze(-1) for rest, (start, n) in zip(self.rest, self.segments)],
            1,
        )
        return logits.gather(1, clusters.unsqueeze(1)).squeeze(1), clusters


def fusable(router: nn.Module | None, models: Sequence[nn.Module]) -> bool:
    """True when a router and its cluster models' serving layouts can share one table."""
    return (
        isinstance(router, LinearRouter)
        and len(models) == router.k
        and all(isinstance(m, FoldedMLP) for m in models)
    )
