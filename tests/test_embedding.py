"""FieldEmbedding: per-field sizes packed into shared tables, read back in field order."""

from __future__ import annotations

import torch

from ihas_lightning.models import FieldEmbedding


def test_field_embedding_with_mixed_sizes_is_the_per_field_lookups_in_field_order():
    """Per-field sizes are packed by size into shared tables; the output must still be each field's
    own lookup, in field order (dropped fields absent) -- checked against a loop over fields."""
    torch.manual_seed(0)
    vocab, dims = [5, 3, 7, 4, 6, 2], [8, 0, 16, 8, 4, 16]
    emb = FieldEmbedding(vocab, dims, sparse=False)
    assert emb.needs_reorder
    x = torch.stack([torch.randint(0, v, (32,)) for v in vocab], 1)
    want = []
    for f, d in enumerate(dims):
        if d:
            g, start, _ = emb.table_rows(f)
            want.append(emb.tables[g].weight[start + x[:, f]])
    assert torch.equal(emb(x), torch.cat(want, 1))
