"""The MLP backbone of the paper (section 4.1.4): fully-connected layers (16, 8) with ReLU -> one logit,
on the concatenated embedding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..mlp import MLP


class MLPBackbone(MLP):
    def __init__(
        self,
        field_dims: Sequence[int],
        hidden: Sequence[int] = (16, 8),
        batchnorm: bool = False,
        dropout: float = 0.0,
        **_: Any,
    ):
        super().__init__(sum(int(d) for d in field_dims), hidden, batchnorm=batchnorm, dropout=dropout)
        self.field_dims = [int(d) for d in field_dims]

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(h).squeeze(-1)
