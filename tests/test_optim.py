"""Row-wise (lazy) Adam for the embedding tables vs torch.optim.Adam."""

from __future__ import annotations

import pytest
import torch

from ihas_lightning.errors import ConfigError
from ihas_lightning.optim import RowwiseAdam, build_embedding_optimizer


def _pair(rows=50, dim=4, wd=1e-2):
    torch.manual_seed(0)
    w = torch.randn(rows, dim)
    a = torch.nn.Parameter(w.clone())
    b = torch.nn.Parameter(w.clone())
    return a, b, RowwiseAdam([a], lr=1e-2, weight_decay=wd), torch.optim.Adam([b], lr=1e-2, weight_decay=wd)


@pytest.mark.parametrize("kind", ["coalesced", "duplicates", "dense"])
def test_rowwise_adam_equals_adam_when_all_rows_touched(kind):
    a, b, opt_a, opt_b = _pair()
    rows, dim = a.shape
    for step in range(5):
        g = torch.randn(rows, dim, generator=torch.Generator().manual_seed(step))
        if kind == "coalesced":
            a.grad = torch.sparse_coo_tensor(torch.arange(rows)[None], g, (rows, dim)).coalesce()
        elif kind == "duplicates":  # uncoalesced, as nn.Embedding(sparse=True) produces: rows repeat
            idx = torch.cat([torch.arange(rows), torch.arange(rows)])
            a.grad = torch.sparse_coo_tensor(idx[None], torch.cat([g * 0.25, g * 0.75]), (rows, dim))
        else:
            a.grad = g.clone()
        b.grad = g.clone()
        opt_a.step()
        opt_b.step()
        if kind == "duplicates":  # the duplicate sum may round differently in the last bit
            torch.testing.assert_close(a.data, b.data, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a.data, b.data), step
    if kind != "duplicates":
        assert torch.equal(opt_a.state[a]["exp_avg"], opt_b.state[b]["exp_avg"])
        assert torch.equal(opt_a.state[a]["exp_avg_sq"], opt_b.state[b]["exp_avg_sq"])


def test_rowwise_adam_is_lazy_on_untouched_rows():
    a, _, opt, _ = _pair(wd=1e-1)
    before = a.data.clone()
    touched = torch.tensor([3, 7, 7, 11])
    a.grad = torch.sparse_coo_tensor(touched[None], torch.ones(4, a.shape[1]), a.shape)
    opt.step()
    changed = (a.data != before).any(1).nonzero().squeeze(1).tolist()
    assert changed == [3, 7, 11]
    m = opt.state[a]["exp_avg"]
    assert m[7].tolist() == pytest.approx(((1 - 0.9) * (2 + 0.1 * before[7])).tolist())
    assert m[0].abs().sum() == 0


def test_embedding_end_to_end_matches_dense_adam():
    """Through nn.Embedding(sparse=True) vs dense: same updates when every row is looked up."""
    torch.manual_seed(0)
    e1 = torch.nn.Embedding(10, 3, sparse=True)
    e2 = torch.nn.Embedding(10, 3)
    e2.weight.data.copy_(e1.weight.data)
    o1 = build_embedding_optimizer("sparse_adam", e1.parameters(), 1e-2, 1e-6)
    o2 = build_embedding_optimizer("dense_adam", e2.parameters(), 1e-2, 1e-6)
    for _ in range(3):
        idx = torch.cat([torch.arange(10), torch.randint(0, 10, (20,))])
        for e, o in ((e1, o1), (e2, o2)):
            o.zero_grad()
            (e(idx) ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(e1.weight, e2.weight, rtol=1e-5, atol=1e-6)


def test_unknown_embedding_optimizer_is_config_error():
    with pytest.raises(ConfigError, match="model.embedding_optimizer"):
        build_embedding_optimizer("adagrad", [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0)


@pytest.mark.parametrize("n,k", [(1, 5), (10, 3), (55, 200), (1000, 80), (5000, 20000)])
def test_dedupe_equals_torch_unique(n, k):
    """The sort-free dedupe of a small table's row ids: the same rows (sorted) and inverse as unique."""
    idx = torch.randint(0, n, (k,), generator=torch.Generator().manual_seed(n + k))
    rows, inv = RowwiseAdam.dedupe(idx, n)
    want_rows, want_inv = torch.unique(idx, sorted=True, return_inverse=True)
    assert torch.equal(rows, want_rows) and torch.equal(inv, want_inv)
    assert torch.equal(rows[inv], idx)
