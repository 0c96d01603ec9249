"""The MLP backbone of the paper (section 4.1.4): fully-connected layers (16, 8) with ReLU -> one logit,
on the concatenated embedding."""

from __future__ import annotations

from collections.abc import Sequence

from ..mlp import MLP


class MLPBackbone(MLP):
    def __init__(
        self,
        field_dims: Sequence[int],
        hidden: Sequence[int] = (16, 8),
        batchnorm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(sum(int(d) for d in field_dims), hidden, batchnorm=batchnorm, dropout=dropout)
        self.field_dims = [int(d) for d in field_dims]
