"""Selectors: what sits between the per-field embedding and the backbone (one small file per method).

A method's config names its selector by ``_target_`` (``conf/method/<name>.yaml``); only classes of
this package can be built (a checkpoint's hyperparameters never import arbitrary code)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from .base import ARCH_UPDATES, MODES, Arch, Selector

PACKAGE = __name__


def selector_class(target: str) -> type[Selector]:
    """The Selector subclass named by ``target`` (a dotted path inside this package)."""
    if not isinstance(target, str) or not target.startswith(PACKAGE + "."):
        raise ValueError(f"selector _target_ must be a class under {PACKAGE} (got {target!r})")
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"selector _target_ {target!r} not found ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Selector)):
        raise ValueError(f"selector _target_ {target!r} is not a Selector")
    return cls


def build_selector(
    spec: Mapping[str, Any], num_fields: int, embed_dim: int, vocab_sizes: Sequence[int]
) -> Selector:
    """Build the selector of a method config's ``selector`` block (``_target_`` + its knobs)."""
    spec = dict(spec)
    cls = selector_class(spec.pop("_target_", None))
    return cls(num_fields, embed_dim, vocab_sizes, **spec)


__all__ = ["ARCH_UPDATES", "MODES", "Arch", "Selector", "build_selector", "selector_class"]
