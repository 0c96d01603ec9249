"""Backbones: what predicts the logit from the (selected) embedding. One small file each.

A backbone is built from the per-field embedding widths it receives (``field_dims``; 0 = a dropped
field), the original dim index of each kept dim (``positions``, for the pairwise inner products), the
vocabulary (for a first-order term over the raw feature values) and its knobs. ``forward(h, x)`` maps
the flat embedding ``h [B, sum(field_dims)]`` and the ids ``x [B, F]`` to logits ``[B]``;
``set_output_bias`` sets the initial output bias. It owns every parameter it adds: an
``nn.Embedding`` (e.g. the first-order weights) is trained with the embedding tables' optimizer,
anything else with the dense one (see :class:`~ihas_lightning.models.dlrm.DLRM`).

``model.backbone`` (chosen with the ``backbone=`` config group): mlp | fm | wide_deep | deepfm | dcn.
"""

from __future__ import annotations

from typing import Any

from .dcn import DCNBackbone
from .deepfm import DeepFMBackbone
from .fm import FMBackbone
from .mlp import MLPBackbone
from .wide_deep import WideDeepBackbone

BACKBONES = {
    "mlp": MLPBackbone,
    "fm": FMBackbone,
    "wide_deep": WideDeepBackbone,
    "deepfm": DeepFMBackbone,
    "dcn": DCNBackbone,
}


def build_backbone(name: str, field_dims: list[int], **cfg: Any):
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r} (choose one of {sorted(BACKBONES)})")
    return BACKBONES[name](field_dims, **cfg)


__all__ = ["BACKBONES", "DCNBackbone", "DeepFMBackbone", "FMBackbone", "MLPBackbone", "WideDeepBackbone",
           "build_backbone"]  # fmt: skip
