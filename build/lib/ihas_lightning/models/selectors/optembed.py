"""OptEmbed (Lyu et al., CIKM'22; fuyuanlyu/OptEmbed, ../shared/BASELINES-SPEC.md section 4): a supernet
that prunes feature values by a learned per-field threshold on their embedding rows' norms and trains
every embedding size at once; an evolutionary search then picks one size per field.

* Row mask ``m(x) = H(||V_x||_1 - t_f)`` with a Heaviside step whose backward is the authors'
  surrogate ``2 - 4|u|`` (|u| <= 0.4), ``0.4`` (0.4 < |u| <= 1), 0 beyond; the gradient reaches both the
  row and ``t``. A pruned row is a zero vector (``mode_oov='zero'``).
* ``stochastic`` (supernet training): each sample and field draws ``k ~ U{0..d-1}`` and keeps its first
  ``k + 1`` dims; ``deterministic``: all dims, or the candidate ``eval_dims`` during the evolution.
* Regularizer ``alpha * sum_f exp(-t_f)`` pushes the thresholds up; ``t`` is stepped with SGD, the
  model with Adam + coupled L2 (dense: the norms of rare rows must shrink), both on every batch.
* Derive (:meth:`derive`, needs ``evaluate``: the validation AUC of the current ``eval_dims``): the
  evolutionary search of the spec (population 20 = 10 mutants + 10 crossovers of the top 10,
  30 generations, mutation p 0.1), without the authors' defects: candidates are copied before they
  are mutated, the crossover cut point is drawn over the fields, every dim 1..d can be proposed, the
  best candidate ever scored is kept as a copy, and repeated candidates are scored once (cached).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Arch, Selector


class _SurrogateStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        a = u.abs()
        g = torch.where(
            a <= 0.4, 2 - 4 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a))
        )
        return grad * g


def surrogate_step(u: torch.Tensor) -> torch.Tensor:
    """H(u) forward, the authors' piecewise-linear surrogate gradient backward."""
    return _SurrogateStep.apply(u)


class OptEmbedSelector(Selector):
    default_arch_update = "joint"
    defaults_from = ("optembed", "selector")

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        vocab_sizes: Sequence[int],
        t_init: float | None = None,
        alpha: float | None = None,
        population: int | None = None,
        generations: int | None = None,
        mutation_prob: float | None = None,
        seed: int | None = None,
    ):
        super().__init__(num_fields, embed_dim, vocab_sizes)
        kn = self.knobs(t_init=t_init, alpha=alpha, population=population, generations=generations,
                        mutation_prob=mutation_prob, seed=seed)  # fmt: skip
        self.alpha = float(kn["alpha"])
        self.population = int(kn["population"])
        self.generations = int(kn["generations"])
        self.mutation_prob = float(kn["mutation_prob"])
        self.seed = int(kn["seed"])
        if (
            self.population < 4
            or self.population % 2
            or self.generations < 1
            or not 0 <= self.mutation_prob <= 1
        ):
            raise ValueError(
                "OptEmbed: population must be an even number >= 4, generations >= 1, mutation_prob in [0, 1]"
            )
        self.t = nn.Parameter(torch.full((num_fields,), float(kn["t_init"])))
        self.register_buffer("offsets", self.field_offsets(), persistent=False)
        self.eval_dims: list[int] | None = None  # candidate dims per field (1..d) during the evolution

    # ---- forward -----------------------------------------------------------------------------------------
    def row_mask(self, e3: torch.Tensor) -> torch.Tensor:
        """m [B, N] of the rows in ``e3`` [B, N, d] (L1 norms against the field thresholds)."""
        return surrogate_step(e3.abs().sum(-1) - self.t)

    def prefix(self, dims: torch.Tensor) -> torch.Tensor:
        """[..., d] 0/1 masks keeping the first ``dims`` (1..d) dims."""
        return (torch.arange(self.embed_dim, device=dims.device) < dims.unsqueeze(-1)).float()

    def forward(self, e: torch.Tensor, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        if mode == "open":
            return e, {}
        e3 = self.fields(e)
        m = self.row_mask(e3)
        out = e3 * m.unsqueeze(-1)
        if mode == "stochastic":
            k = torch.randint(1, self.embed_dim + 1, m.shape, device=e.device)
            out = out * self.prefix(k)
        elif self.eval_dims is not None:
            out = out * self.prefix(torch.as_tensor(self.eval_dims, device=e.device))
        return out.reshape(e.shape[0], -1), {"row_mask": m}

    def regularizer(self, aux: dict[str, Any]) -> torch.Tensor | None:
        if "row_mask" not in aux:
            return None
        return self.alpha * torch.exp(-self.t).sum()

    # ---- derive: rows from the thresholds, dims from the evolutionary search --------------------------
    @torch.no_grad()
    def row_keep(self, table: torch.Tensor) -> torch.Tensor:
        """[|V|] bool: rows whose L1 norm is above their field's threshold (the uniform search table)."""
        field_of_row = torch.repeat_interleave(torch.arange(self.num_fields), torch.tensor(self.vocab_sizes))
        return (table.abs().sum(1).cpu() - self.t.detach().cpu()[field_of_row]) > 0

    def evolve(self, evaluate: Callable[[], float], progress: Callable[[int, float], None] | None = None):
        """(best dims per field 1..d, its score, history) of the evolutionary search on ``evaluate``."""
        rng = np.random.default_rng(self.seed)
        n, d, half = self.num_fields, self.embed_dim, self.population // 2
        cache: dict[tuple[int, ...], float] = {}

        def score(c: tuple[int, ...]) -> float:
            if c not in cache:
                self.eval_dims = list(c)
                cache[c] = float(evaluate())
            return cache[c]

        pop = [tuple(int(v) for v in rng.integers(1, d + 1, n)) for _ in range(self.population)]
        best, best_score, history = None, -np.inf, []
        try:
            for gen in range(self.generations):
                ranked = sorted(pop, key=score, reverse=True)
                if score(ranked[0]) > best_score:
                    best, best_score = tuple(ranked[0]), score(ranked[0])  # a copy: tuples never mutate
                history.append({"generation": gen, "best": best_score, "generation_best": score(ranked[0])})
                if progress is not None:
                    progress(gen, best_score)
                top = ranked[:half]
                mutants = []
                for parent in top:
                    child = list(parent)
                    for f in range(n):
                        if rng.random() < self.mutation_prob:
                            child[f] = int(rng.integers(1, d + 1))
                    mutants.append(tuple(child))
                children = []
                for _ in range(half):
                    i, j = rng.choice(len(top), 2, replace=False)
                    cut = int(rng.integers(1, n)) if n > 1 else 0
                    children.append(tuple(top[i][:cut]) + tuple(top[j][cut:]))
                pop = mutants + children
        finally:
            self.eval_dims = None
        return list(best), best_score, {"history": history, "scored_candidates": len(cache)}

    def derive(self, evaluate: Callable[[], float] | None = None, table: torch.Tensor | None = None,
               progress: Callable[[int, float], None] | None = None, **_: Any) -> Arch:  # fmt: skip
        if evaluate is None or table is None:
            raise ValueError(
                "OptEmbed's derive needs the validation scorer and the search table (stage=derive)"
            )
        dims, best, info = self.evolve(evaluate, progress)
        keep = self.row_keep(table)
        return Arch(
            field_dims=dims,
            row_keep=keep,
            scores={"val_auc_of_best": best, "field_dims": dims, "thresholds": self.t.detach().cpu().tolist(),
                    "kept_rows_share": float(keep.float().mean()), **info},
        )  # fmt: skip

    def statistics(self) -> dict[str, Any]:
        return {"threshold_mean": float(self.t.detach().mean())}
