"""The distilled router of routed iHAS (fast routing at inference).

Exact routing runs the searched embedding (N fields x d dims) and the Bernoulli gate (an N*d x N*d
linear layer, 624 x 624 on Criteo) on every sample only to find its cluster. The distilled router
predicts that cluster from the raw ids with a K-way linear classifier, one lookup of K numbers per
field:

    logits_k(x) = b_k + sum_f W[offset_f + x_f, k],     cluster = argmax_k logits_k

It is trained after clustering on the exact assignments (:class:`~ihas_lightning.modules.router.
RouterModule`), in one of two ways (``cluster.router.features``):

* ``embedding`` (the default): a linear classifier on the searched embedding ``E`` (standardised),
  ``logits = V (E - mu) / sigma + b``. It is linear in each field's embedding row, so it folds into the
  id table exactly (:meth:`LinearRouter.folded`): ``W[offset_f + id] = (V_f / sigma_f) e_id``. The
  serving cost is the same K numbers per id; it generalises from the embedding the search trained on
  every row (rare ids included), where a table fitted per id only learns the ids of the router's rows
  (measured on the shared Criteo sample: 0.97 test agreement against 0.86);
* ``ids``: the table fitted directly, one row per id.

Its agreement with the exact assignment and the routed model's AUC with it are reported by
``stage=evaluate``. The exact path stays available (``routing=exact``).
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

    @classmethod
    @torch.no_grad()
    def folded(
        cls,
        field_weights: Sequence[torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> LinearRouter:
        """The router equal to the linear classifier ``weight (E - mean) / std + bias`` [K] on the flat
        embedding ``E = [e_1; ...; e_F]``, where field f's rows are ``field_weights[f]`` ([vocab_f, d_f],
        in the flat order): each id's row is that classifier's share of its field, ``(V_f / std_f) e_id``,
        and the bias takes the constant ``b - V mean / std``."""
        k, width = weight.shape
        dims = [int(w.shape[1]) for w in field_weights]
        if sum(dims) != width:
            raise ValueError(f"a classifier on {width} features for fields of {sum(dims)} dims")
        v = weight / std  # [K, D]
        out = cls([int(w.shape[0]) for w in field_weights], k)
        start = 0
        for f, (w, d) in enumerate(zip(field_weights, dims)):
            lo = int(out.offsets[f])
            out.weight.weight[lo : lo + w.shape[0]] = w @ v[:, start : start + d].t()
            start += d
        out.bias.copy_(bias - v @ mean)
        return out
