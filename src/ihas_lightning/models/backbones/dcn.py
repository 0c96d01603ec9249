"""DCN (Wang et al. 2017, "Deep & Cross Network"; v1 cross layers with a weight VECTOR per layer,
``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l``): the cross network and the MLP's hidden layers run in
parallel on the (selected) embedding, and one linear layer on their concatenation gives the logit.
We use v1, not DCN-v2's full-rank ``W_l``: on Criteo (624 inputs) one v2 layer alone has 390k
weights, ten times the Base model's dense part."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..mlp import deep_layers
from .parts import CrossNetwork


class DCNBackbone(nn.Module):
    def __init__(
        self,
        field_dims: Sequence[int],
        hidden: Sequence[int] = (16, 8),
        batchnorm: bool = False,
        dropout: float = 0.0,
        cross_layers: int = 3,
        **_: Any,
    ):
        super().__init__()
        if int(cross_layers) < 1:
            raise ValueError(f"cross_layers must be >= 1 (got {cross_layers})")
        self.field_dims = [int(d) for d in field_dims]
        width = sum(self.field_dims)
        self.cross = CrossNetwork(width, int(cross_layers))
        self.deep, out = deep_layers(width, hidden, batchnorm, dropout)
        self.out = nn.Linear(width + out, 1)

    @torch.no_grad()
    def set_output_bias(self, value: float) -> None:
        self.out.bias.fill_(value)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(torch.cat([self.cross(h), self.deep(h)], dim=1)).squeeze(-1)
