"""AdaFS (KDD'22, the authors' code): a controller MLP re-weights the fields of each sample.

* Model side (not architecture): ``BatchNorm1d(d)`` on the embedding, normalising each embedding
  dimension over batch x fields; applied in every mode (``open`` included) when ``batchnorm``.
* Controller (the architecture parameters): ``c = softmax(Dropout(ReLU(BN_N(Linear_{N*d -> N}(E)))))``
  per sample, reading the normalised embedding (PyTorch default init: the authors' ``weight_init`` is
  a no-op). Our flattening is field-major (the authors' is dim-major): a fixed permutation of the
  Linear's inputs, immaterial at a random init.
* Soft: ``E'_{b,f} = c_{b,f} * E_{b,f}``. Hard: the top-``k`` fields of ``c_b``, their weights
  renormalised to sum 1, the other fields zeroed; the controller learns through the kept weights.
* ``stochastic`` and ``deterministic`` run the same forward (dropout and BN statistics follow
  ``train()`` / ``eval()``); ``open`` (the pretraining stage) never evaluates the controller.
* No regularizer, no schedule, no derivation: the controller ships at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import Selector


class AdaFSSelector(Selector):
    default_arch_update = "bilevel"
    defaults_from = ("adafs_soft", "selector")

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        vocab_sizes: Sequence[int],
        hard: bool | None = None,
        k: int | None = None,
        dropout: float | None = None,
        batchnorm: bool | None = None,
    ):
        super().__init__(num_fields, embed_dim, vocab_sizes)
        kn = self.knobs(hard=hard, k=k, dropout=dropout, batchnorm=batchnorm)
        hard, k, dropout, batchnorm = kn["hard"], kn["k"], kn["dropout"], kn["batchnorm"]
        n, d = self.num_fields, self.embed_dim
        self.hard = bool(hard)
        self.k = n // 2 if k is None else int(k)
        if not 1 <= self.k <= n:
            raise ValueError(f"AdaFS k must be in 1..{n} (got {self.k})")
        self.emb_bn = nn.BatchNorm1d(d) if batchnorm else None
        self.controller = nn.Sequential(
            nn.Linear(n * d, n), nn.BatchNorm1d(n), nn.ReLU(), nn.Dropout(dropout)
        )

    def normalise(self, e: torch.Tensor) -> torch.Tensor:
        """The embedding BatchNorm (each dim over batch x fields), flat [B, N*d] in and out."""
        if self.emb_bn is None:
            return e
        return self.emb_bn(e.reshape(-1, self.embed_dim)).reshape(e.shape[0], -1)

    def weights(self, e: torch.Tensor) -> torch.Tensor:
        """The controller's per-sample field weights c [B, N] (softmax over fields)."""
        return torch.softmax(self.controller(e), dim=1)

    def forward(self, e: torch.Tensor, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        e = self.normalise(e)
        if mode == "open":
            return e, {}
        c = self.weights(e)
        if self.hard:
            top, idx = c.topk(self.k, dim=1)
            c = torch.zeros_like(c).scatter(1, idx, top / top.sum(dim=1, keepdim=True))
        out = self.fields(e) * c.unsqueeze(-1)
        return out.reshape(e.shape[0], -1), {"weights": c}

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.controller.parameters())

    def statistics(self) -> dict[str, Any]:
        return {"hard": self.hard, "k": self.k}
