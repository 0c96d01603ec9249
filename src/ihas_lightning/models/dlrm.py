"""The deep recommendation model (DLRM) of the paper: embedding layer + (optional) Bernoulli gate + MLP.

* Base model:       ``DLRM(vocab_sizes)``                      (no gate)
* Search model:     ``DLRM(vocab_sizes, gate=dict(tau=..))``   (uniform dims, Bernoulli gate)
* Retrained model:  ``DLRM(vocab_sizes, field_dims=[...])``    (per-field sizes, 0 drops a field)

The gate reads the (detached) concatenated embedding E_i and yields the mask m_i; the MLP sees
E_i * m_i. Detaching the gate input keeps the two levels of the bi-level optimisation disjoint:
the model step's loss reaches V only through the masked embedding, never by moving the gate's
input, and the gate step updates the gate's weights only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .embedding import FieldEmbedding
from .gate import BernoulliGate
from .mlp import MLP


class DLRM(nn.Module):
    def __init__(
        self,
        vocab_sizes: Sequence[int],
        embed_dim: int = 16,
        field_dims: Sequence[int] | None = None,
        hidden: Sequence[int] = (16, 8),
        batchnorm: bool = False,
        dropout: float = 0.0,
        gate: dict[str, Any] | None = None,
        sparse: bool = True,
    ):
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.embed_dim = int(embed_dim)
        dims = list(field_dims) if field_dims is not None else [self.embed_dim] * len(self.vocab_sizes)
        self.embedding = FieldEmbedding(self.vocab_sizes, dims, sparse=sparse)
        self.field_dims = self.embedding.dims
        in_dim = self.embedding.output_dim
        if gate is not None and not self.embedding.uniform:
            raise ValueError("the Bernoulli gate needs uniform field dims")
        self.gate = BernoulliGate(in_dim, **gate) if gate is not None else None
        # a model whose every field was dropped still predicts: the MLP's bias only (input width 0)
        self.mlp = MLP(in_dim, hidden, batchnorm=batchnorm, dropout=dropout)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flat concatenated embedding E [B, sum(field_dims)]."""
        return self.embedding(x)

    def gate_output(self, e: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, p) for embedding e; needs a gate."""
        if self.gate is None:
            raise RuntimeError("this model has no Bernoulli gate")
        return self.gate(e.detach(), mode)

    def forward(self, x: torch.Tensor, mode: str = "open") -> torch.Tensor:
        """Logits [B]. ``mode`` is the gate mode (ignored without a gate)."""
        return self.forward_with_gate(x, mode)[0]

    def forward_with_gate(
        self, x: torch.Tensor, mode: str = "open"
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits [B], mask [B, D] or None, p [B, D] or None)."""
        e = self.embed(x)
        if self.gate is None or mode == "open":
            return self.mlp(e), None, None
        mask, p = self.gate_output(e, mode)
        return self.mlp(e * mask), mask, p

    @torch.no_grad()
    def masked_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministically masked embedding (the clustering input) and the mask: ([B, D], [B, D])."""
        e = self.embed(x)
        mask, _ = self.gate_output(e, "deterministic")
        return e * mask, mask

    def embedding_parameters(self) -> list[nn.Parameter]:
        return list(self.embedding.parameters())

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.mlp.parameters())

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gate.parameters()) if self.gate is not None else []

    def num_parameters(self) -> int:
        """Parameters used at inference (embedding tables + MLP + gate if present)."""
        return sum(p.numel() for p in self.parameters())
