"""DeepFM (Guo et al. 2017): FM (first-order term + pairwise interactions) and an MLP on the SAME
(selected) embedding; their logits add."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..mlp import MLP
from .parts import FirstOrder, PairwiseFM


class DeepFMBackbone(nn.Module):
    def __init__(
        self,
        field_dims: Sequence[int],
        vocab_sizes: Sequence[int],
        embed_dim: int = 16,
        positions=None,
        hidden: Sequence[int] = (16, 8),
        batchnorm: bool = False,
        dropout: float = 0.0,
        sparse: bool = True,
        **_: Any,
    ):
        super().__init__()
        self.field_dims = [int(d) for d in field_dims]
        self.linear = FirstOrder(vocab_sizes, self.field_dims, sparse=sparse)
        self.pairwise = PairwiseFM(self.field_dims, embed_dim, positions)
        self.deep = MLP(sum(self.field_dims), hidden, batchnorm=batchnorm, dropout=dropout)

    def set_output_bias(self, value: float) -> None:
        self.deep.set_output_bias(value)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.pairwise(h) + self.deep(h)
