"""The search's checkpoint selection that never does harm: the sparsest search epoch whose validation
logloss and AUC are within a stated tolerance of the gates-open pretrained model, else gates open.

Why: the bi-level search trades the validation logloss against the gate's sparsity regularizer. Where
closing dims costs accuracy (a small or low-CTR log, where a few dims carry the signal), the epoch
with the best ``val/objective`` can be a sparser *and worse* model than the gates-open model the
search started from (it is Base, pretrained). This rule keeps what the search found only where it
costs nothing measurable on validation:

* the **reference** is the pretrained model with its gates open (the restored best pretraining epoch):
  its validation logloss ``L0`` and AUC ``A0``;
* a search epoch (deterministic masks) is **admissible** when its excess validation logloss over the
  reference, ``L - L0``, is at most ``tol_ne * H0`` *with confidence* ``confidence``: the upper bound of
  the one-sided interval of the paired per-row difference (the same validation rows scored by both
  models) is below the tolerance; and ``A >= A0 - tol_auc``. ``H0`` is the logloss of the constant
  predictor at the train base rate, so ``tol_ne`` is in units of normalized entropy and means the same
  at 2% and 25% CTR. The AUC side is paired too: the lower bound of the one-sided ``confidence``
  interval of ``A - A0`` by DeLong's method on the same rows (:func:`auc_lower`) is at least
  ``-tol_auc`` (a non-inferiority test), and the means satisfy ``A >= A0 - tol_auc``. The burden of
  proof is on the sparser model: on a validation split with a few dozen positives both bounds are wide
  and a sparse epoch is admitted only where it is clearly no worse (a validation AUC far *above* the
  reference's on eight positives is noise, not proof); on millions of rows the bounds are tight.
  ``confidence=0`` compares the means only;
* of the admissible epochs the **sparsest** (fewest open dims on validation; ties: the lower logloss,
  then the earlier epoch) is selected;
* the search phase stops once ``patience`` search epochs in a row brought no new choice (the
  search's early stopping under this rule: a sparser gate that costs accuracy is no progress);
  with ``stop_when="no_progress"``, until the first epoch is chosen, an epoch that is not admissible
  but nearer to it than every earlier one (its :func:`shortfall` is the lowest yet) also counts as
  progress: a search whose first, fast closing cost accuracy and which is recovering is not stopped
  mid-recovery;
* when **none** is admissible the search selects the pretrained weights with every gate open
  (:meth:`~ihas_lightning.models.gate.BernoulliGate.open_all`): iHAS-1 is then Base as pretrained,
  and a warning says so.

The retrain stage applies the same test to each retrained cluster model, Base on the cluster's
validation rows as the reference (:func:`guard_verdict`; not admissible: the cluster serves Base's model).

:func:`choose` is the rule over a finished list (the brute-force reference the tests compare with);
:class:`SparsestSelection` applies it epoch by epoch, saving ``best.ckpt`` whenever the choice changes
and ``pretrained.ckpt`` when the search phase starts (the fallback's weights).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("ihas_lightning")

PRETRAINED = "pretrained.ckpt"


def _paired(rows: torch.Tensor | None, ref_rows: torch.Tensor | None) -> bool:
    return rows is not None and ref_rows is not None and rows.shape == ref_rows.shape and len(rows) >= 2


def excess_upper(rows: torch.Tensor | None, ref_rows: torch.Tensor | None, confidence: float) -> float | None:
    """Upper bound of the one-sided ``confidence`` interval of mean(rows - ref_rows), the candidate's
    excess logloss over the reference on the same rows (a normal interval on the paired differences);
    None when the two are not the same rows (then the means are compared). Rows are per-row losses, or
    the [loss, logit, label] rows of :meth:`~ihas_lightning.modules.ctr.CTRModule.keep_val_rows`."""
    if not _paired(rows, ref_rows):
        return None
    d = _col(rows, 0) - _col(ref_rows, 0)
    z = float(NormalDist().inv_cdf(confidence)) if confidence > 0 else 0.0
    return float(d.mean() + z * d.std(unbiased=True) / math.sqrt(len(d)))


def _col(rows: torch.Tensor, i: int) -> torch.Tensor:
    return (rows[:, i] if rows.dim() == 2 else rows).double()


def auc_lower(rows: torch.Tensor | None, ref_rows: torch.Tensor | None, confidence: float) -> float | None:
    """Lower bound of the one-sided ``confidence`` interval of AUC(candidate) - AUC(reference) on the same
    [loss, logit, label] rows, by DeLong's method for correlated ROC curves
    (:func:`~ihas_lightning.stats.paired_auc_difference`), with the t quantile at the variance's
    Welch-Satterthwaite degrees of freedom: with 8 validation positives the variance is an estimate from
    8 placements (about 7 df, t 1.89 against the normal's 1.64), and with thousands the two agree. None
    when the rows are not the same, carry no scores, or miss a class (then the means are compared)."""
    if not _paired(rows, ref_rows) or rows.dim() != 2 or rows.shape[1] < 3:
        return None
    y = rows[:, 2]
    if not torch.equal(y, ref_rows[:, 2]):
        return None
    from ..stats import paired_auc_difference

    d = paired_auc_difference(y.numpy(), rows[:, 1].numpy(), ref_rows[:, 1].numpy())
    if d["diff"] is None:
        return None
    if confidence <= 0 or d["se"] == 0.0:
        return float(d["diff"])
    from scipy import stats

    q = stats.t.ppf(confidence, d["df"]) if d["df"] else NormalDist().inv_cdf(confidence)
    return float(d["diff"] - float(q) * d["se"])


def admissible(
    cand: dict[str, float], ref: dict[str, float], tol_ne: float, tol_auc: float, h0: float
) -> bool:
    """``cand`` is within tolerance of ``ref``: its excess validation logloss (the paired upper bound
    ``excess_upper`` where known, else the difference of the means) at most ``tol_ne`` NE units of
    ``h0``; its validation AUC at most ``tol_auc`` below, and where known the paired lower bound
    ``auc_lower`` of the AUC difference at least ``-tol_auc``."""
    if shortfall(cand, ref, tol_ne, tol_auc, h0) > 1e-12:
        return False  # the logloss test, or the AUC's (its bound where known)
    return cand["val_auc"] >= ref["val_auc"] - tol_auc - 1e-12  # and the means' AUC test


def shortfall(
    cand: dict[str, float], ref: dict[str, float], tol_ne: float, tol_auc: float, h0: float
) -> float:
    """How far ``cand`` is from :func:`admissible`, in the units of its two tests: the larger of its
    excess logloss over the tolerance (``excess_upper`` where known, else the difference of the means,
    minus ``tol_ne * h0``) and its AUC's shortfall below ``-tol_auc`` (``auc_lower`` where known, else
    the difference of the means). At most 0 where both tests pass on the bounds; +inf for a non-finite
    candidate."""
    ll, auc = cand.get("val_logloss"), cand.get("val_auc")
    if ll is None or auc is None or not (math.isfinite(ll) and math.isfinite(auc)):
        return math.inf
    excess = cand.get("excess_upper")
    excess = ll - ref["val_logloss"] if excess is None else excess
    lower = cand.get("auc_lower")
    lower = auc - ref["val_auc"] if lower is None else lower
    return max(excess - tol_ne * h0, -tol_auc - lower)


STOP_WHEN = ("no_new_choice", "no_progress")


def _key(c: dict[str, Any]) -> tuple[float, float, int]:
    return (float(c["open_share"]), float(c["val_logloss"]), int(c["epoch"]))


def choose(
    candidates: Sequence[dict[str, Any]], ref: dict[str, float], tol_ne: float, tol_auc: float, h0: float
) -> int | None:
    """Index of the selected candidate (the sparsest admissible one), or None (gates open)."""
    ok = [i for i, c in enumerate(candidates) if admissible(c, ref, tol_ne, tol_auc, h0)]
    return min(ok, key=lambda i: _key(candidates[i])) if ok else None


class SparsestSelection(Callback):
    """Applies :func:`choose` while the search runs (see the module docstring).

    ``best_model_path`` is ``out/best.ckpt`` once an epoch was selected ('' before); after the fit,
    :meth:`summary` tells what was chosen and :attr:`fallback` whether no epoch was admissible."""

    def __init__(
        self,
        out: Path,
        tol_ne: float,
        tol_auc: float,
        h0: float,
        patience: int | None = None,
        confidence: float = 0.95,
        stop_when: str = "no_new_choice",
    ):
        if stop_when not in STOP_WHEN:
            raise ValueError(f"stop_when must be one of {STOP_WHEN}, got {stop_when!r}")
        self.out = Path(out)
        self.stop_when = stop_when
        # the lowest shortfall of a non-admissible candidate so far (stop_when="no_progress")
        self.closest: float | None = None
        self.confidence = float(confidence)
        # per-row validation losses of the best pretraining epoch so far, then the reference's
        self._best_rows: tuple[int, float, torch.Tensor] | None = None
        self.ref_rows: torch.Tensor | None = None
        # early stopping of the search phase: stop after this many search epochs without a new choice
        # (a sparser admissible epoch); None = run the search's epoch budget
        self.patience = None if patience is None else int(patience)
        self.wait = 0
        self.tol_ne, self.tol_auc, self.h0 = float(tol_ne), float(tol_auc), float(h0)
        self.pretrain: dict[int, dict[str, float]] = {}
        self.reference: dict[str, Any] | None = None
        self.candidates: list[dict[str, Any]] = []
        self.chosen: int | None = None
        self.best_model_path = ""
        self.pretrained_path = ""

    # ---- checkpointed state (an exact resume) ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "pretrain": self.pretrain,
            "reference": self.reference,
            "candidates": self.candidates,
            "chosen": self.chosen,
            "best_model_path": self.best_model_path,
            "pretrained_path": self.pretrained_path,
            "wait": self.wait,
            "closest": self.closest,
            "ref_rows": self.ref_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pretrain = {int(k): v for k, v in (state.get("pretrain") or {}).items()}
        self.reference = state.get("reference")
        self.candidates = list(state.get("candidates") or [])
        self.chosen = state.get("chosen")
        # the files by name in this run's dir: a moved (or copied) run dir resumes with its own files
        best, pre = state.get("best_model_path"), state.get("pretrained_path")
        self.best_model_path = str(self.out / Path(best).name) if best else ""
        self.pretrained_path = str(self.out / Path(pre).name) if pre else ""
        self.wait = int(state.get("wait", 0))
        self.closest = state.get("closest")
        self.ref_rows = state.get("ref_rows")

    # ---- hooks -----------------------------------------------------------------------------------
    def _reference(self, trainer, pl_module) -> dict[str, Any] | None:
        """The gates-open pretrained model's validation metrics: the epoch the schedule restored (its
        best), else the last pretraining epoch."""
        if not self.pretrain:
            return None
        from .search import SearchSchedule

        sched = next((c for c in trainer.callbacks if isinstance(c, SearchSchedule)), None)
        epoch = sched.best_epoch if sched is not None and sched.restore_best else None
        if epoch not in self.pretrain:
            epoch = max(self.pretrain)
        return {"epoch": int(epoch), **self.pretrain[epoch]}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        pl_module.row_losses = []  # the pass's [loss, logit, label] rows (CTRModule.keep_val_rows)

    def _take_rows(self, pl_module) -> torch.Tensor | None:
        from ..distributed import gather_rows

        rows = getattr(pl_module, "row_losses", None)
        pl_module.row_losses = None
        return gather_rows(torch.cat(rows) if rows else None, cols=3)  # ddp: every rank's val rows

    def _fix_ref_rows(self) -> None:
        """The reference's per-row losses: those of the pretraining epoch the reference is."""
        if self.reference is not None and self._best_rows is not None and self.ref_rows is None:
            if self._best_rows[0] == self.reference["epoch"]:
                self.ref_rows = self._best_rows[2]
            self._best_rows = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        start = pl_module.search_start_epoch
        if start is None or trainer.current_epoch != start or self.pretrained_path:
            return
        # the weights the search starts from: the fallback if no search epoch is admissible
        path = self.out / PRETRAINED
        trainer.save_checkpoint(path)
        self.pretrained_path = str(path)
        self.reference = self._reference(trainer, pl_module)
        self._fix_ref_rows()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # the fit's validations only (not trainer.validate of the chosen checkpoint)
        m = trainer.callback_metrics
        epoch = int(trainer.current_epoch)
        ll, auc = m.get("val/logloss"), m.get("val/auc")
        rows = self._take_rows(pl_module)
        if ll is None or auc is None:
            return
        if pl_module.in_pretrain(epoch):
            self.pretrain[epoch] = {"val_logloss": float(ll), "val_auc": float(auc)}
            if rows is not None and (self._best_rows is None or float(ll) < self._best_rows[1]):
                self._best_rows = (epoch, float(ll), rows)
            return
        share = m.get("val/open_share")
        if share is None:
            return
        if self.reference is None:  # a fixed-length pretraining that ran no hook above
            self.reference = self._reference(trainer, pl_module)
            self._fix_ref_rows()
        cand = {"epoch": epoch, "val_logloss": float(ll), "val_auc": float(auc), "open_share": float(share)}
        cand["excess_upper"] = excess_upper(rows, self.ref_rows, self.confidence)
        cand["auc_lower"] = auc_lower(rows, self.ref_rows, self.confidence)
        cand["admissible"] = self.reference is not None and admissible(
            cand, self.reference, self.tol_ne, self.tol_auc, self.h0
        )
        self.candidates.append(cand)
        best = self.candidates[self.chosen] if self.chosen is not None else None
        if cand["admissible"] and (best is None or _key(cand) < _key(best)):
            self.chosen = len(self.candidates) - 1
            path = self.out / "best.ckpt"
            trainer.save_checkpoint(path)
            self.best_model_path = str(path)
            self.wait = 0
        elif self._nearer(cand):
            self.wait = 0  # not admissible, but nearer to it than every earlier epoch
        else:
            self.wait += 1
            if self.patience is not None and self.wait >= self.patience:
                trainer.should_stop = True  # no sparser admissible epoch for `patience` epochs

    def _nearer(self, cand: dict[str, Any]) -> bool:
        """stop_when="no_progress", before the first choice: a non-admissible ``cand`` with the lowest
        :func:`shortfall` yet (once an epoch is chosen, only a sparser admissible one is progress: the
        near misses around an admitted gate would otherwise reset the patience until max_epochs)."""
        if self.stop_when != "no_progress" or self.reference is None or self.chosen is not None:
            return False
        gap = shortfall(cand, self.reference, self.tol_ne, self.tol_auc, self.h0)
        if not math.isfinite(gap) or (self.closest is not None and gap >= self.closest):
            return False
        self.closest = gap
        return True

    # ---- after the fit ---------------------------------------------------------------------------
    @property
    def fallback(self) -> bool:
        """No search epoch was admissible: the gates-open pretrained model is selected."""
        return self.chosen is None and bool(self.pretrained_path) and self.reference is not None

    def summary(self) -> dict[str, Any]:
        chosen = self.candidates[self.chosen] if self.chosen is not None else None
        return {
            "rule": "sparsest search epoch within tolerance of the gates-open pretrained model, else gates open",
            "tolerance": {
                "ne": self.tol_ne,
                "auc": self.tol_auc,
                "logloss": self.tol_ne * self.h0,
                "confidence": self.confidence,
                "paired": self.ref_rows is not None,
                "paired_auc": self.ref_rows is not None and self.ref_rows.dim() == 2,
            },
            "constant_logloss": self.h0,
            "stop_when": self.stop_when,
            "reference": self.reference,
            "candidates": self.candidates,
            "chosen_epoch": None if chosen is None else chosen["epoch"],
            "fallback": "gates open" if self.fallback else None,
        }


# ---- the retrain guard: a retrained cluster model against Base on the cluster's validation rows --------
def row_metrics(rows: torch.Tensor | None) -> dict[str, Any]:
    """Validation logloss, AUC (None with one class), rows and positives of [loss, logit, label] rows."""
    if rows is None or len(rows) == 0:
        return {"val_logloss": None, "val_auc": None, "val_rows": 0, "val_positives": 0}
    y = rows[:, 2].double()
    pos = int(y.sum())
    auc = None
    if 0 < pos < len(y):
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(y.numpy(), rows[:, 1].double().numpy()))
    return {"val_logloss": float(rows[:, 0].double().mean()), "val_auc": auc, "val_rows": len(y),
            "val_positives": pos}  # fmt: skip


def guard_verdict(
    rows: torch.Tensor | None,
    base_rows: torch.Tensor | None,
    tol_ne: float,
    tol_auc: float,
    h0: float,
    confidence: float,
) -> dict[str, Any]:
    """The retrain guard's verdict on a retrained cluster model: its validation [loss, logit, label]
    ``rows`` against Base's ``base_rows`` on the same rows (the reference), by :func:`admissible` with
    :func:`excess_upper` and :func:`auc_lower` at ``confidence`` (0, the retrain stage's default: the
    differences of the means, a validation choice between the two models; > 0: the paired one-sided
    bounds, the burden of proof on the cluster model). ``admissible`` False (the cluster falls back to
    Base) also where nothing can be judged: no validation rows, or a class missing among them."""
    model, base = row_metrics(rows), row_metrics(base_rows)
    cand = {**model, "excess_upper": excess_upper(rows, base_rows, confidence),
            "auc_lower": auc_lower(rows, base_rows, confidence)}  # fmt: skip
    known = base["val_logloss"] is not None and base["val_auc"] is not None
    ok = known and admissible(cand, base, tol_ne, tol_auc, h0)
    why = None
    if not known or model["val_auc"] is None:
        why = (
            "no validation rows" if not model["val_rows"] else "a class is missing among the validation rows"
        )
    elif not ok:
        how = "the means" if confidence <= 0 else f"one-sided {confidence:g} bounds"
        why = f"not within search.tolerance of Base on the cluster's validation rows ({how})"
    return {
        "admissible": bool(ok),
        "excess_upper": cand["excess_upper"],
        "auc_lower": cand["auc_lower"],
        "tolerance": {
            "ne": float(tol_ne),
            "auc": float(tol_auc),
            "logloss": float(tol_ne) * float(h0),
            "confidence": float(confidence),
        },
        "constant_logloss": float(h0),
        "model": model,
        "base": base,
        "reason": why,
    }
