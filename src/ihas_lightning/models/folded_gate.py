"""The Bernoulli gate folded into the id table: its inference logits in one lookup and sum.

The gate's logits are ``z = W (E - mu) + b`` over the concatenated embedding ``E = [E_1 .. E_N]``
(``mu``: the gate's input centring, 0 without one). Split ``W`` by field, ``z = sum_f W_f E_f[id_f] +
(b - W mu)``: per id, the N*d-vector ``P[id] = W_f E_f[id]`` is computed once (rows x N*d x d
multiply-adds: 2 GFLOP on full Criteo), and a sample's logits are the sum of its N rows of ``P``
(N x N*d adds, against the matmul's N*d x N*d multiply-adds: 1/d of the work; the hot ids' rows stay
in cache). The same logits up to float summation order. Memory: rows x N*d floats (1M ids x 624:
2.5 GB); above ``max_bytes`` no fold is built and the gate keeps its matmul.

A gate that no longer depends on the sample (:meth:`~ihas_lightning.models.gate.BernoulliGate.open_all`,
the search's gates-open fallback: zero weights) folds to its bias alone, no table: every sample then
gets the same probabilities, threshold and mask, computed once.

Inference only (the stages that score a finished search: cluster, evaluate): the fold is a copy, so
it checks on every call that the weights it was built from are unchanged (:meth:`FoldedGate.current`).
It is a plain object, not a module: it is never saved in a checkpoint or exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the largest folded table built (bytes); a larger vocabulary keeps the gate's matmul
MAX_BYTES = 4 * 2**30


class FoldedGate:
    """``forward(x) -> z [B, N*d]``: the gate logits of the ids ``x`` [B, N] (see the module docstring)."""

    def __init__(self, table: torch.Tensor | None, offsets: torch.Tensor | None, bias: torch.Tensor, sources):
        self.table, self.offsets, self.bias = table, offsets, bias
        self._sources = sources
        self._versions = self._state()

    @property
    def constant(self) -> bool:
        """The logits are the same for every sample (the bias alone)."""
        return self.table is None

    @property
    def nbytes(self) -> int:
        return 0 if self.table is None else self.table.numel() * self.table.element_size()

    def _state(self) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t._version) for t in self._sources]

    def current(self) -> bool:
        """The weights it was folded from are unchanged (no training step, no load since)."""
        return self._state() == self._versions

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return self.bias.unsqueeze(0).expand(x.shape[0], -1)
        idx = x.long() + self.offsets
        return F.embedding_bag(idx, self.table, mode="sum") + self.bias

    @classmethod
    @torch.no_grad()
    def build(cls, embedding, gate, max_bytes: int = MAX_BYTES) -> FoldedGate | None:
        """The fold of ``gate`` (a :class:`~ihas_lightning.models.gate.BernoulliGate`) over ``embedding``
        (a uniform, unpruned :class:`~ihas_lightning.models.embedding.FieldEmbedding`), or None where it
        does not apply: a shared (not instance-wise) gate, a batch norm still in training mode, another
        table layout, or a table over ``max_bytes``."""
        if not gate.instance_wise:
            return None
        wb = _affine(gate)
        if wb is None:
            return None
        w, b = wb
        sources = [gate.linear.weight, gate.linear.bias, *[t for t in gate.buffers()]]
        if not bool(w.any()):
            return cls(None, None, b, sources)
        layout = _layout(embedding)
        if layout is None:
            return None
        weight, offsets, vocab, d = layout
        if weight.shape[0] * w.shape[0] * 4 > int(max_bytes):
            return None
        table = torch.empty(weight.shape[0], w.shape[0], dtype=torch.float32, device=weight.device)
        for f, v in enumerate(vocab):
            lo = int(offsets[f])
            torch.matmul(weight[lo : lo + v].float(), w[:, f * d : (f + 1) * d].t(), out=table[lo : lo + v])
        return cls(table, offsets.to(weight.device), b, [*sources, weight])


def _affine(gate) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) of the gate's logits as one affine map of the raw embedding (its input norm folded in)."""
    w = gate.linear.weight.detach().float()
    b = gate.linear.bias.detach().float()
    if gate.input_norm == "center":
        return w, b - w @ gate.input_mean.float()
    if gate.input_norm == "batch":
        norm = gate.norm
        if norm.training or norm.running_mean is None:
            return None
        scale = torch.rsqrt(norm.running_var.float() + norm.eps)
        return w * scale, b - w @ (norm.running_mean.float() * scale)
    return w, b


def _layout(embedding) -> tuple[torch.Tensor, torch.Tensor, list[int], int] | None:
    """(table weight, per-field first rows, vocab sizes, dim) of a single packed, unpruned table holding
    every field in order; None for any other layout."""
    if not embedding.uniform or len(embedding.tables) != 1 or embedding.row_counts is not None:
        return None
    fields = embedding.fields_0
    if not torch.equal(fields.cpu(), torch.arange(len(embedding.dims))):
        return None
    return embedding.tables[0].weight.detach(), embedding.offsets_0, embedding.vocab_sizes, embedding.dims[0]
