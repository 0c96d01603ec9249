"""The serving layout of a retrained cluster model (an MLP-backbone :class:`~.dlrm.DLRM` with per-field
sizes): the same function, in fewer and larger ops.

A retrained model keeps a different number of dims per field (0 drops the field), so its
:class:`~.embedding.FieldEmbedding` packs fields by size: one column gather and one lookup per distinct
size, then a reorder back to field order for the MLP. At inference that costs more per row than Base's
single lookup (measured: 2.1 ms against Base's 1.4 ms for a batch of 4096 Criteo-shaped rows, with about
half of Base's dims). :class:`CompactMLP` computes the same logits with

* one table of the kept fields, each row zero-padded to the widest kept field (``width``);
* one lookup of the kept fields' ids: ``[B, kept, width]``, flattened;
* the first linear layer with its columns moved to that padded order (zero columns for the padding,
  the reorder folded into the weight, as batch-norm folding does), then the MLP's other layers as they are.

Its cost per row is therefore never more than Base's (never more fields, never wider than the full dim),
minus what the cluster dropped. The logits equal the source model's up to float summation order
(tested to 1e-6). It is an inference form: it is built from a trained model and holds no gradients;
:meth:`num_parameters` reports the source's parameters (the padding is not a parameter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.mlp import MLPBackbone
from .dlrm import DLRM


def compactable(model: nn.Module) -> bool:
    """True for a DLRM that :class:`CompactMLP` can serve: the MLP backbone, no selector, plain (not
    row-pruned) tables, at least one kept field, and packed by size (a uniform model is already compact)."""
    return (
        isinstance(model, DLRM)
        and isinstance(model.backbone, MLPBackbone)
        and isinstance(model.backbone.net[0], nn.Linear)
        and model.selector is None
        and not model.embedding.pruned
        and any(model.field_dims)
        and not model.embedding.uniform
    )


class CompactMLP(nn.Module):
    def __init__(self, model: DLRM):
        super().__init__()
        if not compactable(model):
            raise ValueError(
                "CompactMLP needs a non-uniform MLP-backbone DLRM without selector or row pruning"
            )
        model.embedding.materialize()  # entry masks (if any) applied to the weights
        dims = list(model.field_dims)
        kept = [f for f, d in enumerate(dims) if d]
        self.num_fields = len(dims)
        self.width = max(dims)
        self.source_parameters = model.num_parameters()
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long), persistent=False)
        vocab = [model.vocab_sizes[f] for f in kept]
        offsets = torch.tensor([0, *vocab[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        first: nn.Linear = model.backbone.net[0]
        w = first.weight.detach()
        table = torch.zeros(sum(vocab), self.width, dtype=w.dtype)
        w1 = torch.zeros(w.shape[0], len(kept) * self.width, dtype=w.dtype)
        slices = model.embedding.field_slices()
        with torch.no_grad():
            for s, f in enumerate(kept):
                d = dims[f]
                table[int(offsets[s]) : int(offsets[s]) + vocab[s], :d] = model.embedding.field_weight(f)
                w1[:, s * self.width : s * self.width + d] = w[:, slices[f]]
        self.table = nn.Parameter(table, requires_grad=False)
        self.w1 = nn.Parameter(w1, requires_grad=False)
        self.b1 = nn.Parameter(first.bias.detach().clone(), requires_grad=False)
        self.rest = model.backbone.net[1:]  # shared with the source model (ReLU, the other layers)

    def num_parameters(self) -> int:
        return self.source_parameters

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B] of the kept fields' ids ``[B, kept]`` (any integer dtype)."""
        e = F.embedding(ids.long() + self.offsets, self.table).flatten(1)
        return self.rest(F.linear(e, self.w1, self.b1)).squeeze(-1)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits of the rows ``rows`` of ``x [B, F]``: one gather of exactly the ids this model reads."""
        flat = (rows * x.shape[1]).unsqueeze(1) + self.kept
        return self.forward_ids(torch.take(x, flat))

    def forward(self, x: torch.Tensor, mode: str = "open") -> torch.Tensor:
        """Logits [B] of ids ``x [B, F]`` (``mode`` is accepted for the DLRM signature; there is no selector)."""
        return self.forward_ids(x.index_select(1, self.kept))


def compact(model: nn.Module) -> nn.Module:
    """The serving layout of ``model`` when it has one (:func:`compactable`), else ``model`` itself."""
    return CompactMLP(model).eval() if compactable(model) else model
