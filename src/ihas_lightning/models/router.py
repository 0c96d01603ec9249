"""The distilled router of routed iHAS (fast routing at inference).

Exact routing runs the searched embedding (N fields x d dims) and the Bernoulli gate (an N*d x N*d
linear layer, 624 x 624 on Criteo) on every sample only to find its cluster. The distilled router
predicts that cluster from the raw ids with a K-way linear classifier, one lookup of K numbers per
field:

    logits_k(x) = b_k + sum_f W[offset_f + x_f, k],     cluster = argmax_k logits_k

It is trained after clustering on the exact assignments (:class:`~ihas_lightning.modules.router.
RouterModule`); its agreement with the exact assignment and the routed model's AUC with it are
reported by ``stage=evaluate``. The exact path stays available (``routing=exact``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LinearRouter(nn.Module):
    def __init__(self, vocab_sizes: Sequence[int], k: int, sparse: bool = True):
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.k = int(k)
        offsets = torch.tensor([0, *self.vocab_sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.weight = nn.Embedding(sum(self.vocab_sizes), self.k, sparse=sparse)
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(self.k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster logits [B, K] of ids x [B, F]."""
        idx = x.long() + self.offsets
        if torch.compiler.is_exporting():  # ONNX has no bag op (its decomposition is a loop): lookup + sum
            return self.weight(idx).sum(1) + self.bias
        # one bag-sum over the fields: no [B, F, K] intermediate (2x faster than a lookup + sum on CPU)
        return F.embedding_bag(idx, self.weight.weight, mode="sum", sparse=self.weight.sparse) + self.bias

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster id [B] of each sample."""
        return self.forward(x).argmax(1)
