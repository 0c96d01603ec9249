"""``CTRModule``: the shared LightningModule of every stage that trains a CTR model.

One code path trains and evaluates the Base model (``method=base``), the per-cluster retrained
models (``RetrainModule``) and, extended with the gate step, the search model (``SearchModule``).

Optimisation is manual (``automatic_optimization = False``) everywhere: the embedding tables have
their own optimizer (see :mod:`ihas_lightning.optim`) and the MLP a dense Adam, both stepped every
training batch. Lightning's ``global_step`` counts optimizer steps, so it advances by 2 per batch
here (3 on gate batches in search): budgets are therefore set in EPOCHS (``max_epochs``), never in
``max_steps``.

``output_bias``: the initial bias of the output layer (a logit; ``model.output_bias=prior`` passes
the log-odds of the training rows' positive rate, ``zero`` passes None: PyTorch's default init).

Validation and test log ``{split}/auc`` (torchmetrics BinaryAUROC) and ``{split}/logloss`` (mean
BCE, torchmetrics MeanMetric) computed over the whole split (under DDP over every rank's shard).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from ..config import group_defaults
from ..distributed import sync_gradients
from ..models import DLRM
from ..optim import build_embedding_optimizer, embedding_is_sparse


def bce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean BCE of a batch; 0 (with a graph: every parameter gets a zero gradient) for an empty batch,
    which a DDP rank gets when the last global batch has fewer rows than there are ranks."""
    if y.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits, y)


class CTRModule(L.LightningModule):
    def __init__(
        self,
        vocab_sizes: Sequence[int],
        model: dict[str, Any],
        field_dims: Sequence[int] | None = None,
        gate: dict[str, Any] | None = None,
        eval_mode: str = "open",
        field_names: Sequence[str] | None = None,
        output_bias: float | None = None,
        selector: dict[str, Any] | None = None,
        row_counts: Sequence[int] | None = None,
        entry_masked: bool = False,
        positions: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        # keys the caller leaves out come from conf/model/<backbone>.yaml (the one home of defaults)
        model = {**group_defaults("model", str(dict(model).get("name", "mlp"))), **dict(model)}
        self.model_cfg = model
        self.eval_mode = eval_mode
        self.field_names = list(field_names) if field_names is not None else None
        embed_dim = int(model["embed_dim"])
        self.model = DLRM(
            vocab_sizes,
            embed_dim=embed_dim,
            field_dims=field_dims,
            hidden=tuple(model["hidden"]),
            batchnorm=bool(model["batchnorm"]),
            dropout=float(model["dropout"]),
            gate=gate,
            sparse=embedding_is_sparse(model["embedding_optimizer"]),
            selector=dict(selector) if selector else None,
            backbone=str(model["backbone"]),
            row_counts=row_counts,
            entry_masked=entry_masked,
            positions=positions,
            backbone_args=dict(model.get("backbone_args") or {}),
        )
        if output_bias is not None:
            # start at the base rate (the log-odds of the train split's positive rate), as well-kept
            # CTR libraries do: the first steps then learn features, not the class prior
            self.model.backbone.set_output_bias(float(output_bias))
        # torchmetrics states: under DDP both are reduced over every rank's rows at compute(), so the
        # logged AUC / logloss are those of the whole split (each rank scores its shard)
        self.metrics = torch.nn.ModuleDict({s: BinaryAUROC() for s in ("val", "test")})
        self.loglosses = torch.nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self._count: dict[str, int] = {}

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        lr = float(self.model_cfg["lr"])
        wd = float(self.model_cfg["weight_decay"])
        emb = build_embedding_optimizer(
            self.model_cfg["embedding_optimizer"],
            self.model.embedding_parameters(),
            lr,
            wd,
        )
        dense = torch.optim.Adam(self.model.dense_parameters(), lr=lr, weight_decay=wd)
        return [emb, dense]

    def in_pretrain(self, epoch: int | None = None) -> bool:
        """A plain CTR model has no pretraining phase (see SearchModule)."""
        return False

    def model_optimizers(self):
        opts = self.optimizers()
        return opts[0], opts[1]

    # ---- exact resume: the torch RNG (Gumbel noise, dropout) continues where the checkpoint stopped --
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["torch_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # restored when a fit resumes (on_train_start), not when a checkpoint is loaded for evaluation
        self._resume_rng = checkpoint.get("torch_rng")

    def on_train_start(self) -> None:
        rng = getattr(self, "_resume_rng", None)
        if rng is not None:
            torch.set_rng_state(rng)
            self._resume_rng = None

    def forward(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        return self.model(x, mode or self.eval_mode)

    def model_step(self, x: torch.Tensor, y: torch.Tensor, mode: str = "open") -> torch.Tensor:
        """One update of the recommender model (V and theta) on BCE."""
        emb_opt, dense_opt = self.model_optimizers()
        emb_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        logits = self.model(x, mode)
        loss = bce_loss(logits, y)
        self.manual_backward(loss)
        # under trainer=ddp: the global batch's gradient (a no-op in one process)
        sync_gradients(self.model.embedding_parameters() + self.model.dense_parameters(), len(y))
        emb_opt.step()
        dense_opt.step()
        return loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model_step(x, y, "open")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_step(self, split: str, batch) -> None:
        x, y = batch
        logits = self(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none")
        self.loglosses[split].update(loss.detach())
        self.keep_val_rows(split, loss, logits, y)
        self._count[split] = self._count.get(split, 0) + len(y)
        self.metrics[split].update(torch.sigmoid(logits), y.long())

    def keep_val_rows(self, split: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Collect this validation pass's rows where a callback asked for them (``row_losses`` set to a
        list, e.g. by the search's selection rule, which compares two passes paired): per row [loss,
        logit, label] (float64), so a paired logloss bound and a paired (DeLong) AUC bound can be taken."""
        rows = getattr(self, "row_losses", None)
        if split == "val" and rows is not None:
            cols = (loss.detach(), logits.detach().float(), y.detach().float())
            rows.append(torch.stack([c.reshape(-1).double() for c in cols], 1).cpu())

    def _eval_epoch_end(self, split: str) -> None:
        if not self._count.get(split):
            return
        # computed (and synced) on every rank; logged as the same value everywhere (no further reduction)
        self.log(f"{split}/auc", self.metrics[split].compute(), prog_bar=True)
        self.log(f"{split}/logloss", self.loglosses[split].compute(), prog_bar=True)
        self.metrics[split].reset()
        self.loglosses[split].reset()
        self._count[split] = 0

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.sigmoid(self(x))
