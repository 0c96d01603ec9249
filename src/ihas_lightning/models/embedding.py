"""Per-field embedding tables (the paper's V = [v_1, ..., v_N]) with per-field sizes.

Fields that share a size are packed into ONE ``nn.Embedding`` with per-field row offsets, so a batch
costs one lookup per distinct size (one in total for the uniform 16-dim search model) instead of one
per field. A field of size 0 is dropped: it has no table rows and contributes nothing to the output.
With ``sparse=True`` the tables produce sparse row gradients, which our row-wise optimizer consumes
(only the rows a batch touches are updated).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FieldEmbedding(nn.Module):
    def __init__(self, vocab_sizes: Sequence[int], dims: int | Sequence[int] = 16, sparse: bool = True):
        super().__init__()
        vocab_sizes = [int(v) for v in vocab_sizes]
        if isinstance(dims, int):
            dims = [dims] * len(vocab_sizes)
        dims = [int(d) for d in dims]
        if len(dims) != len(vocab_sizes):
            raise ValueError(f"{len(dims)} dims for {len(vocab_sizes)} fields")
        if any(d < 0 for d in dims) or any(v < 1 for v in vocab_sizes):
            raise ValueError("field dims must be >= 0 and vocab sizes >= 1")
        self.vocab_sizes = vocab_sizes
        self.dims = dims
        self.sparse = sparse
        self.output_dim = sum(dims)
        self.group_dims: list[int] = sorted({d for d in dims if d > 0})
        self.tables = nn.ModuleList()
        # column order: groups are concatenated by size; `order` maps them back to field order
        group_cols: list[list[int]] = []
        col_start = [0]
        for d in dims:
            col_start.append(col_start[-1] + d)
        for g, d in enumerate(self.group_dims):
            fields = [i for i, fd in enumerate(dims) if fd == d]
            offsets = [0]
            for i in fields[:-1]:
                offsets.append(offsets[-1] + vocab_sizes[i])
            rows = offsets[-1] + vocab_sizes[fields[-1]]
            self.tables.append(nn.Embedding(rows, d, sparse=sparse))
            self.register_buffer(f"fields_{g}", torch.tensor(fields, dtype=torch.long), persistent=False)
            self.register_buffer(f"offsets_{g}", torch.tensor(offsets, dtype=torch.long), persistent=False)
            group_cols.append([c for i in fields for c in range(col_start[i], col_start[i] + d)])
        flat = [c for cols in group_cols for c in cols]
        inverse = [0] * len(flat)
        for pos, c in enumerate(flat):
            inverse[c] = pos
        self.needs_reorder = flat != list(range(len(flat)))
        self.register_buffer("order", torch.tensor(inverse, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for t in self.tables:
            nn.init.normal_(t.weight, std=1e-2)

    @property
    def uniform(self) -> bool:
        return len(self.group_dims) == 1 and all(d == self.group_dims[0] for d in self.dims)

    def field_slices(self) -> list[slice]:
        """Column slice of each field in the flat output (empty for dropped fields)."""
        out, start = [], 0
        for d in self.dims:
            out.append(slice(start, start + d))
            start += d
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: integer ids [B, F] (int32 or int64) -> flat embedding [B, sum(dims)] in field order."""
        parts = []
        for g, table in enumerate(self.tables):
            fields = getattr(self, f"fields_{g}")
            offsets = getattr(self, f"offsets_{g}")
            # the uniform search model packs every field in order: no column gather needed
            ids = x if len(fields) == x.shape[1] else x.index_select(1, fields)
            idx = ids.long() + offsets
            parts.append(table(idx).flatten(1))
        if not parts:
            return x.new_zeros((x.shape[0], 0), dtype=torch.float32)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.index_select(1, self.order) if self.needs_reorder else out

    def table_rows(self, field: int) -> tuple[int, int, int]:
        """(table index, first row, dim) of ``field``; raises for a dropped field."""
        d = self.dims[field]
        if d == 0:
            raise KeyError(f"field {field} is dropped (size 0)")
        g = self.group_dims.index(d)
        fields = getattr(self, f"fields_{g}").tolist()
        pos = fields.index(field)
        return g, int(getattr(self, f"offsets_{g}")[pos]), d

    def field_weight(self, field: int) -> torch.Tensor:
        """The [vocab, dim] table of one field (a view into its packed table)."""
        g, start, _ = self.table_rows(field)
        return self.tables[g].weight[start : start + self.vocab_sizes[field]]
