"""The deep recommendation model: per-field embedding -> selector -> backbone.

* Base model:       ``DLRM(vocab_sizes)``                         (no selector)
* iHAS search:      ``DLRM(vocab_sizes, gate=dict(tau=..))``      (the Bernoulli selector)
* any method:       ``DLRM(vocab_sizes, selector={"_target_": ..., **knobs})`` (or a Selector)
* retrained model:  ``DLRM(vocab_sizes, field_dims=[...])``       (per-field sizes, 0 drops a field)
  and/or ``row_counts=[...]`` (row-pruned tables, see :class:`FieldEmbedding`)

Parameter groups are derived from the structure, never from a named attribute: the embedding tables;
the selector's architecture parameters (:meth:`Selector.arch_parameters`); and everything else (the
backbone, and any model-side layer of the selector) is a dense model parameter. A parameter a new
backbone adds is therefore trained without touching this file (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .backbones import build_backbone
from .embedding import FieldEmbedding
from .gate import BernoulliGate
from .selectors.base import Selector
from .selectors.bernoulli import BernoulliSelector


def init_linear(m: nn.Module) -> None:
    """FuxiCTR's init of a dense layer: xavier-normal weights, zero biases. PyTorch's default draws the
    biases from U(+-1/sqrt(fan_in)); with the 8 units of the paper's second layer and inputs of the
    embeddings' scale (1e-2), each unit is alive for every row or for none, by its bias's sign alone, and
    a seed that draws 8 negative biases (1 in 256) starts with a dead network: a constant prediction that
    no gradient can leave (measured: avazu at 3% positives, seed 0, val AUC 0.5 for 9 epochs). With
    zero biases each unit is alive on about half the rows."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


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
        selector: Selector | dict[str, Any] | None = None,
        backbone: str = "mlp",
        row_counts: Sequence[int] | None = None,
        entry_masked: bool = False,
        positions: Sequence[Sequence[int]] | None = None,
        backbone_args: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.embed_dim = int(embed_dim)
        dims = list(field_dims) if field_dims is not None else [self.embed_dim] * len(self.vocab_sizes)
        self.embedding = FieldEmbedding(
            self.vocab_sizes, dims, sparse=sparse, row_counts=row_counts, entry_masked=entry_masked
        )
        self.field_dims = self.embedding.dims
        self.backbone_name = backbone
        # a model whose every field was dropped still predicts: the backbone's bias only (input width 0)
        # ``positions``: the original dim index of each kept dim per field (a retrained model's kept
        # dims), so pairwise inner products equal those of the masked full model
        self.positions = [list(map(int, p)) for p in positions] if positions is not None else None
        self.backbone = build_backbone(
            backbone,
            list(self.field_dims),
            vocab_sizes=self.vocab_sizes,
            embed_dim=self.embed_dim,
            positions=self.positions,
            sparse=sparse,
            hidden=tuple(hidden),
            batchnorm=batchnorm,
            dropout=dropout,
            **dict(backbone_args or {}),
        )
        self.backbone.apply(init_linear)
        # the selector is built last, on a forked random stream: the embedding and the backbone are
        # initialised exactly as the Base model's (same seed, same numbers), so a gates-open search
        # model is Base until its gate moves (the no-harm selection's reference and fallback)
        self.selector = self._build_selector(gate, selector)

    def _build_selector(self, gate: dict[str, Any] | None, selector: Selector | dict[str, Any] | None):
        if gate is not None and selector is not None:
            raise ValueError("give either gate= (the Bernoulli selector) or selector=, not both")
        if gate is None and selector is None:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() + 1)
            if gate is not None:
                selector = BernoulliSelector(len(self.vocab_sizes), self.embed_dim, self.vocab_sizes, **gate)
            elif isinstance(selector, dict):
                from .selectors import build_selector

                selector = build_selector(selector, len(self.vocab_sizes), self.embed_dim, self.vocab_sizes)
        if not self.embedding.uniform:
            raise ValueError("a selector needs uniform field dims")
        return selector

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    @property
    def mlp(self) -> nn.Module:
        """The backbone (the MLP of the paper; kept under this name for readers of the paper)."""
        return self.backbone

    @property
    def gate(self) -> BernoulliGate | None:
        """iHAS's Bernoulli gate when the selector is one, else None."""
        return self.selector.gate if isinstance(self.selector, BernoulliSelector) else None

    def fold_gate(self, max_bytes: int | None = None) -> str:
        """Fold iHAS's gate into the id table for inference (:mod:`ihas_lightning.models.folded_gate`):
        the deterministic masks' logits in one lookup and sum. Returns what was done, for the log."""
        if not isinstance(self.selector, BernoulliSelector):
            return "no Bernoulli gate"
        if not self.selector.fold(self.embedding, max_bytes):
            return "not folded (the gate's matmul is kept)"
        f = self.selector.folded
        if f.constant:
            return "folded to its bias (the gate does not depend on the sample)"
        return f"folded into the id table ({f.nbytes / 2**20:,.0f} MiB)"

    def unfold_gate(self) -> None:
        if isinstance(self.selector, BernoulliSelector):
            self.selector.unfold()

    def backbone_tables(self) -> list[nn.Parameter]:
        """Per-id tables a backbone adds (e.g. FM's first-order weights): trained like the embedding."""
        return [m.weight for m in self.backbone.modules() if isinstance(m, nn.Embedding)]

    def embedding_parameters(self) -> list[nn.Parameter]:
        return list(self.embedding.parameters()) + self.backbone_tables()

    def arch_parameters(self) -> list[nn.Parameter]:
        return self.selector.arch_parameters() if self.selector is not None else []

    gate_parameters = arch_parameters

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is neither an embedding table nor an architecture parameter."""
        skip = {id(p) for p in self.embedding_parameters() + self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    # ---- forward -----------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flat concatenated embedding E [B, sum(field_dims)]."""
        return self.embedding(x)

    def select(self, e: torch.Tensor, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.selector is None:
            return e, {}
        return self.selector(e, x, mode)

    def forward_aux(self, x: torch.Tensor, mode: str = "open") -> tuple[torch.Tensor, dict[str, Any]]:
        """(logits [B], the selector's aux dict) in ``mode`` (open | stochastic | deterministic)."""
        e = self.embed(x)
        h, aux = self.select(e, x, mode)
        return self.backbone(h, x), aux

    def forward(self, x: torch.Tensor, mode: str = "open") -> torch.Tensor:
        """Logits [B]. ``mode`` is the selector mode (ignored without a selector)."""
        return self.forward_aux(x, mode)[0]

    # ---- iHAS's gate (kept for the cluster stage and routing) ----------------------------------------
    def gate_output(self, e: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, p) for embedding e; needs a Bernoulli gate."""
        if self.gate is None:
            raise RuntimeError("this model has no Bernoulli gate")
        return self.gate(e.detach(), mode)

    def forward_with_gate(
        self, x: torch.Tensor, mode: str = "open"
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits [B], mask [B, D] or None, p [B, D] or None)."""
        logits, aux = self.forward_aux(x, mode)
        return logits, aux.get("mask"), aux.get("p")

    @torch.no_grad()
    def masked_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministically masked embedding (the clustering input) and the mask: ([B, D], [B, D])."""
        e = self.embed(x)
        mask, _ = self.gate_output(e, "deterministic")
        return e * mask, mask

    # ---- size ----------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameters used at inference (embedding tables + selector + backbone)."""
        return sum(self.parameter_counts()[k] for k in ("embedding", "dense", "selector"))

    def parameter_counts(self) -> dict[str, int]:
        """Embedding values (kept rows x dims), the selector's parameters (arch + model-side), the
        backbone's (its per-id tables, e.g. first-order weights, count as embedding), and the index entries of a row-pruned table, counted from the model as built."""
        sel = sum(p.numel() for p in self.selector.parameters()) if self.selector is not None else 0
        tables = sum(p.numel() for p in self.backbone_tables())
        return {
            "embedding": self.embedding.embedding_entries() + tables,
            "selector": sel,
            "dense": sum(p.numel() for p in self.backbone.parameters()) - tables,
            "index": self.embedding.index_entries(),
        }
