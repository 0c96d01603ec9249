"""The selector interface: the part of a model between the per-field embedding and the backbone.

Every method of the paper's comparison is a selector (Base is the identity, iHAS the Bernoulli gate,
AdaFS a controller, AutoField per-field logits, OptFS per-value gates). A selector declares

* its **forward** in three modes -- ``open`` (bypassed: pretraining, or a Base model), ``stochastic``
  (the search-time training forward) and ``deterministic`` (evaluation and derivation) -- returning
  the masked / re-weighted embedding and an auxiliary dict (probabilities, masks);
* its **architecture parameters** (:meth:`arch_parameters`) and how they are optimised
  (:meth:`arch_param_groups`, the optimizer settings come from the method config); every other
  parameter of the selector (e.g. AdaFS's embedding BatchNorm) is a model parameter;
* its **regularizer** (:meth:`regularizer`), added to the loss of the architecture update;
* its **schedules**: :meth:`on_train_step` (once per training batch of the search phase) and
  :meth:`on_search_epoch_start`; evaluation never advances them, and their state lives in buffers so
  a checkpoint carries it;
* how the final architecture is **derived** (:meth:`derive`): kept fields, kept feature values, or
  nothing (the selector ships at inference). iHAS's derivation needs data (per-sample thresholds +
  K-Means) and is the cluster stage.

Inputs: ``e`` is the flat embedding ``[B, N*d]`` (uniform dims: field f owns columns
``f*d .. (f+1)*d-1``) and ``x`` the per-field ids ``[B, N]`` (without table offsets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

MODES = ("open", "stochastic", "deterministic")
ARCH_UPDATES = ("none", "joint", "bilevel")


@dataclass
class Arch:
    """A derived architecture (JSON-ready apart from ``row_keep``).

    ``field_keep`` [N] bool: the fields the final model keeps (AutoField); ``row_keep`` [|V|] bool over
    the concatenated vocabulary (field-major, each field's ids in order): the feature values whose
    embedding rows survive (OptFS); ``scores``: what the choice was made on, for the report."""

    field_keep: list[bool] | None = None
    row_keep: torch.Tensor | None = None
    #: [|V|, d] bool: the embedding entries that survive (PEP)
    entry_mask: torch.Tensor | None = None
    #: [N] ints: each field's embedding size, its first dims kept (OptEmbed)
    field_dims: list[int] | None = None
    scores: dict[str, Any] = field(default_factory=dict)


class Selector(nn.Module):
    #: the architecture update a method uses unless its config says otherwise
    default_arch_update = "none"
    #: where the knobs' defaults live: (method config, block), e.g. ("autofield", "selector") =
    #: ``conf/method/autofield.yaml``'s ``selector`` block; a knob passed as None takes that value,
    #: so a selector built in Python and one built by a run share one set of defaults
    defaults_from: tuple[str, str] | None = None
    #: the gate reads a detached embedding (the two levels of a bi-level search stay disjoint)
    detach_input = False

    def __init__(self, num_fields: int, embed_dim: int, vocab_sizes: Sequence[int]):
        super().__init__()
        self.num_fields = int(num_fields)
        self.embed_dim = int(embed_dim)
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        if len(self.vocab_sizes) != self.num_fields:
            raise ValueError(f"{len(self.vocab_sizes)} vocab sizes for {self.num_fields} fields")

    #: transfer: loaded from another run and frozen (no gradient; always in eval mode)
    frozen = False

    def freeze(self) -> Selector:
        """Freeze every parameter (architecture and model-side) and keep dropout / BatchNorm in eval
        mode: the selector of another run reused as is (paper RQ2, ``transfer.from``)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def knobs(self, **given: Any) -> dict[str, Any]:
        """``given`` with every None replaced by the value in :attr:`defaults_from` (which may be null)."""
        if self.defaults_from is None:
            return given
        from ...config import group_defaults

        d = group_defaults("method", *self.defaults_from)
        return {k: (d.get(k) if v is None else v) for k, v in given.items()}

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, e: torch.Tensor, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def fields(self, e: torch.Tensor) -> torch.Tensor:
        """[B, N*d] -> a [B, N, d] view."""
        return e.view(e.shape[0], self.num_fields, self.embed_dim)

    def field_offsets(self, device: torch.device | None = None) -> torch.Tensor:
        """First row of each field in the concatenated vocabulary [N] (long)."""
        off = torch.tensor([0] + self.vocab_sizes[:-1], dtype=torch.long, device=device).cumsum(0)
        return off

    # ---- optimisation ------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def arch_param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        params = self.arch_parameters()
        return [{"params": params, "weight_decay": float(weight_decay)}] if params else []

    def regularizer(self, aux: dict[str, Any]) -> torch.Tensor | None:
        return None

    # ---- schedules ---------------------------------------------------------------------------------
    def on_train_step(self) -> None:
        """Advance per-step schedules (search-phase training batches only)."""

    def on_search_epoch_start(self, search_epoch: int, max_search_epochs: int) -> None:
        """Advance per-epoch schedules (``search_epoch`` counts from 0 at the first search epoch)."""

    def snapshot_requests(self, model: nn.Module) -> list[str]:
        """Tags of snapshots to take now, after a search-phase training step (PEP: each parameter
        budget the pruned table reaches). ``model`` is the whole model (the selector may read its tables)."""
        return []

    def search_done(self) -> bool:
        """True when the search has nothing left to do (PEP: every budget reached); the fit then stops."""
        return False

    # ---- derivation --------------------------------------------------------------------------------
    def derive(self, **kw: Any) -> Arch | None:
        """The final architecture, or None when the selector itself ships at inference. ``kw`` may hold
        ``snapshots`` ({tag: state dict path}) for a selector that derives from a snapshot."""
        return None

    def statistics(self) -> dict[str, Any]:
        """Small JSON-ready state for metrics.json (temperatures, kept shares, ...)."""
        return {}


def gumbel_like(t: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of ``t``'s shape."""
    u = torch.rand_like(t).clamp_(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))
