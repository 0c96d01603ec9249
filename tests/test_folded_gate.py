"""The gate folded into the id table (models/folded_gate.py): the same logits and masks as the gate's
matmul, against the unfolded model as the reference, for every input norm; a constant fold after
open_all; never used once stale, in training or above its memory cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ihas_lightning.models import DLRM
from ihas_lightning.models.folded_gate import FoldedGate
from ihas_lightning.models.gate import _bin_counts
from ihas_lightning.routing import cluster_features

VOCAB = [7, 3, 11, 5]


def _model(input_norm: str = "none", seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    m = DLRM(VOCAB, embed_dim=4, hidden=(8,), gate={"input_norm": input_norm, "init_bias": 0.0})
    with torch.no_grad():
        m.gate.linear.weight.normal_(std=2.0)  # a gate that tells the samples apart
        m.embedding.tables[0].weight.normal_()
    if input_norm == "center":
        m.gate.input_mean.normal_()
    if input_norm == "batch":
        m.train()
        m.gate.norm(torch.randn(64, m.gate.dim) * 3 + 1)  # running statistics
    return m.eval()


def _ids(n: int = 257, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1)


@pytest.mark.parametrize("norm", ["none", "center", "batch"])
def test_fold_gives_the_matmul_logits_and_masks(norm):
    m, x = _model(norm), _ids()
    with torch.inference_mode():
        ref_z = m.gate.gate_logits(m.embed(x))
        ref_f, ref_m = cluster_features(m, x)
        assert m.fold_gate().startswith("folded into the id table")
        z = m.selector.folded(x)
        f, mask = cluster_features(m, x)
    torch.testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ref_m) and torch.equal(f, ref_f)
    assert 0 < float(ref_m.mean()) < 1  # the masks are not trivial


def test_open_gate_folds_to_its_bias_and_every_row_gets_the_same_mask():
    m, x = _model(), _ids(33)
    m.selector.open_all()
    with torch.inference_mode():
        ref = cluster_features(m, x)
        assert "bias" in m.fold_gate()
        assert m.selector.folded.constant and m.selector.folded.nbytes == 0
        got = cluster_features(m, x)
        empty = cluster_features(m, x[:0])
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[1].shape == (33, m.gate.dim) and bool(got[1].all())
    assert empty[1].shape == (0, m.gate.dim)


def test_a_stale_fold_is_not_used_and_training_never_uses_it():
    m, x = _model(), _ids()
    m.fold_gate()
    with torch.no_grad():
        m.gate.linear.weight.mul_(-1.0)  # the weights change after the fold
    assert not m.selector.folded.current()
    with torch.inference_mode():
        _, mask = cluster_features(m, x)
        ref = torch.sigmoid(m.gate.gate_logits(m.embed(x)))
    assert torch.equal(mask, m.gate.deterministic_mask(ref))
    m2 = _model(seed=3)
    m2.fold_gate()
    m2.selector.folded.table.zero_()  # a wrong table: grad-enabled passes must not read it
    e = m2.embed(x)
    _, aux = m2.selector(e, x, "deterministic")
    assert torch.equal(aux["p"], torch.sigmoid(m2.gate.gate_logits(e)))


def test_fold_is_refused_above_its_memory_cap_and_for_a_shared_gate():
    m = _model()
    assert m.fold_gate(max_bytes=16) == "not folded (the gate's matmul is kept)"
    assert m.selector.folded is None
    torch.manual_seed(0)
    shared = DLRM(VOCAB, embed_dim=4, hidden=(8,), gate={"instance_wise": False})
    assert FoldedGate.build(shared.embedding, shared.gate) is None


def test_fold_is_not_saved_in_the_state_dict():
    m = _model()
    keys = set(m.state_dict())
    m.fold_gate()
    assert set(m.state_dict()) == keys


@pytest.mark.parametrize("bins", [3, 20, 50])
def test_bin_counts_match_a_loop(bins):
    g = torch.Generator().manual_seed(bins)
    p = torch.rand(40, 37, generator=g)
    p[0, :5] = 1.0
    p[1, :5] = 0.0
    got = _bin_counts(p, bins).numpy()
    ref = np.zeros((40, bins), dtype=np.int64)
    for i in range(40):
        for v in p[i].tolist():
            ref[i, min(int(v * bins), bins - 1)] += 1
    assert (got == ref).all()
