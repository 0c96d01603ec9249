"""iHAS's selector: the instance-wise Bernoulli gate (paper section 3.3), one keep-probability per
embedding dimension of each sample; see :mod:`ihas_lightning.models.gate` for the gate itself.

* ``stochastic``: straight-through Gumbel-Softmax masks (tau 0.1); ``deterministic``: the automatic
  threshold searcher (per-sample histogram valley); ``open``: all ones, the gate not evaluated.
* The gate reads the detached embedding, so the model step reaches V only through the masked
  embedding and the gate step moves the gate's weights only (bi-level).
* Regularizer ``lambda * sum_j (p_ij - |p_ij - mean_j p_ij|)`` (sparsity + polarization).
* Arch optimisation: L2 weight decay on the gate's weight matrix only (its bias, the
  sample-independent part of each gate, and the shared vector of the non-instance-wise ablation are
  not decayed).
* Derivation needs data (thresholds + K-Means + majority dims): the cluster stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..gate import BernoulliGate, gate_regularizer
from .base import Selector

GATE_KEYS = ("tau", "instance_wise", "bins", "init_bias", "input_norm")


class BernoulliSelector(Selector):
    default_arch_update = "bilevel"
    detach_input = True
    defaults_from = ("ihas", "gate")

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        vocab_sizes: Sequence[int],
        tau: float | None = None,
        instance_wise: bool | None = None,
        bins: int | None = None,
        init_bias: float | None = None,
        input_norm: str | None = None,
        lambda_reg: float | None = None,
        polarization: bool | None = None,
        polarization_weight: float | None = None,
        threshold: str | None = None,
    ):
        super().__init__(num_fields, embed_dim, vocab_sizes)
        kn = self.knobs(
            tau=tau,
            instance_wise=instance_wise,
            bins=bins,
            init_bias=init_bias,
            input_norm=input_norm,
            lambda_reg=lambda_reg,
            polarization=polarization,
            polarization_weight=polarization_weight,
            threshold=threshold,
        )
        tau, instance_wise, bins, init_bias, input_norm, lambda_reg, polarization = (
            kn["tau"],
            kn["instance_wise"],
            kn["bins"],
            kn["init_bias"],
            kn["input_norm"],
            kn["lambda_reg"],
            kn["polarization"],
        )
        self.gate = BernoulliGate(
            num_fields * embed_dim,
            tau=tau,
            instance_wise=instance_wise,
            bins=bins,
            init_bias=init_bias,
            input_norm=input_norm,
            threshold=kn["threshold"] or "valley",
        )
        self.lambda_reg = float(lambda_reg)
        self.polarization = bool(polarization)
        pw = 1.0 if kn["polarization_weight"] is None else float(kn["polarization_weight"])
        if not 0.0 <= pw <= 1.0:
            raise ValueError(f"polarization_weight must be in [0, 1], got {pw}")
        self.polarization_weight = pw
        # the gate folded into the id table (:mod:`ihas_lightning.models.folded_gate`), set by
        # :meth:`fold` for inference; a plain attribute, never saved
        self.folded: Any = None

    def forward(self, e: torch.Tensor, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        if mode == "open":
            return e, {}
        if mode == "deterministic":
            return self._deterministic(e, x)
        mask, p = self.gate(e.detach(), mode)
        return e * mask, {"mask": mask, "p": p}

    def _deterministic(self, e: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The automatic threshold searcher; its per-sample thresholds feed the gate statistics. With a
        current fold (inference) the logits come from it; a constant one gives every row row 0's."""
        folded = self.folded
        if folded is not None and not torch.is_grad_enabled() and folded.current():
            z = folded(x[:1] if folded.constant else x)
            p = torch.sigmoid(z)
        else:
            p = self.gate.probs(e.detach())
        thr, found = self.gate.threshold(p, return_found=True)
        mask = (p > thr.unsqueeze(1)).to(p.dtype)
        if p.shape[0] != e.shape[0]:  # the constant fold: one row's, the same for every sample
            b = e.shape[0]
            p, mask, thr, found = p.expand(b, -1), mask.expand(b, -1), thr.expand(b), found.expand(b)
        return e * mask, {"mask": mask, "p": p, "threshold": thr, "found": found}

    def fold(self, embedding: Any, max_bytes: int | None = None) -> bool:
        """Fold the gate into ``embedding``'s id table for inference (True: folded; see
        :class:`~ihas_lightning.models.folded_gate.FoldedGate` for when it applies)."""
        from ..folded_gate import MAX_BYTES, FoldedGate

        self.folded = FoldedGate.build(embedding, self.gate, MAX_BYTES if max_bytes is None else max_bytes)
        return self.folded is not None

    def unfold(self) -> None:
        self.folded = None

    def open_all(self) -> None:
        """Every gate open for every sample (the search's gates-open fallback)."""
        self.gate.open_all()

    def arch_param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        if self.gate.instance_wise:
            return [
                {"params": [self.gate.linear.weight], "weight_decay": float(weight_decay)},
                {"params": [self.gate.linear.bias], "weight_decay": 0.0},
            ]
        return [{"params": [self.gate.logits], "weight_decay": 0.0}]

    def regularizer(self, aux: dict[str, Any]) -> torch.Tensor | None:
        p = aux.get("p")
        if p is None:
            return None
        return gate_regularizer(p, self.lambda_reg, self.polarization, self.polarization_weight)
