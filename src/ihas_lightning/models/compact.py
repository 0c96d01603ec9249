"""The serving layouts of a retrained cluster model (an MLP-backbone :class:`~.dlrm.DLRM` without
selector): the same function, in fewer and larger ops. :func:`compact` picks one.

**Folded** (:class:`FoldedMLP`, the default where it pays). The MLP's first layer is linear in the
concatenated embedding, so it is a sum over fields: ``W1 [e_1; ...; e_F] = sum_f W1_f e_f``. Each id's
product ``W1_f e_id`` (H1 numbers, the first hidden width) is computed once, when the layout is built,
into one table; at inference the first layer is then one bag-sum of the row's ids (``embedding_bag``),
with no ``[B, sum(dims)]`` intermediate and no matrix product. This is the classic fold of a linear
layer into the lookup (as batch-norm folding does for a convolution). It changes the cost from per dim
to per id: with the paper's MLP (H1 = 16) a cluster model that keeps fields at 1-16 dims costs about
one 16-float lookup per kept field (measured on 4,096 Criteo-shaped rows: 0.21-0.57x the time of the
gather + linear, widths 4-16, H1 16-64). It is used when H1 <= ``FOLD_MAX_RATIO`` x the widest kept field, which
bounds the table's memory at that multiple of the padded layout's.

**Padded** (:class:`CompactMLP`, when the first layer is too wide to fold). A retrained model keeps a
different number of dims per field (0 drops the field), so its :class:`~.embedding.FieldEmbedding`
packs fields by size: one column gather and one lookup per distinct size, then a reorder. The padded
layout computes the same logits with one table of the kept fields, each row zero-padded to the widest
kept field (``width``), one lookup of the kept fields' ids, and the first linear layer with its
columns moved to that padded order (zero columns for the padding, the reorder folded into the weight).

Both give the source model's logits up to float summation order (tested to 1e-6 against the model
and a brute-force loop). They are inference forms: built from a trained model, with no gradients;
:meth:`num_parameters` reports the source's parameters (a derived table is not a parameter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.mlp import MLPBackbone
from .dlrm import DLRM

#: fold the first layer when its width H1 is at most this multiple of the widest kept field
FOLD_MAX_RATIO = 4


def _servable(model: nn.Module) -> bool:
    """An MLP-backbone DLRM with a linear first layer, no selector, plain tables and a kept field."""
    return (
        isinstance(model, DLRM)
        and isinstance(model.backbone, MLPBackbone)
        and isinstance(model.backbone.net[0], nn.Linear)
        and model.selector is None
        and not model.embedding.pruned
        and any(model.field_dims)
    )


def foldable(model: nn.Module) -> bool:
    """True when :class:`FoldedMLP` serves ``model`` and pays: H1 <= FOLD_MAX_RATIO x its widest field."""
    return _servable(model) and model.backbone.net[0].out_features <= FOLD_MAX_RATIO * max(model.field_dims)


def compactable(model: nn.Module) -> bool:
    """True for a model that :class:`CompactMLP` can serve: packed by size (a uniform model is already
    one lookup)."""
    return _servable(model) and not model.embedding.uniform


class _KeptFields(nn.Module):
    """The kept fields' ids of a served model: ``forward_ids(ids [B, kept])`` is the layout's own."""

    def __init__(self, model: DLRM):
        super().__init__()
        model.embedding.materialize()  # entry masks (if any) applied to the weights
        dims = list(model.field_dims)
        self.kept_fields = [f for f, d in enumerate(dims) if d]
        self.num_fields = len(dims)
        self.source_parameters = model.num_parameters()
        self.register_buffer("kept", torch.tensor(self.kept_fields, dtype=torch.long), persistent=False)
        self.kept_vocab = [model.vocab_sizes[f] for f in self.kept_fields]
        offsets = torch.tensor([0, *self.kept_vocab[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)

    def num_parameters(self) -> int:
        return self.source_parameters

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits of the rows ``rows`` of ``x [B, F]``: one gather of exactly the ids this model reads."""
        flat = (rows * x.shape[1]).unsqueeze(1) + self.kept
        return self.forward_ids(torch.take(x, flat))

    def forward(self, x: torch.Tensor, mode: str = "open") -> torch.Tensor:
        """Logits [B] of ids ``x [B, F]`` (``mode`` is accepted for the DLRM signature; there is no selector)."""
        return self.forward_ids(x if len(self.kept_fields) == x.shape[1] else x.index_select(1, self.kept))


class CompactMLP(_KeptFields):
    def __init__(self, model: DLRM):
        if not compactable(model):
            raise ValueError(
                "CompactMLP needs a non-uniform MLP-backbone DLRM without selector or row pruning"
            )
        super().__init__(model)
        dims = list(model.field_dims)
        self.width = max(dims)
        first: nn.Linear = model.backbone.net[0]
        w = first.weight.detach()
        table = torch.zeros(sum(self.kept_vocab), self.width, dtype=w.dtype)
        w1 = torch.zeros(w.shape[0], len(self.kept_fields) * self.width, dtype=w.dtype)
        slices = model.embedding.field_slices()
        with torch.no_grad():
            for s, f in enumerate(self.kept_fields):
                d = dims[f]
                start = int(self.offsets[s])
                table[start : start + self.kept_vocab[s], :d] = model.embedding.field_weight(f)
                w1[:, s * self.width : s * self.width + d] = w[:, slices[f]]
        self.table = nn.Parameter(table, requires_grad=False)
        self.w1 = nn.Parameter(w1, requires_grad=False)
        self.b1 = nn.Parameter(first.bias.detach().clone(), requires_grad=False)
        self.rest = model.backbone.net[1:]  # shared with the source model (ReLU, the other layers)

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B] of the kept fields' ids ``[B, kept]`` (any integer dtype)."""
        e = F.embedding(ids.long() + self.offsets, self.table).flatten(1)
        return self.rest(F.linear(e, self.w1, self.b1)).squeeze(-1)


def bag_sum(idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[idx].sum(1)`` for ids ``[B, n]``: one ``embedding_bag`` (no ``[B, n, width]``
    intermediate); a lookup + sum under export (ONNX has no bag op: its decomposition is a loop)."""
    if torch.compiler.is_exporting():
        return F.embedding(idx, table).sum(1)
    return F.embedding_bag(idx, table, mode="sum")


class FoldedMLP(_KeptFields):
    def __init__(self, model: DLRM):
        if not _servable(model):
            raise ValueError("FoldedMLP needs an MLP-backbone DLRM without selector or row pruning")
        super().__init__(model)
        first: nn.Linear = model.backbone.net[0]
        w = first.weight.detach()
        self.hidden = int(w.shape[0])
        table = torch.empty(sum(self.kept_vocab), self.hidden, dtype=w.dtype)
        slices = model.embedding.field_slices()
        with torch.no_grad():
            for s, f in enumerate(self.kept_fields):
                start = int(self.offsets[s])
                # every id's share of the first layer: W1_f e_id
                table[start : start + self.kept_vocab[s]] = (
                    model.embedding.field_weight(f) @ w[:, slices[f]].t()
                )
        self.table = nn.Parameter(table, requires_grad=False)
        self.b1 = nn.Parameter(first.bias.detach().clone(), requires_grad=False)
        self.rest = model.backbone.net[1:]  # shared with the source model (ReLU, the other layers)

    def first_layer(self, ids: torch.Tensor) -> torch.Tensor:
        """The first layer's output before its activation, ``[B, H1]``, of the kept fields' ids."""
        return bag_sum(ids.long() + self.offsets, self.table) + self.b1

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B] of the kept fields' ids ``[B, kept]`` (any integer dtype)."""
        return self.rest(self.first_layer(ids)).squeeze(-1)


def compact(model: nn.Module) -> nn.Module:
    """The serving layout of ``model``: folded where it pays (:func:`foldable`), else padded
    (:func:`compactable`), else ``model`` itself."""
    if foldable(model):
        return FoldedMLP(model).eval()
    return CompactMLP(model).eval() if compactable(model) else model
