"""LightningModule that distils the exact cluster assignment into a :class:`LinearRouter`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..models.embedding import FieldEmbedding
from ..models.router import LinearRouter

ROUTER_FEATURES = ("embedding", "ids")


class RouterModule(L.LightningModule):
    """Cross-entropy of the router's K logits against the exact cluster of each row; the validation
    metric is the agreement (share of rows routed to their exact cluster).

    ``features="ids"``: the router's id table is fitted directly (sparse rows + a dense bias).
    ``features="embedding"``: a linear classifier on the frozen searched ``embedding`` (standardised by
    ``mean`` / ``std``, the training rows' per-dim statistics) is fitted, with an L2 penalty
    ``weight_decay`` on its weights (not the bias), and :meth:`distilled` folds it into the same id table
    (:meth:`LinearRouter.folded`)."""

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        k: int,
        lr: float = 1e-2,
        features: str = "ids",
        embedding: FieldEmbedding | None = None,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        if features not in ROUTER_FEATURES:
            raise ValueError(f"router features must be one of {ROUTER_FEATURES}, got {features!r}")
        self.save_hyperparameters(ignore=["embedding", "mean", "std"])
        self.features = features
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self._agree: list[torch.Tensor] = []
        self.automatic_optimization = False  # ids: two optimizers (sparse rows and the dense bias)
        if features == "ids":
            self.router = LinearRouter(vocab_sizes, k)
            return
        if embedding is None or mean is None or std is None:
            raise ValueError("features='embedding' needs the searched embedding and its mean / std")
        # the search model's embedding, read-only: not a submodule (not trained, saved or switched to
        # train mode by the Trainer; it stays the search model's)
        self.__dict__["embedding"] = embedding
        width = int(sum(embedding.dims))
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clamp_min(1e-6))
        self.head = nn.Linear(width, int(k))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster logits [B, K] of ids x [B, F]."""
        if self.features == "ids":
            return self.router(x)
        with torch.no_grad():  # the embedding stays where the search model is (the batch may be elsewhere)
            dev = self.embedding.tables[0].weight.device
            z = (self.embedding(x.to(dev)).to(x.device) - self.mean) / self.std
        return self.head(z)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, c = batch
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad()
        loss = F.cross_entropy(self(x), c)
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        self.log("router/train_loss", loss, on_step=False, on_epoch=True, batch_size=len(c))
        return loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, c = batch
        self._agree.append((self(x).argmax(1) == c).float())

    def on_validation_epoch_end(self) -> None:
        if self._agree:
            self.log("router/val_agreement", torch.cat(self._agree).mean())
        self._agree.clear()

    def configure_optimizers(self):
        if self.features == "embedding":
            return torch.optim.Adam([{"params": [self.head.weight], "weight_decay": self.weight_decay},
                                     {"params": [self.head.bias], "weight_decay": 0.0}], lr=self.lr)  # fmt: skip
        # the id table gets sparse row gradients (one row per id in the batch); the bias a dense Adam
        return [torch.optim.SparseAdam([self.router.weight.weight], lr=self.lr),
                torch.optim.Adam([self.router.bias], lr=self.lr)]  # fmt: skip

    @torch.no_grad()
    def distilled(self) -> LinearRouter:
        """The fitted router as a :class:`LinearRouter` (eval mode): the id table itself, or the
        embedding classifier folded into one."""
        if self.features == "ids":
            return self.router.eval()
        emb = self.embedding
        weights = [emb.field_weight(f) for f in range(len(emb.dims))]  # the search model keeps every field
        return LinearRouter.folded(weights, self.head.weight.detach(), self.head.bias.detach(), self.mean,
                                   self.std).eval()  # fmt: skip


@torch.no_grad()
def embedding_stats(
    embedding: nn.Module, x: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per dim of ``embedding(x)``, in batches (float64 sums; memory: one batch)."""
    n = len(x)
    s = s2 = None
    for i in range(0, n, batch_size):
        e = embedding(x[i : i + batch_size]).double()
        s = e.sum(0) if s is None else s + e.sum(0)
        s2 = (e * e).sum(0) if s2 is None else s2 + (e * e).sum(0)
    if s is None:
        raise ValueError("no rows to fit the router on")
    mean = s / n
    var = (s2 / n - mean * mean).clamp_min(0.0)
    return mean.float(), var.sqrt().float()
