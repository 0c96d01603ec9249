"""``RetrainModule``: one cluster-customised DLRM of the retraining stage (paper section 3.5.3).

The model is ``DLRM(vocab_sizes, field_dims=dims_of_cluster)``: each field gets the number of
embedding dimensions the cluster's majority rule kept (0 removes the field: no table, no MLP
input), so the MLP (16, 8) sees a narrower input than the Base model's.

Initialisation (``retrain.init``):

* ``searched`` (paper): each kept dimension's column is copied from the searched embedding table
  V, i.e. field f's new ``[vocab_f, d_f]`` table is ``V_f[:, kept_dims_f]``. The MLP starts fresh.
* ``scratch``: every parameter freshly initialised.
* ``rewind``: every weight taken from a tagged snapshot of the search (e.g. OptFS's start of search
  epoch 1: the lottery-ticket rewind), the kept rows / dims of each field and the backbone.
* ``continue``: the same from the searched model's final weights (a fine-tune of the search model).

The retrain guard's fallback (``method.retrain_guard: base``) is :meth:`RetrainModule.from_base`: a
module of the same class at full dims (every field ``model.embed_dim``, every dim kept) holding Base's
weights, marked ``fallback="base"`` in its hyperparameters; its logits are Base's.

A row-pruned model (``row_counts``: kept rows per field) holds only the kept feature values' rows
(:class:`~ihas_lightning.models.embedding.FieldEmbedding`); its id map is filled by
:meth:`set_row_keep` before training.

Training, evaluation and logging are :class:`~ihas_lightning.modules.ctr.CTRModule`'s (gate-less,
``open`` mode), on the cluster's own samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..models import DLRM
from .ctr import CTRModule

INITS = ("searched", "scratch", "rewind", "continue")


class RetrainModule(CTRModule):
    def __init__(
        self,
        vocab_sizes: Sequence[int],
        model: dict[str, Any],
        field_dims: Sequence[int],
        kept_dims: Sequence[Sequence[int]] | None = None,
        cluster_id: int = 0,
        field_names: Sequence[str] | None = None,
        output_bias: float | None = None,
        row_counts: Sequence[int] | None = None,
        entry_masked: bool = False,
        fallback: str | None = None,
    ):
        super().__init__(
            vocab_sizes,
            model,
            field_dims=list(field_dims),
            gate=None,
            field_names=field_names,
            output_bias=output_bias,
            row_counts=row_counts,
            entry_masked=entry_masked,
            # each kept dim at its original position (pairwise interactions of FM-style backbones)
            positions=[list(map(int, k)) for k in kept_dims] if kept_dims is not None else None,
        )
        self.save_hyperparameters()
        self.cluster_id = int(cluster_id)
        # "base": the retrain guard replaced this cluster's model by Base's (full dims, Base's weights)
        self.fallback = None if fallback is None else str(fallback)
        self.kept_dims = [list(map(int, k)) for k in kept_dims] if kept_dims is not None else None
        if self.kept_dims is not None:
            got = [len(k) for k in self.kept_dims]
            if got != list(self.model.field_dims):
                raise ValueError(f"kept dims per field {got} do not match field dims {self.model.field_dims}")

    @classmethod
    def from_base(
        cls, base: DLRM, model: dict[str, Any], cluster_id: int = 0, field_names: Sequence[str] | None = None
    ) -> RetrainModule:
        """Cluster ``cluster_id``'s model as Base's: every field at Base's ``embed_dim`` with every dim
        kept, Base's embedding and backbone weights (``model``: Base's ``model.*`` config, so the
        backbone is built the same). A ValueError when Base is not a plain (selector-less, uniform,
        unpruned) model or its state dict does not fit."""
        if base.selector is not None or not base.embedding.uniform or base.embedding.pruned:
            raise ValueError("Base must be a plain model (no selector, uniform unpruned embedding tables)")
        d, n = int(base.embed_dim), len(base.vocab_sizes)
        module = cls(base.vocab_sizes, {**dict(model), "embed_dim": d}, field_dims=[d] * n,
                     kept_dims=[list(range(d))] * n, cluster_id=cluster_id, field_names=field_names,
                     fallback="base")  # fmt: skip
        try:
            module.model.load_state_dict(base.state_dict(), strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"Base's weights do not fit a full-dims cluster model: {str(e).splitlines()[0]}"
            ) from None
        return module

    def set_row_keep(self, row_keep: torch.Tensor) -> None:
        self.model.embedding.set_row_keep(row_keep)

    def set_entry_mask(self, mask: torch.Tensor) -> None:
        self.model.embedding.set_entry_mask(mask)

    @torch.no_grad()
    def init_from_searched(self, searched: DLRM) -> None:
        """Copy each kept dimension of each field from the searched (uniform) embedding tables."""
        if self.kept_dims is None:
            raise ValueError("init_from_searched needs kept_dims")
        if list(searched.vocab_sizes) != list(self.model.vocab_sizes):
            raise ValueError("the searched model's vocab sizes differ from this model's")
        src, dst = searched.embedding, self.model.embedding
        for f, kept in enumerate(self.kept_dims):
            if kept:
                dst.load_field(f, src.field_weight(f), kept)

    @torch.no_grad()
    def init_from_snapshot(self, state: dict[str, torch.Tensor]) -> None:
        """Rewind: each kept row / dim of each field from a snapshot of the (uniform) search model's
        state dict, and the backbone's weights (their shapes must match: same kept input width)."""
        if self.kept_dims is None:
            raise ValueError("init_from_snapshot needs kept_dims")
        table = state.get("embedding.tables.0.weight")
        vocab = self.model.vocab_sizes
        if table is None or table.shape[0] != sum(vocab):
            raise ValueError("the snapshot is not a uniform search model over this vocabulary")
        start = 0
        for f, kept in enumerate(self.kept_dims):
            if kept:
                self.model.embedding.load_field(f, table[start : start + vocab[f]], kept)
            start += vocab[f]
        own = self.model.backbone.state_dict()
        src = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        tables = {
            n + ".weight" for n, m in self.model.backbone.named_modules() if isinstance(m, torch.nn.Embedding)
        }
        first = next(
            (k for k, v in own.items() if k.endswith("weight") and v.dim() == 2 and k not in tables), None
        )
        if first is not None and first in src and src[first].shape[1] != own[first].shape[1]:
            # a narrower model: its first layer reads the kept dims only, so take their columns
            d = table.shape[1]
            cols = [f * d + j for f, kept in enumerate(self.kept_dims) for j in kept]
            if src[first].shape[1] == len(vocab) * d and len(cols) == own[first].shape[1]:
                src[first] = src[first][:, torch.tensor(cols, dtype=torch.long)]
        bad = [k for k, v in own.items() if k not in src or src[k].shape != v.shape]
        if bad:
            raise ValueError(
                f"the snapshot's backbone does not fit this model ({bad[0]}): rewind needs the same kept "
                "input width; use retrain.init=scratch"
            )
        self.model.backbone.load_state_dict(src)
