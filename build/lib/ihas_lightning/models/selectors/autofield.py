"""AutoField (WWW'22; no official code, the ERASE benchmark's version is the reference): two logits
per field ``alpha_f = (drop, select)``, shared by all samples, initialised to ``alpha_init``.

* ``stochastic``: ``g = GumbelSoftmax(alpha, tau, hard=False)[:, 1]`` with one noise draw per forward
  shared by the whole batch, and ``E'_{b,f} = g_f * E_{b,f}`` (a soft scaling, not straight-through).
* ``deterministic``: the noise-free ``g = softmax(alpha / tau)[:, 1]``. **This differs from ERASE**,
  whose evaluation forwards keep the Gumbel noise on (and advance tau).
* ``open``: identity.
* Temperature: ``tau`` starts at ``tau_start`` and drops by ``tau_decay`` per search-phase training
  step (:meth:`on_train_step`) until ``tau_min``; ERASE decrements on every train-mode forward
  (architecture and validation forwards included), ours never moves in a forward or an evaluation.
* Derivation: the top-``k`` fields by the "select" logit ``alpha[:, 1]`` alone (as ERASE); the final
  model is retrained from scratch on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Arch, Selector


class AutoFieldSelector(Selector):
    default_arch_update = "bilevel"
    defaults_from = ("autofield", "selector")

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        vocab_sizes: Sequence[int],
        tau_start: float | None = None,
        tau_min: float | None = None,
        tau_decay: float | None = None,
        k: int | None = None,
        alpha_init: float | None = None,
    ):
        super().__init__(num_fields, embed_dim, vocab_sizes)
        kn = self.knobs(tau_start=tau_start, tau_min=tau_min, tau_decay=tau_decay, k=k, alpha_init=alpha_init)
        tau_start, tau_min, tau_decay, k, alpha_init = (
            kn["tau_start"],
            kn["tau_min"],
            kn["tau_decay"],
            kn["k"],
            kn["alpha_init"],
        )
        n = self.num_fields
        self.k = n // 2 if k is None else int(k)
        if not 1 <= self.k <= n:
            raise ValueError(f"AutoField k must be in 1..{n} (got {self.k})")
        self.tau_min = float(tau_min)
        self.tau_decay = float(tau_decay)
        self.alpha = nn.Parameter(torch.full((n, 2), float(alpha_init)))
        self.register_buffer("tau", torch.tensor(float(tau_start)))

    def forward(self, e: torch.Tensor, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        if mode == "open":
            return e, {}
        if mode == "stochastic":
            g = F.gumbel_softmax(self.alpha, tau=self.tau, hard=False, dim=1)[:, 1]
        else:
            g = torch.softmax(self.alpha / self.tau, dim=1)[:, 1]
        out = self.fields(e) * g.to(e.dtype).view(1, -1, 1)
        return out.reshape(e.shape[0], -1), {"weights": g}

    @torch.no_grad()
    def on_train_step(self) -> None:
        t = self.tau
        t.copy_(torch.where(t > self.tau_min, (t - self.tau_decay).clamp(min=self.tau_min), t))

    def derive(self, k: int | None = None, **_: Any) -> Arch:
        k = self.k if k is None else int(k)
        if not 1 <= k <= self.num_fields:
            raise ValueError(f"AutoField k must be in 1..{self.num_fields} (got {k})")
        select = self.alpha.detach()[:, 1]
        keep = torch.zeros(self.num_fields, dtype=torch.bool)
        keep[select.topk(k).indices.cpu()] = True
        scores = {
            "alpha_select": select.cpu().tolist(),
            "alpha_drop": self.alpha.detach()[:, 0].cpu().tolist(),
            "tau": float(self.tau),
            "k": k,
        }
        return Arch(field_keep=keep.tolist(), scores=scores)

    def statistics(self) -> dict[str, Any]:
        alpha = self.alpha.detach()
        return {
            "tau": float(self.tau),
            "alpha_select": alpha[:, 1].cpu().tolist(),
            "p_select": torch.softmax(alpha / self.tau, dim=1)[:, 1].cpu().tolist(),
        }
