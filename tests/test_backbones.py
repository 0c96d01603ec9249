"""Every backbone against a brute-force loop (as pytorch-fm pins its models), the per-field dims at
their original positions, and the parameter groups of a backbone's own per-id tables."""

from __future__ import annotations

import itertools

import pytest
import torch

from ihas_lightning.models import DLRM
from ihas_lightning.models.backbones import BACKBONES, build_backbone
from ihas_lightning.models.backbones.parts import CrossNetwork, FirstOrder, PairwiseFM

VOCAB = [5, 7, 3, 4]
D = 4


def _ids(b: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, v, (b,), generator=g) for v in VOCAB], dim=1)


def _padded(h: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """The masked full model's [B, F, D] embedding: each kept dim at its original position, zeros elsewhere."""
    out = torch.zeros(h.shape[0], len(positions), D, dtype=h.dtype)
    c = 0
    for f, p in enumerate(positions):
        for j in p:
            out[:, f, j] = h[:, c]
            c += 1
    return out


def _pairwise_loop(full: torch.Tensor) -> torch.Tensor:
    b, f, _ = full.shape
    out = torch.zeros(b, dtype=full.dtype)
    for i in range(b):
        for a, c in itertools.combinations(range(f), 2):
            out[i] += float(torch.dot(full[i, a], full[i, c]))
    return out


POSITIONS = [[0, 2, 3], [], [1, 2], [0, 1, 2, 3]]  # field 1 dropped; kept dims at original places


def test_pairwise_fm_equals_double_loop_over_fields_with_positions():
    dims = [len(p) for p in POSITIONS]
    h = torch.randn(5, sum(dims), dtype=torch.float64)
    fm = PairwiseFM(dims, D, POSITIONS).double()
    assert torch.allclose(fm(h), _pairwise_loop(_padded(h, POSITIONS)), atol=1e-10)
    # shifting a field's dims to other positions changes the inner products (positions matter)
    moved = [[0, 1, 2], [], [1, 2], [0, 1, 2, 3]]
    assert not torch.allclose(PairwiseFM(dims, D, moved).double()(h), fm(h))


def test_first_order_equals_loop_over_kept_fields():
    dims = [2, 0, 1, 3]
    lin = FirstOrder(VOCAB, dims, sparse=False)
    torch.nn.init.normal_(lin.weight_table.weight)
    x = _ids()
    w = lin.weight_table.weight.squeeze(1)
    want = torch.zeros(len(x))
    off = 0
    for f, d in enumerate(dims):
        if d == 0:
            continue
        for i in range(len(x)):
            want[i] += w[off + x[i, f]]
        off += VOCAB[f]
    assert torch.allclose(lin(x), want, atol=1e-6)


def test_cross_network_equals_per_sample_loop():
    net = CrossNetwork(5, 3).double()
    for b in net.b:
        torch.nn.init.normal_(b)
    x0 = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        got = net(x0)
    for i in range(4):
        xl = x0[i].clone()
        for w, b in zip(net.w, net.b):
            xl = x0[i] * float((xl @ w).detach()) + b.detach() + xl
        assert torch.allclose(got[i], xl, atol=1e-10)


@pytest.mark.parametrize("name", ["fm", "deepfm", "wide_deep"])
def test_backbone_logit_is_sum_of_its_parts(name):
    dims = [len(p) for p in POSITIONS]
    bb = build_backbone(name, dims, vocab_sizes=VOCAB, embed_dim=D, positions=POSITIONS, sparse=False,
                        hidden=(8, 4)).double()  # fmt: skip
    torch.nn.init.normal_(bb.linear.weight_table.weight)
    bb.set_output_bias(0.3)
    x, h = _ids(), torch.randn(6, sum(dims), dtype=torch.float64)
    want = bb.linear(x)
    if name in ("fm", "deepfm"):
        want = want + _pairwise_loop(_padded(h, POSITIONS))
    if name == "fm":
        want = want + 0.3
    else:
        want = want + bb.deep(h)
    assert torch.allclose(bb(h, x), want, atol=1e-8)


@pytest.mark.parametrize("name", ["fm", "deepfm"])
def test_retrained_small_model_equals_masked_full_model(name):
    """A retrained model (tables [vocab_f, d_f], kept dims at their positions) predicts exactly what
    the full uniform model predicts on the masked embedding, for FM-style interactions."""
    torch.manual_seed(0)
    full = DLRM(VOCAB, embed_dim=D, backbone=name, hidden=(6,), sparse=False).double()
    dims = [len(p) for p in POSITIONS]
    small = DLRM(VOCAB, embed_dim=D, field_dims=dims, positions=POSITIONS, backbone=name, hidden=(6,),
                 sparse=False).double()  # fmt: skip
    with torch.no_grad():
        for f, p in enumerate(POSITIONS):
            if p:
                small.embedding.load_field(f, full.embedding.field_weight(f), p)
        # first-order weights: the kept fields' rows; the full model's dropped field gets 0
        w = full.backbone.linear.weight_table.weight
        torch.nn.init.normal_(w)
        off = [0, *itertools.accumulate(VOCAB)]
        w[off[1] : off[2]] = 0.0
        kept_rows = torch.cat([w[off[f] : off[f + 1]] for f, d in enumerate(dims) if d])
        small.backbone.linear.weight_table.weight.copy_(kept_rows)
        if name == "deepfm":  # the deep part reads the kept columns of the full first layer
            cols = [f * D + j for f, p in enumerate(POSITIONS) for j in p]
            small.backbone.deep.net[0].weight.copy_(full.backbone.deep.net[0].weight[:, cols])
            small.backbone.deep.net[0].bias.copy_(full.backbone.deep.net[0].bias)
            small.backbone.deep.net[2].load_state_dict(full.backbone.deep.net[2].state_dict())
        small.backbone.set_output_bias(0.1)
        full.backbone.set_output_bias(0.1)
    mask = torch.zeros(len(VOCAB) * D, dtype=torch.float64)
    for f, p in enumerate(POSITIONS):
        mask[[f * D + j for j in p]] = 1.0
    x = _ids(8, seed=3)
    want = full.backbone(full.embed(x) * mask, x)
    assert torch.allclose(small(x), want, atol=1e-10)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_trains_and_its_tables_are_embedding_parameters(name):
    torch.manual_seed(0)
    m = DLRM(VOCAB, embed_dim=D, backbone=name, hidden=(8,), gate=dict(tau=0.1))
    emb, dense = m.embedding_parameters(), m.dense_parameters()
    ids = {id(p) for p in emb}
    assert {id(t) for t in m.backbone_tables()} <= ids and not ids & {id(p) for p in dense}
    counts = m.parameter_counts()
    assert counts["embedding"] == sum(VOCAB) * D + sum(t.numel() for t in m.backbone_tables())
    assert counts["dense"] == sum(p.numel() for p in m.backbone.parameters()) - sum(
        t.numel() for t in m.backbone_tables()
    )
    x, y = _ids(32), torch.randint(0, 2, (32,)).float()
    before = [p.detach().clone() for p in m.backbone.parameters()]
    for mode in ("open", "stochastic", "deterministic"):
        assert m(x, mode).shape == (32,)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x, "stochastic"), y)
    loss.backward()
    from ihas_lightning.optim import build_embedding_optimizer

    build_embedding_optimizer("sparse_adam", emb, 0.1, 0.0).step()
    torch.optim.Adam(dense, lr=0.1).step()
    moved = [not torch.equal(a, p) for a, p in zip(before, m.backbone.parameters())]
    assert all(moved), f"{name}: some backbone parameter did not move"


def test_every_backbone_runs_a_model_with_every_field_dropped():
    for name in BACKBONES:
        m = DLRM(VOCAB, embed_dim=D, field_dims=[0] * 4, backbone=name, hidden=(4,))
        assert m(_ids()).shape == (6,)


@pytest.mark.parametrize(
    "method", ["ihas", "adafs_soft", "adafs_hard", "autofield", "optfs", "pep", "optembed"]
)
def test_every_selector_with_every_backbone_trains_in_every_mode(method):
    """Selectors x backbones: any method's search model can use any backbone."""
    from omegaconf import OmegaConf

    from ihas_lightning.config import load_group_option

    node = load_group_option("method", method)
    if method == "ihas":  # its selector block interpolates method.gate.*
        node = OmegaConf.create({"method": node}).method
    spec = OmegaConf.to_container(node.selector, resolve=True)
    if "k" in spec:
        spec["k"] = 2
    x, y = _ids(32), torch.randint(0, 2, (32,)).float()
    for name in BACKBONES:
        torch.manual_seed(0)
        m = DLRM(VOCAB, embed_dim=D, backbone=name, hidden=(8,), selector=dict(spec))
        for mode in ("open", "stochastic", "deterministic"):
            out = m(x, mode)
            assert out.shape == (32,) and torch.isfinite(out).all(), (method, name, mode)
        torch.nn.functional.binary_cross_entropy_with_logits(m(x, "stochastic"), y).backward()
        assert any(p.grad is not None for p in m.backbone.parameters()), (method, name)
