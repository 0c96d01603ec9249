"""Pieces shared by the backbones: the first-order (per-id) term, FM's pairwise interactions with
per-field dims at their original positions, the DCN cross network (the deep part is :func:`ihas_lightning.models.mlp.deep_layers`).

Positions. A retrained model keeps, per field, some of the search model's ``embed_dim`` dims
(``positions[f]``: their original indices; default ``0..d_f-1``). Its tables are physically small
(``[vocab_f, d_f]``), but an inner product between two fields must equal the one of the masked full
model: dim j of field a meets dim j of field b only. :class:`PairwiseFM` therefore maps every flat
column to its original position with a fixed 0/1 matrix ``P [sum d_f, embed_dim]``, and uses the
FM identity per position: ``sum_{a<b} <v_a, v_b> = 1/2 * sum_j ((sum_f v_fj)^2 - sum_f v_fj^2)``,
i.e. ``1/2 * sum(((h P)^2 - (h^2) P))`` -- two small matmuls, no padding to the full width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def field_positions(field_dims: Sequence[int], embed_dim: int, positions=None) -> list[list[int]]:
    """Validated original dim indices of each field's kept dims (default: the first d_f)."""
    dims = [int(d) for d in field_dims]
    if positions is None:
        pos = [list(range(d)) for d in dims]
    else:
        pos = [[int(j) for j in p] for p in positions]
        if len(pos) != len(dims) or any(len(p) != d for p, d in zip(pos, dims)):
            raise ValueError(f"positions {[len(p) for p in pos]} do not match field dims {dims}")
    width = max([embed_dim, *[d for d in dims]])
    for f, p in enumerate(pos):
        if len(set(p)) != len(p) or any(not 0 <= j < width for j in p):
            raise ValueError(f"field {f}: positions {p} must be distinct dims in [0, {width})")
    return pos


class FirstOrder(nn.Module):
    """The linear term ``sum_f w[x_f]`` with one scalar weight per feature value, for the fields the
    model keeps (a dropped field, size 0, has no weights). One packed ``nn.Embedding`` (sparse like
    the embedding tables, so the embedding optimizer updates it row-wise)."""

    def __init__(self, vocab_sizes: Sequence[int], field_dims: Sequence[int], sparse: bool = True):
        super().__init__()
        kept = [f for f, d in enumerate(field_dims) if int(d) > 0]
        offsets = [0]
        for f in kept[:-1]:
            offsets.append(offsets[-1] + int(vocab_sizes[f]))
        rows = (offsets[-1] + int(vocab_sizes[kept[-1]])) if kept else 1
        self.weight_table = nn.Embedding(rows, 1, sparse=sparse)
        nn.init.zeros_(self.weight_table.weight)
        self.register_buffer("fields", torch.tensor(kept, dtype=torch.long), persistent=False)
        self.register_buffer(
            "offsets", torch.tensor(offsets if kept else [], dtype=torch.long), persistent=False
        )
        self.num_kept = len(kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_kept == 0:
            return x.new_zeros(x.shape[0], dtype=torch.float32)
        ids = x if self.num_kept == x.shape[1] else x.index_select(1, self.fields)
        return self.weight_table(ids.long() + self.offsets).sum(dim=(1, 2))


class PairwiseFM(nn.Module):
    """``sum_{a<b} <v_a, v_b>`` over fields, each field's kept dims at their original positions."""

    def __init__(self, field_dims: Sequence[int], embed_dim: int, positions=None):
        super().__init__()
        pos = field_positions(field_dims, embed_dim, positions)
        width = sum(len(p) for p in pos)
        span = max([embed_dim, *[j + 1 for p in pos for j in p]])
        P = torch.zeros(width, span)
        c = 0
        for p in pos:
            for j in p:
                P[c, j] = 1.0
                c += 1
        self.register_buffer("P", P, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[1] == 0:
            return h.new_zeros(h.shape[0])
        s = h @ self.P
        return 0.5 * (s * s - (h * h) @ self.P).sum(1)


class CrossNetwork(nn.Module):
    """DCN's cross network (Wang et al. 2017): ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l``."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.w = nn.ParameterList(
            [nn.Parameter(torch.randn(width) * (width**-0.5 if width else 1.0)) for _ in range(layers)]
        )
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(width)) for _ in range(layers)])

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.w, self.b):
            x = x0 * (x @ w).unsqueeze(1) + b + x
        return x
