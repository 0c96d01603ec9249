"""Wide & Deep (Cheng et al. 2016): the wide part is the first-order term over the raw feature values
(one weight per value, as a linear model over one-hot features), the deep part the MLP on the
(selected) embedding; their logits add. The paper's W&D has no hand-made cross-product features, and
neither do we."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..mlp import MLP
from .parts import FirstOrder


class WideDeepBackbone(nn.Module):
    def __init__(
        self,
        field_dims: Sequence[int],
        vocab_sizes: Sequence[int],
        hidden: Sequence[int] = (16, 8),
        batchnorm: bool = False,
        dropout: float = 0.0,
        sparse: bool = True,
        **_: Any,
    ):
        super().__init__()
        self.field_dims = [int(d) for d in field_dims]
        self.linear = FirstOrder(vocab_sizes, self.field_dims, sparse=sparse)
        self.deep = MLP(sum(self.field_dims), hidden, batchnorm=batchnorm, dropout=dropout)

    def set_output_bias(self, value: float) -> None:
        self.deep.set_output_bias(value)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.deep(h)
