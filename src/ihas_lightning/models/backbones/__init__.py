"""Backbones: what predicts the logit from the (selected) embedding. One small file each.

A backbone is built from the per-field embedding widths it receives (``field_dims``; 0 = a dropped
field) and maps the flat embedding ``[B, sum(field_dims)]`` to logits ``[B]``; it owns every
parameter it adds (they are trained through the model's structural parameter groups)."""

from __future__ import annotations

from typing import Any

from .mlp import MLPBackbone

BACKBONES = {"mlp": MLPBackbone}


def build_backbone(name: str, field_dims: list[int], **cfg: Any):
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r} (choose one of {sorted(BACKBONES)})")
    return BACKBONES[name](field_dims, **cfg)


__all__ = ["BACKBONES", "MLPBackbone", "build_backbone"]
