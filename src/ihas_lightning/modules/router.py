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
    (:meth:`LinearRouter.folded`). ``weight_decay`` may be a list: one classifier (head) per value, all
    fitted at once on the same batches (the loss is the sum of theirs; each head's gradient and Adam
    state are its own, so each fits as it would alone) and one lookup of the embedding per batch;
    :meth:`distilled` takes the head's index. Where every field has the same width, the standardised
    embedding ``(E - mean) / std`` is precomputed per id (one [ids, d] table, the same values), so a
    batch is one gather."""

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        k: int,
        lr: float = 1e-2,
        features: str = "ids",
        embedding: FieldEmbedding | None = None,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        weight_decay: float | Sequence[float] = 0.0,
    ):
        super().__init__()
        if features not in ROUTER_FEATURES:
            raise ValueError(f"router features must be one of {ROUTER_FEATURES}, got {features!r}")
        self.save_hyperparameters(ignore=["embedding", "mean", "std"])
        self.features = features
        decays = list(weight_decay) if isinstance(weight_decay, Sequence) else [weight_decay]
        if not decays:
            raise ValueError("weight_decay: at least one value")
        self.weight_decays = [float(w) for w in decays]
        self.lr, self.weight_decay = float(lr), self.weight_decays[0]
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
        self.heads = nn.ModuleList(nn.Linear(width, int(k)) for _ in self.weight_decays)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.register_buffer("ztable", None, persistent=False)
        dims = [int(d) for d in embedding.dims]
        if len(set(dims)) == 1 and not getattr(embedding, "pruned", False):
            # the standardised rows of every id, in LinearRouter's order (field f's ids from offsets[f])
            with torch.no_grad():
                parts, start = [], 0
                for f, d in enumerate(dims):
                    w = embedding.field_weight(f).detach().float()
                    parts.append(
                        (w.to(self.mean.device) - self.mean[start : start + d]) / self.std[start : start + d]
                    )
                    start += d
            self.ztable = torch.cat(parts)
            sizes = torch.tensor([int(p.shape[0]) for p in parts])
            self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)

    @property
    def head(self) -> nn.Linear:
        """The first (or only) classifier."""
        return self.heads[0]

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """``(E(x) - mean) / std`` [B, D] of ids x [B, F] (the frozen embedding)."""
        if self.ztable is not None:
            idx = x.to(self.ztable.device).long() + self.offsets
            # one flat row gather (an [B, F] advanced index of the table is ~15x slower on CPU)
            return self.ztable.index_select(0, idx.reshape(-1)).view(len(x), -1).to(x.device)
        with torch.no_grad():  # the embedding stays where the search model is (the batch may be elsewhere)
            dev = self.embedding.tables[0].weight.device
            return (self.embedding(x.to(dev)).to(x.device) - self.mean) / self.std

    def all_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits [B, K] of every head (one lookup)."""
        if self.features == "ids":
            return [self.router(x)]
        z = self.standardised(x)
        return [head(z) for head in self.heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster logits [B, K] of ids x [B, F]."""
        if self.features == "ids":
            return self.router(x)
        return self.head(self.standardised(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, c = batch
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad()
        losses = [F.cross_entropy(logits, c) for logits in self.all_logits(x)]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        self.log("router/train_loss", losses[0], on_step=False, on_epoch=True, batch_size=len(c))
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
            groups = []
            for head, wd in zip(self.heads, self.weight_decays):
                groups += [
                    {"params": [head.weight], "weight_decay": wd},
                    {"params": [head.bias], "weight_decay": 0.0},
                ]
            return torch.optim.Adam(groups, lr=self.lr)
        # the id table gets sparse row gradients (one row per id in the batch); the bias a dense Adam
        return [torch.optim.SparseAdam([self.router.weight.weight], lr=self.lr),
                torch.optim.Adam([self.router.bias], lr=self.lr)]  # fmt: skip

    @torch.no_grad()
    def distilled(self, head: int = 0) -> LinearRouter:
        """The fitted router as a :class:`LinearRouter` (eval mode): the id table itself, or the
        embedding classifier ``head`` (an index into ``weight_decay``'s list) folded into one."""
        if self.features == "ids":
            return self.router.eval()
        emb = self.embedding
        weights = [emb.field_weight(f) for f in range(len(emb.dims))]  # the search model keeps every field
        h = self.heads[head]
        return LinearRouter.folded(weights, h.weight.detach(), h.bias.detach(), self.mean, self.std).eval()


@torch.no_grad()
def embedding_stats(
    embedding: nn.Module, x: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per dim of ``embedding(x)`` (float64 sums).

    An embedding that is one row lookup per field (``field_weight``, not row-pruned) is summed from
    each field's id counts: ``sum_i e_i = counts @ W_f`` and ``sum_i e_i^2 = counts @ W_f^2`` (memory:
    one count per id); any other in batches of ``batch_size`` rows (memory: one batch)."""
    n = len(x)
    if n == 0:
        raise ValueError("no rows to fit the router on")
    dims = getattr(embedding, "dims", None)
    if dims is not None and hasattr(embedding, "field_weight") and not getattr(embedding, "pruned", False):
        s_parts, s2_parts = [], []
        for f in range(len(dims)):
            w = embedding.field_weight(f).detach().double()
            counts = torch.bincount(x[:, f].long().to(w.device), minlength=w.shape[0]).double()
            s_parts.append(counts @ w)
            s2_parts.append(counts @ (w * w))
        s, s2 = torch.cat(s_parts), torch.cat(s2_parts)
    else:
        s = s2 = None
        for i in range(0, n, batch_size):
            e = embedding(x[i : i + batch_size]).double()
            s = e.sum(0) if s is None else s + e.sum(0)
            s2 = (e * e).sum(0) if s2 is None else s2 + (e * e).sum(0)
    mean = s / n
    var = (s2 / n - mean * mean).clamp_min(0.0)
    return mean.float(), var.sqrt().float()
