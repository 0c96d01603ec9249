"""OptFS (WWW'23, the authors' code): one gate logit ``w_v`` per feature value (per row of the
concatenated vocabulary), initialised to ``mask_init``.

* ``stochastic`` = ``deterministic`` (no noise): ``m_{b,f} = sigmoid(tau * w[x_{b,f} + offset_f]) /
  sigmoid(mask_init)`` (so m = 1 at init) and ``E'_{b,f} = m_{b,f} * E_{b,f}``; ``open``: identity.
* Regularizer ``lambda * sum_{all |V| rows} sigmoid(tau * w)``: a full-table sum as the authors (hence
  the tiny lambda), not a batch mean; none in ``open`` mode (the gate is bypassed).
* Temperature per search epoch: ``tau = final_temp ** (e / (E - 1))``, 1 in the first search epoch
  and ``final_temp`` in the last (1 throughout when E <= 1).
* Single-level: the gates step with the model on every training batch (``joint``).
* Derivation: keep the rows with ``w > 0``; retraining rewinds to an early checkpoint on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import Arch, Selector


class OptFSSelector(Selector):
    default_arch_update = "joint"
    defaults_from = ("optfs", "selector")

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        vocab_sizes: Sequence[int],
        mask_init: float | None = None,
        final_temp: float | None = None,
        lambda_reg: float | None = None,
    ):
        super().__init__(num_fields, embed_dim, vocab_sizes)
        kn = self.knobs(mask_init=mask_init, final_temp=final_temp, lambda_reg=lambda_reg)
        mask_init, final_temp, lambda_reg = kn["mask_init"], kn["final_temp"], kn["lambda_reg"]
        self.mask_init = float(mask_init)
        self.final_temp = float(final_temp)
        self.lambda_reg = float(lambda_reg)
        # sigmoid(mask_init) rounded as the float32 gate computes it, so m is exactly 1 at init
        self.norm = float(torch.sigmoid(torch.tensor(self.mask_init)))
        self.w = nn.Parameter(torch.full((sum(self.vocab_sizes),), self.mask_init))
        self.register_buffer("tau", torch.tensor(1.0))
        self.register_buffer("offsets", self.field_offsets(), persistent=False)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Global rows [B, N] (long) of the per-field ids."""
        return x.long() + self.offsets

    def forward(self, e: torch.Tensor, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        if mode == "open":
            return e, {}
        m = torch.sigmoid(self.tau * self.w[self.rows(x)]) / self.norm
        out = self.fields(e) * m.to(e.dtype).unsqueeze(-1)
        return out.reshape(e.shape[0], -1), {"mask": m}

    def regularizer(self, aux: dict[str, Any]) -> torch.Tensor | None:
        if "mask" not in aux:
            return None
        return self.lambda_reg * torch.sigmoid(self.tau * self.w).sum()

    @torch.no_grad()
    def on_search_epoch_start(self, search_epoch: int, max_search_epochs: int) -> None:
        E = int(max_search_epochs)
        tau = self.final_temp ** (search_epoch / (E - 1)) if E > 1 else 1.0
        self.tau.fill_(tau)

    def kept_per_field(self) -> list[int]:
        keep = (self.w.detach() > 0).long().cpu()
        return [int(k.sum()) for k in keep.split(self.vocab_sizes)]

    def derive(self, **_: Any) -> Arch:
        row_keep = (self.w.detach() > 0).cpu()
        scores = {
            "kept_share": float(row_keep.float().mean()),
            "kept_per_field": self.kept_per_field(),
            "tau": float(self.tau),
        }
        return Arch(row_keep=row_keep, scores=scores)

    def statistics(self) -> dict[str, Any]:
        return {"tau": float(self.tau), "kept_share": float((self.w.detach() > 0).float().mean())}
