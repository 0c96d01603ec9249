"""The MLP component (paper: two fully-connected layers (16, 8) with ReLU) producing one logit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def deep_layers(
    in_dim: int, hidden: Sequence[int], batchnorm: bool, dropout: float
) -> tuple[nn.Sequential, int]:
    """The fully-connected ReLU layers (without the output layer) and their output width."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers.append(nn.Linear(d, int(h)))
        if batchnorm:
            layers.append(nn.BatchNorm1d(int(h)))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = int(h)
    return nn.Sequential(*layers), d


class MLP(nn.Module):
    def __init__(
        self, in_dim: int, hidden: Sequence[int] = (16, 8), batchnorm: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        deep, d = deep_layers(in_dim, hidden, batchnorm, dropout)
        self.net = nn.Sequential(*deep, nn.Linear(d, 1))
        self.in_dim = in_dim

    @torch.no_grad()
    def set_output_bias(self, value: float) -> None:
        """Set the output layer's bias (e.g. the log-odds of the base rate)."""
        self.net[-1].bias.fill_(value)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)
