"""``SearchModule``: the search stage of every method (Base included), driven by the method's config.

What the module does for any selector: an optional pretraining with the selector bypassed; then the
architecture update the method declares -- ``none`` (Base), ``joint`` (every optimizer on every
training batch, BCE + the selector's regularizer: OptFS, PEP, OptEmbed) or ``bilevel`` (below: iHAS,
AdaFS, AutoField); the selector's schedules (``on_train_step`` / ``on_search_epoch_start``, never
advanced by evaluation); tagged snapshots of every parameter and buffer (``method.snapshots``, and
the tags the selector requests, e.g. PEP's budgets); and the validation objective
``{split}/objective`` = logloss + the selector's regularizer. The rest of this docstring describes
the bi-level schedule as iHAS uses it (paper section 3.5.1, Algorithm 1).

For iHAS the model is the DLRM with a :class:`~ihas_lightning.models.gate.BernoulliGate` between the
embedding layer V and the MLP theta_b. Training is bi-level and manual
(``automatic_optimization = False``); the optimizers are CTRModule's two model optimizers
(embedding tables: ``model.embedding_optimizer``; MLP: Adam lr 1e-3, wd 1e-6) plus the gate's own
Adam (``method.gate.lr``; L2 weight decay ``method.gate.weight_decay``, default ``model.weight_decay``,
on the gate's weight matrix only: its bias, the sample-independent part of each gate, and the
shared gate vector of the non-instance-wise ablation are not decayed).

* **Phase 1, pretraining** (epochs ``0 .. search_start_epoch-1``): the gates are deterministically
  open (the gate network is not even evaluated); only V and theta_b are trained on BCE. The gate
  parameters are untouched and the gate optimizer never steps, so it has no Adam state yet. The
  paper initialises the gates after pretraining; ours are initialised at construction and left
  untouched until then, which is the same thing. Its length is either fixed (``pretrain_epochs``)
  or decided by the :class:`SearchSchedule` callback: until the validation logloss stops improving
  (``search.pretrain.patience``), after which the best pretrained weights are restored.
* **Phase 2, bi-level search** (from ``search_start_epoch``): every training batch updates V and
  theta_b on BCE with stochastic (straight-through Gumbel) masks, at ``model_lr_scale`` x their lr
  (a fine-tune of the pretrained optimum), the gate parameters frozen (``requires_grad`` off, so no
  gate gradient is even computed); every ``search_every`` training batches (at batch_idx 0, K,
  2K, ... of each epoch) one batch from the search loader updates the gate parameters w on
  ``BCE + lambda * sum_j (p_ij - |p_ij - mean_j p_ij|)``, with V and theta_b frozen. The gate reads
  a detached embedding, so neither step can move the other level's parameters (tested).

The search loader is an infinite iterable handed to :meth:`SearchModule.set_search_loader`: batches
of a held-out part of the training split (``search.gate_data=holdout``, default) or of the
validation split (the paper). It is only used for gate steps, never for model selection, which uses
the whole validation split with deterministic masks and monitors ``val/objective`` (logloss + the
regularizer: the gate's own objective) in phase 2.

Counting: Lightning's ``global_step`` counts optimizer steps, so it advances by 2 per training
batch and by 3 on gate batches. Budgets are therefore in epochs.

Evaluation: during pretraining the validation metrics use open gates (the gate is untrained);
from the first search epoch on they use the deterministic threshold searcher (``eval_mode =
"deterministic"``), which is also the mode of a loaded checkpoint. Each deterministic validation
epoch also logs the gate statistics: share of open dims overall and per field, polarization
statistics (mean |p - mean p|, share of p in [0.1, 0.9], mean threshold, share of samples whose
histogram had a valley) and a histogram of the gate probabilities.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torchmetrics import MeanMetric

from ..config import group_defaults
from ..distributed import global_slice, sync_gradients, world_size
from ..models.selectors import ARCH_UPDATES
from .ctr import CTRModule, bce_loss

HIST_BINS = 50
OBJECTIVES = ("logloss", "ne")
GATE_SELECTOR_KEYS = (
    "tau",
    "instance_wise",
    "bins",
    "init_bias",
    "input_norm",
    "lambda_reg",
    "polarization",
    "polarization_weight",
    "threshold",
)
log = logging.getLogger("ihas_lightning")


@contextmanager
def frozen(params: Sequence[torch.nn.Parameter]):
    """Temporarily set ``requires_grad=False`` on ``params`` (restored afterwards)."""
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)


class GateStats:
    """Accumulates deterministic-mode gate statistics over an evaluation pass (vectorised per batch).

    ``groups`` (optional, an int tensor per batch) also accumulates the mean mask per (group, dim).

    ``covariance=True`` also accumulates the D x D second moment of the probabilities, for two numbers
    that say whether the gate is instance-wise at all (:meth:`instance_structure`): the share of the
    probabilities' variance that lies across samples rather than across dims, and how much of that
    across-sample variance one direction carries (1.0: every sample's gate moves along one axis, so
    K-Means can only split the samples into "more of these dims" vs "more of those")."""

    def __init__(self, dim: int, field_dims: Sequence[int], bins: int = HIST_BINS, covariance: bool = False):
        self.dim = dim
        self.field_dims = list(field_dims)
        self.bins = bins
        self.covariance = covariance
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mask_sum = torch.zeros(self.dim, dtype=torch.float64)
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.abs_dev_sum = 0.0
        self.mid_sum = 0.0
        self.thr_sum = 0.0
        self.found_sum = 0.0
        self.p_sum = 0.0
        self.group_mask: dict[int, torch.Tensor] = {}
        self.group_n: dict[int, int] = {}
        self.p_dim_sum = torch.zeros(self.dim, dtype=torch.float64)
        self.p_sq_sum = 0.0
        self.p_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64) if self.covariance else None

    def instance_structure(self) -> dict[str, float] | None:
        if self.n < 2:
            return None
        mean_d = self.p_dim_sum / self.n
        total = self.p_sq_sum / (self.n * self.dim) - float(mean_d.mean()) ** 2
        between_dims = float(((mean_d - mean_d.mean()) ** 2).mean())
        out = {"across_samples_share": max(0.0, 1.0 - between_dims / total) if total > 0 else 0.0}
        if self.p_outer is not None:
            cov = self.p_outer / self.n - torch.outer(mean_d, mean_d)
            eig = torch.linalg.eigvalsh(cov).clamp_min(0)
            out["pc1_share_of_sample_variance"] = float(eig[-1] / eig.sum()) if float(eig.sum()) > 0 else 0.0
        return out

    @torch.no_grad()
    def update(
        self, mask: torch.Tensor, p: torch.Tensor, thr: torch.Tensor, found: torch.Tensor, groups=None
    ):
        b = mask.shape[0]
        self.n += b
        self.mask_sum += mask.double().sum(0).cpu()
        self.hist += torch.histc(p.float(), bins=self.bins, min=0.0, max=1.0).double().cpu()
        self.abs_dev_sum += float((p - p.mean(1, keepdim=True)).abs().mean(1).sum())
        self.mid_sum += float(((p >= 0.1) & (p <= 0.9)).float().mean(1).sum())
        self.thr_sum += float(thr.sum())
        self.found_sum += float(found.float().sum())
        self.p_sum += float(p.mean(1).sum())
        pd = p.double().cpu()
        self.p_dim_sum += pd.sum(0)
        self.p_sq_sum += float((pd * pd).sum())
        if self.p_outer is not None:
            self.p_outer += pd.t() @ pd
        if groups is not None:
            groups = torch.as_tensor(groups).long().cpu()
            uniq, inv = torch.unique(groups, return_inverse=True)
            sums = torch.zeros(len(uniq), self.dim, dtype=torch.float64).index_add_(
                0, inv, mask.double().cpu()
            )
            counts = torch.bincount(inv, minlength=len(uniq))
            for k, g in enumerate(uniq.tolist()):
                self.group_mask[g] = (
                    self.group_mask.get(g, torch.zeros(self.dim, dtype=torch.float64)) + sums[k]
                )
                self.group_n[g] = self.group_n.get(g, 0) + int(counts[k])

    def per_field(self, dim_means: torch.Tensor) -> list[float]:
        out, start = [], 0
        for d in self.field_dims:
            out.append(float(dim_means[start : start + d].mean()) if d else 0.0)
            start += d
        return out

    def summary(self, field_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready statistics (empty dict when nothing was accumulated)."""
        if self.n == 0:
            return {}
        names = (
            list(field_names)
            if field_names is not None
            else [f"field{i}" for i in range(len(self.field_dims))]
        )
        dim_means = self.mask_sum / self.n
        out: dict[str, Any] = {
            "samples": self.n,
            "open_share": float(dim_means.mean()),
            "open_share_per_field": dict(zip(names, self.per_field(dim_means))),
            "open_share_per_dim": [round(float(v), 6) for v in dim_means],
            "polarization": {
                "mean_abs_dev": self.abs_dev_sum / self.n,
                "share_p_in_0.1_0.9": self.mid_sum / self.n,
                "mean_threshold": self.thr_sum / self.n,
                "share_valley_found": self.found_sum / self.n,
                "mean_p": self.p_sum / self.n,
            },
            "p_hist": {"counts": self.hist.tolist(), "edges": np.linspace(0, 1, self.bins + 1).tolist()},
        }
        structure = self.instance_structure()
        if structure is not None:
            out["instance_structure"] = structure
        if self.group_n:
            out["per_group_field_mask"] = {
                str(g): dict(zip(names, self.per_field(self.group_mask[g] / self.group_n[g])))
                for g in sorted(self.group_n)
            }
            out["group_samples"] = {str(g): self.group_n[g] for g in sorted(self.group_n)}
        return out


class SearchSchedule(Callback):
    """Ends the pretraining on its own criterion and bounds the search phase.

    Pretraining (gates open) runs until the validation ``monitor`` has not improved for
    ``pretrain_patience`` epochs, or for ``pretrain_max_epochs`` epochs (``pretrain_patience=None``:
    exactly that many, the paper's "a few epochs"). The weights of its best epoch are then restored
    (``restore_best``) and the bi-level search starts at the next epoch; it runs at most
    ``search_max_epochs`` epochs (early stopping on the same monitor is a separate callback).
    With a module whose ``pretrain_epochs`` was fixed at construction only the search bound applies.
    """

    def __init__(
        self,
        pretrain_max_epochs: int,
        pretrain_patience: int | None,
        search_max_epochs: int,
        monitor: str = "val/logloss",
        restore_best: bool = True,
        record: Path | None = None,
    ):
        self.record = None if record is None else Path(record)
        self.best_global_step: int | None = None
        self._t0: float | None = None
        self.pretrain_max_epochs = int(pretrain_max_epochs)
        self.pretrain_patience = None if pretrain_patience is None else int(pretrain_patience)
        self.search_max_epochs = int(search_max_epochs)
        self.monitor = monitor
        self.sign = 1.0 if monitor.endswith("auc") else -1.0
        self.restore_best = restore_best
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "wait": self.wait,
                "best_global_step": self.best_global_step}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")
        self.wait = int(state_dict.get("wait", 0))
        self.best_global_step = state_dict.get("best_global_step")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def _write_record(self, trainer, pl_module, epoch: int) -> None:
        """``pretraining.json``: what the pretraining (= Base's fit) did, for a Base derived from it
        (``stage=all``: :func:`ihas_lightning.stages.search.base_from_pretraining`)."""
        if self.record is None or not trainer.is_global_zero:
            return
        from ..utils import write_json

        tp = next((c for c in trainer.callbacks if hasattr(c, "samples_per_s")), None)
        write_json(self.record, {
            "best_epoch": self.best_epoch,
            "best_global_step": self.best_global_step,
            "epochs": epoch + 1,
            "global_step": int(trainer.global_step),
            "restored": bool(self.restore_best),
            "fit_seconds": None if self._t0 is None else round(time.perf_counter() - self._t0, 3),
            "train_seconds": None if tp is None else round(tp.seconds, 3),
            "train_samples": None if tp is None else int(tp.samples),
            "resumed": self._t0 is None or trainer.ckpt_path is not None,
        })  # fmt: skip

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if not pl_module.in_pretrain(epoch):
            if epoch + 1 - pl_module.search_start_epoch >= self.search_max_epochs:
                trainer.should_stop = True
            return
        if pl_module.search_start_epoch is not None:  # a fixed pretraining length
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            score = self.sign * float(value)
            if self.best_score is None or score > self.best_score:
                self.best_score, self.best_epoch, self.wait = score, epoch, 0
                self.best_global_step = int(trainer.global_step)
                if self.restore_best:
                    self._best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            else:
                self.wait += 1
        patience_done = self.pretrain_patience is not None and self.wait >= self.pretrain_patience
        if patience_done or epoch + 1 >= self.pretrain_max_epochs:
            if self.restore_best and self._best_state is not None and self.best_epoch != epoch:
                pl_module.load_state_dict(self._best_state)
            self._best_state = None
            pl_module.start_search(epoch + 1)
            self._write_record(trainer, pl_module, epoch)
            log.info(
                "search: pretraining ended after epoch %d (%s; best %s at epoch %s%s); the bi-level "
                "search starts at epoch %d",
                epoch, "no improvement" if patience_done else "max epochs", self.monitor,
                self.best_epoch, ", restored" if self.restore_best else "", epoch + 1,
            )  # fmt: skip


def _selector_spec(method: dict[str, Any] | None, gate: dict[str, Any] | None):
    """(method, selector spec, arch optimizer config): ``method.selector``, or the Bernoulli gate of a
    ``gate=`` block (keys it leaves out from conf/method/ihas.yaml's gate block), bi-level by default."""
    method = dict(method or {})
    selector = method.get("selector")
    arch_optim = dict(method.get("arch_optim") or {})
    if gate is None:
        return method, selector, arch_optim
    if selector is not None:
        raise ValueError("give either gate= or method.selector, not both")
    gate = {**group_defaults("method", "ihas", "gate"), **dict(gate)}
    selector = {"_target_": "ihas_lightning.models.selectors.bernoulli.BernoulliSelector"}
    selector.update({k: gate[k] for k in GATE_SELECTOR_KEYS if k in gate})
    arch_optim = {"type": "adam", "lr": gate.get("lr", 1e-3), "weight_decay": gate.get("weight_decay")}
    method.setdefault("arch_update", "bilevel")
    return method, selector, arch_optim


def _objective(method: dict[str, Any], constant_logloss: float | None) -> tuple[str, float, float]:
    """(objective, constant logloss h0, the data term's scale): method.objective=ne divides the BCE by
    h0, the constant predictor's logloss at the train base rate, so lambda weighs the same against the
    data term at 2% and at 25% CTR; logloss: BCE + regularizer (the authors')."""
    objective = str(method.get("objective") or "logloss")
    if objective not in OBJECTIVES:
        raise ValueError(f"method.objective must be one of {OBJECTIVES}, got {objective!r}")
    h0 = float(constant_logloss) if constant_logloss else 1.0
    if not h0 > 0:
        raise ValueError(f"constant_logloss must be > 0, got {constant_logloss!r}")
    return objective, h0, 1.0 / h0 if objective == "ne" else 1.0


class SearchModule(CTRModule):
    """The search module of every method (see the module docstring for the schedule).

    ``method`` (the resolved ``conf/method/<name>.yaml``) drives it: its ``selector`` block
    (``_target_`` + knobs; null = Base, no selector), ``arch_update`` (none | joint | bilevel),
    ``arch_optim`` (``type`` adam | sgd, ``lr``, ``weight_decay``; null weight decay =
    ``model.weight_decay``), ``snapshots`` (tags saved to :attr:`snapshot_dir`: ``init`` before the
    first step, ``epoch_<r>`` at the start of search epoch r) and ``search_epochs`` (the search
    phase's epoch budget, for per-epoch schedules). ``gate`` (iHAS's ``method.gate`` block) is the
    older spelling of the Bernoulli selector and is still accepted."""

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        model: dict[str, Any],
        gate: dict[str, Any] | None = None,
        pretrain_epochs: int | None = None,
        search_every: int = 100,
        field_names: Sequence[str] | None = None,
        output_bias: float | None = None,
        model_lr_scale: float = 1.0,
        method: dict[str, Any] | None = None,
        constant_logloss: float | None = None,
    ):
        method, selector, arch_optim = _selector_spec(method, gate)
        super().__init__(
            vocab_sizes,
            model,
            eval_mode="deterministic" if selector is not None else "open",
            field_names=field_names,
            output_bias=output_bias,
            selector=selector,
        )
        # CTRModule's own hparams (field_dims, eval_mode, selector, row_counts) are not arguments here
        self.save_hyperparameters(
            ignore=["field_dims", "eval_mode", "selector", "row_counts", "entry_masked"]
        )
        sel = self.model.selector
        self.arch_update = str(
            method.get("arch_update") or (sel.default_arch_update if sel is not None else "none")
        )
        if self.arch_update not in ARCH_UPDATES:
            raise ValueError(f"arch_update must be one of {ARCH_UPDATES}, got {self.arch_update!r}")
        self.frozen_selector = bool(method.get("frozen_selector")) and sel is not None
        if sel is None or self.frozen_selector:
            # no selector, or a transferred one (frozen): no architecture update, no pretraining
            self.arch_update = "none"
            pretrain_epochs = 0
        if self.frozen_selector:
            sel.freeze()
        if (pretrain_epochs is not None and pretrain_epochs < 0) or search_every < 1 or model_lr_scale <= 0:
            raise ValueError("pretrain_epochs must be >= 0, search_every >= 1 and model_lr_scale > 0")
        # first epoch of the search phase; None = still pretraining until a SearchSchedule
        # callback ends the pretraining on its validation criterion
        self.search_start_epoch: int | None = None if pretrain_epochs is None else int(pretrain_epochs)
        self.search_every = int(search_every)
        self.model_lr_scale = float(model_lr_scale) if sel is not None else 1.0
        self.lr_scaled = False
        self.arch_optim_cfg = arch_optim
        # method.objective=ne: the architecture objective is the normalized entropy (BCE divided by the
        # constant predictor's logloss at the train base rate) + the regularizer, so lambda weighs the
        # same against the data term at 2% and at 25% CTR; logloss: BCE + regularizer (the authors')
        self.objective, self.constant_logloss, self.loss_scale = _objective(method, constant_logloss)
        self.search_epochs = method.get("search_epochs")
        self.snapshots = [str(t) for t in (method.get("snapshots") or [])]
        self.snapshot_dir: Path | None = None  # set by the stage; snapshots are skipped without it
        self._search_source: Iterable | None = None
        self._search_iter: Iterator | None = None
        dim = self.model.embedding.output_dim
        self.gate_stats = {s: GateStats(dim, self.model.field_dims) for s in ("val", "test")}
        self.last_gate_summary: dict[str, dict[str, Any]] = {}
        self.gate_steps = 0
        self.search_batches_drawn = 0  # the gate stream's position (checkpointed: an exact resume)
        # the selector regularizer's mean per split (a torchmetrics state: reduced over ranks under DDP)
        self.regs = torch.nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})

    @torch.no_grad()
    def load_transfer(self, source: torch.nn.Module) -> list[str]:
        """Transfer: copy the source search model's embedding tables and selector (this model's own
        backbone stays fresh). Their shapes must match (same vocabulary and embed_dim); returns the
        keys copied."""
        own = self.model.state_dict()
        src = {k: v for k, v in source.state_dict().items() if k.startswith(("embedding.", "selector."))}
        bad = [k for k, v in src.items() if k not in own or own[k].shape != v.shape]
        missing = [k for k in own if k.startswith(("embedding.", "selector.")) and k not in src]
        if bad or missing:
            raise ValueError(f"the source model does not fit this one ({(bad or missing)[0]})")
        self.model.load_state_dict(src, strict=False)
        return sorted(src)

    # ---- phase / data plumbing ---------------------------------------------------------------
    @property
    def selector(self):
        return self.model.selector

    def in_pretrain(self, epoch: int | None = None) -> bool:
        if self.selector is None:
            return False
        epoch = self.current_epoch if epoch is None else epoch
        return self.search_start_epoch is None or epoch < self.search_start_epoch

    def start_search(self, epoch: int) -> None:
        """End the pretraining: the search phase starts at ``epoch``."""
        self.search_start_epoch = int(epoch)

    def set_search_loader(self, loader: Iterable) -> None:
        """The source of batches (x, y) for the bi-level architecture steps (re-iterated when exhausted)."""
        self._search_source = loader
        self._search_iter = None

    def next_search_batch(self):
        if self._search_source is None:
            raise RuntimeError(
                "SearchModule: no search loader; call set_search_loader(dm.search_dataloader())"
            )
        if self._search_iter is None:
            if callable(self._search_source) and not hasattr(self._search_source, "__iter__"):
                # a factory: the stream is built in the fit, once the ranks are known (trainer=ddp)
                self._search_source = self._search_source()
            if self.search_batches_drawn and hasattr(self._search_source, "start_at"):
                # a resumed fit: continue the stream where the checkpointed one stopped
                self._search_source.start_at(self.search_batches_drawn)
            self._search_iter = iter(self._search_source)
        self.search_batches_drawn += 1
        try:
            return next(self._search_iter)
        except StopIteration:
            self._search_iter = iter(self._search_source)
            return next(self._search_iter)

    def save_snapshot(self, tag: str, requested: bool = False) -> None:
        """Every parameter and buffer of the model, as ``<snapshot_dir>/<tag>.pt`` (atomic): the tags of
        ``method.snapshots``, and those the selector requests (``requested``)."""
        if self.snapshot_dir is None or (tag not in self.snapshots and not requested):
            return
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        final = self.snapshot_dir / f"{tag}.pt"
        tmp = final.with_suffix(".pt.tmp")
        torch.save({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}, tmp)
        tmp.replace(final)
        log.info("search: snapshot %r saved to %s", tag, final)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.global_step == 0:
            self.save_snapshot("init")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.selector is None or self.in_pretrain():
            return
        for tag in self.selector.snapshot_requests(self.model):
            self.save_snapshot(tag, requested=True)
        if self.selector.search_done():
            self.trainer.should_stop = True

    def on_train_epoch_start(self) -> None:
        self.eval_mode = "open" if self.in_pretrain() or self.selector is None else "deterministic"
        if self.selector is None or self.in_pretrain():
            return
        search_epoch = self.current_epoch - int(self.search_start_epoch or 0)
        self.save_snapshot(f"epoch_{search_epoch}")
        self.selector.on_search_epoch_start(search_epoch, int(self.search_epochs or 1))
        if not self.lr_scaled:
            # the model (V, theta) continues from its pretrained optimum: in the search phase it is
            # fine-tuned at model_lr_scale x model.lr while the gates learn (search.model_lr_scale)
            for opt in self.model_optimizers():
                for group in opt.param_groups:
                    group["lr"] *= self.model_lr_scale
            self.lr_scaled = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["search_phase"] = {
            "search_start_epoch": self.search_start_epoch,
            "lr_scaled": self.lr_scaled,
            "gate_steps": self.gate_steps,
            "search_batches_drawn": self.search_batches_drawn,  # the gate stream's position
        }
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        phase = checkpoint.get("search_phase") or {}
        if "search_start_epoch" in phase:
            self.search_start_epoch = phase["search_start_epoch"]
            self.lr_scaled = bool(phase.get("lr_scaled", False))
            self.gate_steps = int(phase.get("gate_steps", 0))
            self.search_batches_drawn = int(phase.get("search_batches_drawn", 0))
        super().on_load_checkpoint(checkpoint)

    def on_fit_end(self) -> None:
        self.eval_mode = "deterministic" if self.selector is not None else "open"

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        emb, dense = super().configure_optimizers()
        if self.selector is None or self.frozen_selector or not self.model.arch_parameters():
            return [emb, dense]
        wd = self.arch_optim_cfg.get("weight_decay")
        wd = float(self.model_cfg["weight_decay"] if wd is None else wd)
        groups = self.selector.arch_param_groups(wd)
        lr = float(self.arch_optim_cfg.get("lr", 1e-3))
        kind = str(self.arch_optim_cfg.get("type", "adam"))
        if kind == "adam":
            arch_opt = torch.optim.Adam(groups, lr=lr)
        elif kind == "sgd":
            arch_opt = torch.optim.SGD(groups, lr=lr)
        else:
            raise ValueError(f"arch_optim.type must be adam or sgd, got {kind!r}")
        return [emb, dense, arch_opt]

    def arch_optimizer(self):
        return self.optimizers()[2]

    gate_optimizer = arch_optimizer

    @contextmanager
    def global_noise(self, rows: int):
        """Under trainer=ddp: the gate draws its Gumbel noise for the global batch and keeps this rank's
        rows (:func:`ihas_lightning.distributed.global_slice`); nothing in one process."""
        gate = self.model.gate
        if gate is None or world_size() == 1:
            yield
            return
        gate.noise_rows = global_slice(rows, self.device)
        try:
            yield
        finally:
            gate.noise_rows = None

    def model_step(self, x: torch.Tensor, y: torch.Tensor, mode: str = "open") -> torch.Tensor:
        """Update V and theta on BCE; the architecture parameters are frozen (no gradient computed)."""
        with frozen(self.model.arch_parameters()), self.global_noise(len(y)):
            return super().model_step(x, y, mode)

    def gate_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bi-level architecture step: update the selector's architecture parameters on BCE +
        regularizer with V and theta frozen. Returns (BCE, regularizer) for logging."""
        opt = self.arch_optimizer()
        opt.zero_grad(set_to_none=True)
        with (
            frozen(self.model.embedding_parameters() + self.model.dense_parameters()),
            self.global_noise(len(y)),
        ):
            logits, aux = self.model.forward_aux(x, "stochastic")
            bce = bce_loss(logits, y)
            reg = self.selector.regularizer(aux) if len(y) else None
            reg = torch.zeros((), device=bce.device) if reg is None else reg
            self.manual_backward(bce * self.loss_scale + reg)
        sync_gradients(self.model.arch_parameters(), len(y))
        opt.step()
        self.gate_steps += 1
        return bce.detach(), reg.detach()

    arch_step = gate_step

    def joint_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of every parameter on the same training batch: BCE + the selector's regularizer."""
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        with self.global_noise(len(y)):
            logits, aux = self.model.forward_aux(x, "stochastic")
        bce = bce_loss(logits, y)
        reg = self.selector.regularizer(aux) if len(y) else None
        reg = torch.zeros((), device=bce.device) if reg is None else reg
        self.manual_backward(bce * self.loss_scale + reg)
        sync_gradients(list(self.model.parameters()), len(y))
        for opt in opts:
            opt.step()
        self.gate_steps += 1
        return bce.detach(), reg.detach()

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.selector is None or self.in_pretrain() or self.arch_update == "none":
            mode = "open" if self.selector is None or self.in_pretrain() else "stochastic"
            loss = self.model_step(x, y, mode)
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
            if mode == "stochastic":
                self.selector.on_train_step()
            return loss
        if self.arch_update == "joint":
            loss, reg = self.joint_step(x, y)
            self.selector.on_train_step()
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
            self.log("search/arch_reg", reg, on_step=True, on_epoch=True, batch_size=len(y))
            return loss
        loss = self.model_step(x, y, "stochastic")
        self.selector.on_train_step()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        if batch_idx % self.search_every == 0:
            xs, ys = self.next_search_batch()
            xs, ys = xs.to(self.device), ys.to(self.device)
            bce, reg = self.gate_step(xs, ys)
            self.log("search/gate_bce", bce, on_step=True, on_epoch=True, batch_size=len(ys))
            self.log("search/gate_reg", reg, on_step=True, on_epoch=True, batch_size=len(ys))
        return loss

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_step(self, split: str, batch) -> None:
        if self.eval_mode != "deterministic" or self.selector is None:
            return super()._eval_step(split, batch)
        x, y = batch
        logits, aux = self.model.forward_aux(x, "deterministic")
        loss = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none")
        self.loglosses[split].update(loss.detach())
        self.keep_val_rows(split, loss, logits, y)
        self._count[split] = self._count.get(split, 0) + len(y)
        self.metrics[split].update(torch.sigmoid(logits), y.long())
        if "threshold" in aux:  # a per-dim gate with the threshold searcher (iHAS)
            self.gate_stats[split].update(aux["mask"], aux["p"], aux["threshold"], aux["found"])
        reg = self.selector.regularizer(aux)
        self.regs[split].update(0.0 if reg is None else reg.detach().float(), weight=len(y))

    def _eval_epoch_end(self, split: str) -> None:
        if self._count.get(split) and self.regs[split].update_count:
            # the upper-level objective of the search on this split: logloss of the deterministic
            # selection (in NE units under method.objective=ne) + the selector's regularizer (what the
            # architecture steps minimise)
            ll = self.loglosses[split].compute()
            self.log(f"{split}/objective", ll * self.loss_scale + self.regs[split].compute())
            if constant_given := self.hparams.get("constant_logloss"):
                self.log(f"{split}/ne", ll / float(constant_given))
            self.regs[split].reset()
        super()._eval_epoch_end(split)
        if self.selector is not None and not self.in_pretrain():
            for k, v in self.selector.statistics().items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.log(f"{split}/selector/{k}", float(v))
        stats = self.gate_stats[split]
        if stats.n == 0:
            return
        summary = stats.summary(self.field_names)
        stats.reset()
        self.last_gate_summary[split] = summary
        self.log(f"{split}/open_share", summary["open_share"])
        for name, v in summary["open_share_per_field"].items():
            self.log(f"{split}/open_share/{name}", v)
        for k, v in summary["polarization"].items():
            self.log(f"{split}/gate/{k}", float(v))
        if split == "val" and not self.trainer.sanity_checking:
            from ..loggers import log_histogram

            log_histogram(self.logger, "gate/p_hist", summary["p_hist"], step=self.global_step)

    @torch.no_grad()
    def gate_statistics(self, batches: Iterable, groups: Iterable | None = None) -> dict[str, Any]:
        """Deterministic-mode gate statistics over ``batches`` of (x, y) (e.g. the test split); empty
        for a selector without per-dim gates.

        ``groups``: optional iterable of per-batch group id arrays aligned with ``batches`` (the
        synthetic ``_group`` column), to get the mean mask per group and field."""
        was_training = self.training
        self.eval()
        stats = GateStats(self.model.embedding.output_dim, self.model.field_dims, covariance=True)
        group_iter = iter(groups) if groups is not None else None
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = x.to(self.device)
            _, aux = self.model.select(self.model.embed(x), x, "deterministic")
            g = next(group_iter) if group_iter is not None else None
            if "threshold" in aux:
                stats.update(aux["mask"], aux["p"], aux["threshold"], aux["found"], g)
        self.train(was_training)
        return stats.summary(self.field_names)
