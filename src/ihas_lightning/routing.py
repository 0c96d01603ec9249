"""Routed inference of iHAS (paper section 3.4 "Clusters" and Figure 1, inference path).

A test sample goes through the searched embedding layer and the Bernoulli gate in deterministic
mode (automatic threshold searcher), giving its masked embedding ``E_i * m_i`` (or, with
``cluster.input``, its mask or its gate probabilities); the nearest K-Means centroid (Euclidean)
picks its cluster, and that cluster's retrained (smaller) DLRM predicts it.

Everything is batched: the batch is routed with one matrix product, then grouped by cluster with a
stable argsort + split (one forward per non-empty cluster, never one per sample), and the outputs
are scattered back to the input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import DLRM

CLUSTER_INPUTS = ("masked_embedding", "mask", "probs")


@torch.no_grad()
def cluster_features(
    model: DLRM, x: torch.Tensor, input: str = "masked_embedding"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, D], deterministic mask [B, D]) of a batch for K-Means and routing.

    ``input`` (``cluster.input``): ``masked_embedding`` = ``E_i * m_i`` (the paper); ``mask`` = the
    0/1 mask ``m_i`` alone (clusters by which dims are open, not by embedding values); ``probs`` =
    the gate probabilities ``p_i``."""
    if model.gate is None:
        raise RuntimeError("this model has no Bernoulli gate")
    e = model.embed(x)
    # the selector's deterministic pass: E * m, with the gate folded into the id table where
    # DLRM.fold_gate made it so (the same masks)
    h, aux = model.select(e, x, "deterministic")
    mask, p = aux["mask"], aux["p"]
    if input == "masked_embedding":
        return h, mask
    if input == "mask":
        return mask, mask
    if input == "probs":
        return p, mask
    raise ValueError(f"cluster input must be one of {CLUSTER_INPUTS}, got {input!r}")


def nearest_centroid(emb: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance) of each row: [B, D], [K, D] -> [B].

    ``|e - c|^2 = |e|^2 - 2 e.c + |c|^2``; the ``|e|^2`` term is the same for every centroid, so the
    argmin of ``|c|^2 - 2 e.c`` is taken (ties go to the lowest index)."""
    if emb.shape[1] != centroids.shape[1]:
        raise ValueError(f"embedding width {emb.shape[1]} != centroid width {centroids.shape[1]}")
    c = centroids.to(emb.dtype)
    scores = torch.addmm((c * c).sum(1).unsqueeze(0), emb, c.t(), alpha=-2.0)
    return scores.argmin(dim=1)


def squared_distances(emb: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Full squared distances [B, K] (clamped at 0)."""
    c = centroids.to(emb.dtype)
    d = (emb * emb).sum(1, keepdim=True) - 2.0 * emb @ c.t() + (c * c).sum(1).unsqueeze(0)
    return d.clamp_min_(0.0)


def dispatch(x: torch.Tensor, clusters: torch.Tensor, models: Sequence[nn.Module]) -> torch.Tensor:
    """Logits [B]: row i predicted by ``models[clusters[i]]``, one forward per non-empty cluster."""
    k = len(models)
    order = torch.argsort(clusters, stable=True)
    counts = torch.bincount(clusters, minlength=k).tolist()
    rows = order.split(counts)
    # a serving layout (FoldedMLP, CompactMLP) gathers exactly the ids it reads; any other model takes its rows
    outs = [
        models[j].forward_rows(x, rows[j]) if hasattr(models[j], "forward_rows")
        else models[j](x.index_select(0, rows[j]))
        for j in range(k) if counts[j] > 0
    ]  # fmt: skip
    out = torch.empty(x.shape[0], dtype=outs[0].dtype if outs else torch.float32, device=x.device)
    if outs:
        out.index_copy_(0, order, torch.cat(outs))
    return out


class RoutedModel(nn.Module):
    """search embedding + gate (deterministic) -> nearest centroid -> that cluster's model."""

    def __init__(
        self,
        search_model: DLRM,
        centroids: torch.Tensor,
        cluster_models: Sequence[DLRM],
        input: str = "masked_embedding",
        router: nn.Module | None = None,
    ):
        """``router``: a distilled router (:class:`~ihas_lightning.models.router.LinearRouter`); with
        it, ``fast=True`` routes by the router instead of the searched embedding + gate."""
        super().__init__()
        if input not in CLUSTER_INPUTS:
            raise ValueError(f"cluster input must be one of {CLUSTER_INPUTS}, got {input!r}")
        self.input = input
        if search_model.gate is None:
            raise ValueError("routing needs the searched model with its Bernoulli gate")
        if len(cluster_models) != centroids.shape[0]:
            raise ValueError(f"{len(cluster_models)} cluster models for {centroids.shape[0]} centroids")
        self.search_model = search_model
        self.register_buffer("centroids", centroids.detach().float().clone())
        self.cluster_models = nn.ModuleList(cluster_models)
        self.router = router
        self.fast = False
        # fast routing in one lookup (:class:`~ihas_lightning.models.fused.FusedRouting`), set by compact()
        self.fused: nn.Module | None = None

    def compact(self) -> RoutedModel:
        """The same routed model with each cluster model in its serving layout
        (:func:`ihas_lightning.models.compact.compact`: folded or padded where one applies): the same
        logits in fewer, larger ops. When the router and every cluster model can share one table
        (:mod:`ihas_lightning.models.fused`), fast routing reads each id once. Shares the search model,
        centroids and router."""
        from .models.compact import compact
        from .models.fused import FusedRouting, fusable

        models = [compact(m) for m in self.cluster_models]
        out = RoutedModel(self.search_model, self.centroids, models, self.input, self.router)
        out.fast = self.fast
        if fusable(self.router, models):
            out.fused = FusedRouting(self.router, models).eval()
        return out.eval()

    def with_fast_routing(self) -> RoutedModel:
        """The same models routed by the distilled router (shares every module with this one)."""
        if self.router is None:
            raise ValueError("no distilled router (re-run stage=cluster with cluster.router.enabled=true)")
        fast = RoutedModel(
            self.search_model, self.centroids, list(self.cluster_models), self.input, self.router
        )
        fast.fast = True
        fast.fused = self.fused
        return fast.eval()

    @property
    def num_clusters(self) -> int:
        return len(self.cluster_models)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster id [B] of each sample."""
        if self.fast:
            return self.router.route(x)
        feats, _ = cluster_features(self.search_model, x, self.input)
        return nearest_centroid(feats, self.centroids)

    @torch.no_grad()
    def forward_with_clusters(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fast and self.fused is not None:  # the router and the cluster models in one lookup
            return self.fused(x)
        clusters = self.route(x)
        return dispatch(x, clusters, self.cluster_models), clusters

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B]."""
        return self.forward_with_clusters(x)[0]

    def routing_parameters(self) -> int:
        """Parameters of the shared routing path: search embedding tables + gate (+ centroids)."""
        m = self.search_model
        return (
            sum(p.numel() for p in m.embedding.parameters())
            + sum(p.numel() for p in m.gate_parameters())
            + self.centroids.numel()
        )

    def cluster_parameters(self) -> list[int]:
        return [m.num_parameters() for m in self.cluster_models]
