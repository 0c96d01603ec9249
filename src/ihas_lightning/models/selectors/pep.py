"""PEP (Liu et al., ICLR'21, "Learnable Embedding Sizes"; ../shared/BASELINES-SPEC.md section 1):
soft-threshold pruning of the embedding table, ``V~ = sign(V) * relu(|V| - sigmoid(S))``.

* ``S``, the threshold logits, has the shape its granularity sets (``threshold_type``):
  ``feature_dim`` (one per feature value and dim, the authors' default), ``feature`` (per value),
  ``field_dim``, ``field``, ``dimension`` or ``global``.
* Forward: the threshold is applied to the rows a batch looks up (``e = V[x]``), with ``S`` gathered by
  the same ids, which equals ``V~[x]`` of the authors' full-table forward (tested) at a batch's cost.
  ``open`` returns ``e`` unchanged.
* Budgets: after every search step the non-zero count of the whole pruned table, ``nnz(V~)``, is
  compared with the remaining budgets (fractions of ``|V| * d``, or absolute entry counts); the first
  time it is at or below one, a snapshot ``budget_<b>`` is requested; when every budget is saved the
  search stops (:meth:`search_done`). ``check_every`` > 1 counts less often (a full-table pass).
* Derive: the entry mask ``|V_b| > sigmoid(S_b)`` of the snapshot of budget ``retrain_budget``. When
  the search ended before the pruning reached it (few training steps: the pruning speed is ``lr x
  steps``, so a small data set may not get there), ``fallback: sparsest`` (the default) retrains the
  sparsest budget that *was* reached and says so (``arch.json``'s scores: ``budget``, ``requested``,
  ``fallback``; evaluate's ``retrained_budget``; the Table 2 note); ``fallback: error`` fails instead.
  No budget is ever invented: with none reached, derive fails either way.
* No regularizer: S rises through the coupled L2 weight decay of its Adam (its gradient through
  ``sigmoid(S)`` is ~0 while S is very negative), so the pruning speed is ``lr x steps``; the method's
  config steps everything with dense Adam, as the authors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import Arch, Selector

THRESHOLD_TYPES = ("feature_dim", "feature", "field_dim", "field", "dimension", "global")
#: ``fallback``: what derive does when the search never reached ``retrain_budget``
FALLBACKS = ("sparsest", "error")


def budget_tag(b: float) -> str:
    return f"budget_{b:g}"


class PEPSelector(Selector):
    default_arch_update = "joint"
    defaults_from = ("pep", "selector")

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        vocab_sizes: Sequence[int],
        threshold_type: str | None = None,
        s_init: float | None = None,
        budgets: Sequence[float] | None = None,
        retrain_budget: float | None = None,
        check_every: int | None = None,
        fallback: str | None = None,
    ):
        super().__init__(num_fields, embed_dim, vocab_sizes)
        own_budgets = budgets is not None and retrain_budget is None  # then retrain the smallest of them
        kn = self.knobs(threshold_type=threshold_type, s_init=s_init, budgets=budgets,
                        retrain_budget=retrain_budget, check_every=check_every, fallback=fallback)  # fmt: skip
        threshold_type, s_init, budgets = kn["threshold_type"], kn["s_init"], kn["budgets"]
        retrain_budget, check_every = kn["retrain_budget"], kn["check_every"]
        if threshold_type not in THRESHOLD_TYPES:
            raise ValueError(f"PEP threshold_type must be one of {THRESHOLD_TYPES} (got {threshold_type!r})")
        self.threshold_type = str(threshold_type)
        self.total = sum(self.vocab_sizes) * self.embed_dim
        self.budgets = sorted({float(b) for b in budgets}, key=lambda b: -self.budget_entries(b))
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise ValueError(
                f"PEP budgets must be > 0: fractions of |V|*d (< 1) or entry counts (got {budgets})"
            )
        self.retrain_budget = float(
            self.budgets[-1] if own_budgets or retrain_budget is None else retrain_budget
        )
        if self.retrain_budget not in self.budgets:
            raise ValueError(
                f"PEP retrain_budget {self.retrain_budget:g} is not one of the budgets {self.budgets}"
            )
        self.check_every = max(1, int(check_every))
        fallback = "sparsest" if kn["fallback"] is None else str(kn["fallback"])
        if fallback not in FALLBACKS:
            from ...errors import ConfigError

            raise ConfigError(
                f"config key 'method.selector.fallback': must be one of {list(FALLBACKS)} (got {fallback!r})"
            )
        self.fallback = fallback
        rows = {"feature_dim": (sum(self.vocab_sizes), embed_dim), "feature": (sum(self.vocab_sizes), 1),
                "field_dim": (num_fields, embed_dim), "field": (num_fields, 1), "dimension": (1, embed_dim),
                "global": (1, 1)}[self.threshold_type]  # fmt: skip
        self.s = nn.Parameter(torch.full(rows, float(s_init)))
        self.register_buffer("offsets", self.field_offsets(), persistent=False)
        field_of_row = torch.repeat_interleave(torch.arange(num_fields), torch.tensor(self.vocab_sizes))
        self.register_buffer("field_of_row", field_of_row, persistent=False)
        # budgets saved so far (a buffer: a resumed search does not re-take them) and the last count
        self.register_buffer("reached", torch.zeros(len(self.budgets), dtype=torch.bool))
        self.register_buffer("nnz", torch.tensor(self.total, dtype=torch.long))
        self._steps = 0

    def budget_entries(self, b: float) -> int:
        return int(round(b * self.total)) if b < 1 else int(b)

    # ---- the threshold ----------------------------------------------------------------------------------
    def threshold_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """sigmoid(S) broadcastable to the embedding rows ``rows`` (global ids, any shape) x d."""
        t = self.threshold_type
        if t in ("feature_dim", "feature"):
            s = self.s[rows]
        elif t in ("field_dim", "field"):
            s = self.s[self.field_of_row[rows]]
        else:
            s = self.s.view(*([1] * rows.dim()), -1)
        return torch.sigmoid(s)

    def full_threshold(self) -> torch.Tensor:
        """sigmoid(S) for the whole table [|V|, d] (broadcast)."""
        return self.threshold_of_rows(torch.arange(sum(self.vocab_sizes), device=self.s.device))

    @staticmethod
    def prune(v: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        return torch.sign(v) * torch.relu(v.abs() - thr)

    def forward(self, e: torch.Tensor, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        if mode == "open":
            return e, {}
        rows = x.long() + self.offsets  # [B, N]
        out = self.prune(self.fields(e), self.threshold_of_rows(rows))
        return out.reshape(e.shape[0], -1), {}

    # ---- budgets ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def count_nonzero(self, table: torch.Tensor) -> int:
        """nnz of the pruned full table ``table`` [|V|, d] (the uniform search embedding)."""
        return int((table.abs() > self.full_threshold()).sum())

    @torch.no_grad()
    def snapshot_requests(self, model: nn.Module) -> list[str]:
        self._steps += 1
        if bool(self.reached.all()) or self._steps % self.check_every:
            return []
        table = model.embedding.tables[0].weight
        n = self.count_nonzero(table)
        self.nnz.fill_(n)
        tags = []
        for i, b in enumerate(self.budgets):
            if not bool(self.reached[i]) and n <= self.budget_entries(b):
                self.reached[i] = True
                tags.append(budget_tag(b))
        return tags

    def search_done(self) -> bool:
        return bool(self.reached.all())

    def retrained_budget(self, snapshots: dict[str, Any] | None = None) -> tuple[float | None, bool]:
        """(the budget derive retrains, whether it is a fallback): ``retrain_budget`` when its snapshot
        exists; else, with ``fallback: sparsest``, the sparsest budget whose snapshot exists (never one
        that was not reached); None when there is none to take."""
        snapshots = snapshots or {}
        if budget_tag(self.retrain_budget) in snapshots:
            return self.retrain_budget, False
        if self.fallback != "sparsest":
            return None, False
        reached = [b for b in self.budgets if budget_tag(b) in snapshots]  # budgets: densest first
        return (reached[-1], True) if reached else (None, False)

    def derive(self, snapshots: dict[str, Any] | None = None, **_: Any) -> Arch:
        budget, fell_back = self.retrained_budget(snapshots)
        path = None if budget is None else (snapshots or {})[budget_tag(budget)]
        if path is None:
            done = [budget_tag(b) for b, r in zip(self.budgets, self.reached.tolist()) if r]
            raise ValueError(
                f"PEP never reached the budget {self.retrain_budget:g} ({self.budget_entries(self.retrain_budget):,} "
                f"entries; last count {int(self.nnz):,} of {self.total:,}; reached: {done or 'none'}): raise "
                "search.max_epochs or the threshold's lr, or pick a reached method.selector.retrain_budget"
                + ("" if self.fallback == "sparsest" else " (or method.selector.fallback=sparsest)")
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        table = state["embedding.tables.0.weight"]
        s = state["selector.s"]
        thr = torch.sigmoid(s)
        if self.threshold_type in ("field_dim", "field"):
            thr = thr[self.field_of_row.cpu()]
        mask = table.abs() > thr
        return Arch(
            entry_mask=mask,
            scores={"budget": budget, "budget_entries": self.budget_entries(budget),
                    "requested": self.retrain_budget, "fallback": fell_back,
                    "kept_entries": int(mask.sum()), "kept_share": float(mask.float().mean()),
                    "reached": [budget_tag(b) for b, r in zip(self.budgets, self.reached.tolist()) if r]},
        )  # fmt: skip

    def statistics(self) -> dict[str, Any]:
        return {"nnz_share": int(self.nnz) / self.total, "budgets_reached": int(self.reached.sum()),
                "threshold_mean": float(torch.sigmoid(self.s.detach()).mean())}  # fmt: skip
