"""LightningModule that distils the exact cluster assignment into a :class:`LinearRouter`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ..models.router import LinearRouter


class RouterModule(L.LightningModule):
    """Cross-entropy of the router's K logits against the exact cluster of each row; the validation
    metric is the agreement (share of rows routed to their exact cluster)."""

    def __init__(self, vocab_sizes: Sequence[int], k: int, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.router = LinearRouter(vocab_sizes, k)
        self.lr = float(lr)
        self._agree: list[torch.Tensor] = []
        self.automatic_optimization = False  # two optimizers: sparse rows and the dense bias

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, c = batch
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        loss = F.cross_entropy(self.router(x), c)
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        self.log("router/train_loss", loss, on_step=False, on_epoch=True, batch_size=len(c))
        return loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, c = batch
        self._agree.append((self.router(x).argmax(1) == c).float())

    def on_validation_epoch_end(self) -> None:
        if self._agree:
            self.log("router/val_agreement", torch.cat(self._agree).mean())
        self._agree.clear()

    def configure_optimizers(self):
        # the id table gets sparse row gradients (one row per id in the batch); the bias a dense Adam
        return [torch.optim.SparseAdam([self.router.weight.weight], lr=self.lr),
                torch.optim.Adam([self.router.bias], lr=self.lr)]  # fmt: skip
