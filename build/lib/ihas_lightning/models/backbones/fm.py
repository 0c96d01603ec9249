"""FM (Rendle 2010): ``bias + sum_f w[x_f] + sum_{a<b} <v_a, v_b>`` -- the first-order term per feature
value and the pairwise inner products of the (selected) field embeddings, each field's kept dims at
their original positions (:class:`~.parts.PairwiseFM`). No hidden layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .parts import FirstOrder, PairwiseFM


class FMBackbone(nn.Module):
    def __init__(
        self,
        field_dims: Sequence[int],
        vocab_sizes: Sequence[int],
        embed_dim: int = 16,
        positions=None,
        sparse: bool = True,
        **_: Any,
    ):
        super().__init__()
        self.field_dims = [int(d) for d in field_dims]
        self.linear = FirstOrder(vocab_sizes, self.field_dims, sparse=sparse)
        self.pairwise = PairwiseFM(self.field_dims, embed_dim, positions)
        self.bias = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def set_output_bias(self, value: float) -> None:
        self.bias.fill_(value)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.bias + self.linear(x) + self.pairwise(h)
