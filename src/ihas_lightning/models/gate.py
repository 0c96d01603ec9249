"""Bernoulli gates (paper section 3.3): one keep-probability per embedding dimension of each sample.

``p_i = sigmoid(W E_i + b)`` where ``E_i`` is sample i's concatenated embedding (N*d values), so
every sample gets its own gate vector (instance-wise). Three modes:

* ``open``          all ones (pretraining: the gates are "deterministically open").
* ``stochastic``    straight-through Gumbel-Softmax over (log p, log(1-p)) with temperature tau:
                    the forward pass is an exact 0/1 Bernoulli draw (Gumbel-Max, eq. 1), the
                    backward pass uses the relaxed sample (eq. 2).
* ``deterministic`` the automatic threshold searcher (:func:`threshold_search`): per sample,
                    a histogram of its probabilities; the first local-minimum bin's lower edge is
                    the threshold and dimensions with p above it are open. With
                    ``threshold="half"`` (opt-in) the threshold is 0.5 instead: a dim is open where
                    its gate is more likely open than closed.

The regularizer (eq. 5, :func:`gate_regularizer`) is ``lambda * sum_j (p_ij - |p_ij - mean_j p_ij|)``:
a sparsity term plus the polarization term that pushes the probabilities away from their mean, so
the histogram becomes bimodal (paper Figure 3) and the threshold searcher finds a clean valley.

With ``instance_wise=False`` the gate is one learnable vector shared by all samples (the
"non-instance-wise" ablation).

``input_norm`` (instance-wise gates only) chooses what the linear layer reads:

* ``none``   ``E_i`` itself, as in the paper;
* ``center`` ``E_i - mu``, with ``mu`` a running mean of the embeddings over samples (a buffer:
             set by the first training batch, then an exponential average with momentum 0.1;
             frozen in eval mode, saved in checkpoints);
* ``batch``  per-dimension standardised ``E_i`` (``BatchNorm1d`` without affine parameters).

Why centring: the embeddings have a non-zero mean, and Adam moves all ``N*d`` weights of a gate row
together, so ``W mu`` acts as a second, much faster bias. A dim whose *average* gradient says "open"
(e.g. a field that matters for half the samples) then saturates open for every sample before the
weights that tell the samples apart are learned. Centring leaves the bias as the only
sample-independent path (measured on the planted data: docs/results.md).
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("open", "stochastic", "deterministic")
# the gate logit of a gate that is open for good (:meth:`BernoulliGate.open_all`)
OPEN_LOGIT = 30.0
INPUT_NORMS = ("none", "center", "batch")
# the deterministic mode's per-sample threshold: valley = the paper's automatic threshold searcher
# (:func:`threshold_search`); half = 0.5, the Bernoulli gate's most likely state (open when p > 1/2)
THRESHOLDS = ("valley", "half")
HALF = 0.5


def batch_mean(e: torch.Tensor) -> torch.Tensor:
    """Column means of the batch [B, D] -> [D]; under trainer=ddp of the GLOBAL batch (every rank's
    rows, as SyncBatchNorm does), so the running statistics do not depend on the number of ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return e.mean(0)
    s = torch.cat([e.sum(0), e.new_tensor([float(e.shape[0])])])
    dist.all_reduce(s)
    return s[:-1] / s[-1].clamp_min(1.0)


class BernoulliGate(nn.Module):
    def __init__(
        self,
        dim: int,
        tau: float = 0.1,
        instance_wise: bool = True,
        bins: int = 20,
        init_bias: float = 3.0,
        input_norm: str = "none",
        threshold: str = "valley",
    ):
        super().__init__()
        # (first row, global batch rows) of this process's rows under trainer=ddp (set per step by the
        # search module): the Gumbel noise is drawn for the global batch and sliced, so DDP ranks draw
        # exactly the noise one process draws
        self.noise_rows: tuple[int, int] | None = None
        if tau <= 0:
            raise ValueError("tau must be > 0")
        if bins < 3:
            raise ValueError("bins must be >= 3")
        self.dim = dim
        self.tau = float(tau)
        self.bins = int(bins)
        self.instance_wise = instance_wise
        self.init_bias = float(init_bias)
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        self.input_norm = input_norm
        if threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
        self.threshold_rule = threshold
        self.norm = None
        if instance_wise and input_norm == "batch":
            self.norm = nn.BatchNorm1d(dim, affine=False, momentum=0.1)
        if instance_wise and input_norm == "center":
            self.register_buffer("input_mean", torch.zeros(dim))
            self.register_buffer("input_count", torch.zeros((), dtype=torch.long))
        if instance_wise:
            self.linear = nn.Linear(dim, dim)
        else:
            self.logits = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start (nearly) open: small weights, bias ``init_bias`` (sigmoid(3) ~ 0.95)."""
        if self.instance_wise:
            nn.init.normal_(self.linear.weight, std=1e-2)
            nn.init.constant_(self.linear.bias, self.init_bias)
        else:
            nn.init.constant_(self.logits, self.init_bias)

    @torch.no_grad()
    def open_all(self, logit: float = OPEN_LOGIT) -> None:
        """Set every gate deterministically open for every sample: zero weights (the gate no longer
        depends on the sample) and a bias of ``logit`` (sigmoid(30) is 1.0 in float32). Every mode then
        keeps every dim: ``stochastic`` draws 1 (the logistic noise never reaches -30 after clamping),
        and ``deterministic`` sees one histogram bin, no valley, so the 0.5 fallback keeps all. This is
        the search's fallback when no sparser epoch was within tolerance of the gates-open model."""
        if self.instance_wise:
            self.linear.weight.zero_()
            self.linear.bias.fill_(float(logit))
        else:
            self.logits.fill_(float(logit))

    def gate_logits(self, e: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid logits z with p = sigmoid(z); e: [B, D]."""
        if self.instance_wise:
            if self.input_norm == "batch":
                e = self.norm(e)
            elif self.input_norm == "center":
                if self.training:
                    with torch.no_grad():
                        m = batch_mean(e)
                        if int(self.input_count) == 0:
                            self.input_mean.copy_(m)
                        else:
                            self.input_mean.lerp_(m, 0.1)
                        self.input_count += 1
                e = e - self.input_mean
            return self.linear(e)
        return self.logits.unsqueeze(0).expand(e.shape[0], -1)

    def probs(self, e: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits(e))

    def uniform_noise(self, z: torch.Tensor) -> torch.Tensor:
        """U(0, 1) noise shaped like z, clamped to [1e-6, 1 - 1e-6]; under trainer=ddp this rank's rows of
        the global batch's draw."""
        if self.noise_rows is not None:  # a DDP rank: its rows' noise out of the global batch's draw
            lo, m = self.noise_rows
            u = torch.rand((m, *z.shape[1:]), dtype=z.dtype, device=z.device)[lo : lo + z.shape[0]]
            return u.clamp_(1e-6, 1 - 1e-6)
        return torch.rand_like(z).clamp_(1e-6, 1 - 1e-6)

    def stochastic_mask(self, z: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        """Straight-through Gumbel-Softmax sample from logits z (p = sigmoid(z), passed when known).

        The two-class softmax over (log p + G, log(1-p) + G') equals
        ``sigmoid((z + G - G') / tau)`` since log p - log(1-p) = z, and G - G' ~ Logistic(0, 1),
        sampled as ``logit(u)``, u ~ U(0, 1). Forward: exact {0, 1} (the Gumbel-Max draw, eq. 1);
        backward: gradient of the relaxed sample (eq. 2).

        When z needs no gradient (the model step: the gate is frozen and reads the detached embedding)
        only the hard draw is needed, and it is drawn as ``u < p``: the same Bernoulli(p) draw as
        ``z + logit(u) > 0`` (which holds iff ``u > 1 - p``, and 1 - u is U(0, 1) too) without the logit
        of every entry (``make bench-train``'s search parts: 0.9 of 3.9 ms a batch). The clamp keeps
        the saturated gates as they were: p >= 1 - 1e-6 always draws 1, p <= 1e-6 always 0."""
        u = self.uniform_noise(z)
        if not z.requires_grad:
            return (u < (torch.sigmoid(z) if p is None else p)).to(z.dtype)
        score = z + torch.logit(u)
        hard = (score > 0).to(z.dtype)
        soft = torch.sigmoid(score / self.tau)
        return hard + (soft - soft.detach())

    def threshold(
        self, p: torch.Tensor, return_found: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-sample threshold [B] of the deterministic mode: the automatic threshold searcher's
        (``threshold="valley"``) or 0.5 (``"half"``). With ``return_found``, ``(threshold, found)``:
        ``found`` says whether the sample's histogram has a valley (a statistic under either rule)."""
        if self.threshold_rule == "half" and not return_found:  # no histogram needed
            return torch.full(p.shape[:1], HALF, dtype=p.dtype, device=p.device)
        thr, found = threshold_search(p.detach(), self.bins, return_found=True)
        if self.threshold_rule == "half":
            thr = torch.full_like(thr, HALF)
        return (thr, found) if return_found else thr

    def deterministic_mask(self, p: torch.Tensor) -> torch.Tensor:
        return (p > self.threshold(p).unsqueeze(1)).to(p.dtype)

    def forward(self, e: torch.Tensor, mode: str = "stochastic") -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mask [B, D], p [B, D])."""
        z = self.gate_logits(e)
        p = torch.sigmoid(z)
        if mode == "stochastic":
            mask = self.stochastic_mask(z, p)
        elif mode == "deterministic":
            mask = self.deterministic_mask(p)
        elif mode == "open":
            mask = torch.ones_like(p)
        else:
            raise ValueError(f"gate mode must be one of {MODES}, got {mode!r}")
        return mask, p


def threshold_search(
    p: torch.Tensor, bins: int = 20, fallback: float = 0.5, return_found: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The automatic threshold searcher, vectorised over the batch. p: [B, D] in [0, 1] -> [B].

    For each sample: histogram its D probabilities into ``bins`` equal bins over [0, 1]; scan from
    the left for the first *valley* bin b (1 <= b <= bins-2) with

        count[b] < count[b-1]  and  count[b] <= count[b+1]  and  max(count[b+1:]) > count[b],

    i.e. a local minimum reached after descending from a left mode and followed by a higher bin on
    the right (a second mode). The threshold is the lower edge of that bin, b / bins, and the gate
    opens dims with p > threshold. A plateau of empty bins between two modes yields its first bin.

    Degenerate or unimodal histograms (all probabilities in one bin, or no bin that separates two
    modes) have no valley; the threshold then falls back to ``fallback`` (0.5: open a dim when its
    Bernoulli gate is more likely open than closed). So a unimodal sample near 1 keeps every dim, one
    near 0 drops every dim, and a value of exactly 1.0 counts in the last bin (exactly 0.0 in the first).
    With ``return_found`` the result is ``(threshold [B], found [B] bool)``, ``found`` False where the
    fallback was used.
    """
    if p.dim() != 2:
        raise ValueError("p must be [batch, dims]")
    counts = _bin_counts(p, bins)  # [B, bins]
    left, mid, right = counts[:, :-2], counts[:, 1:-1], counts[:, 2:]
    # suffix max of counts strictly right of each middle bin: max(count[b+1:]), as a max over a
    # [bins, bins] upper-triangular 0/1 mask (counts are >= 0): no cummax, so the graph exports to ONNX
    upper = torch.ones(bins, bins, dtype=torch.bool, device=p.device).triu()
    suffix_max = (counts.unsqueeze(1) * upper).amax(2)[:, 2:]
    valley = (mid < left) & (mid <= right) & (suffix_max > mid)  # [B, bins-2] for b = 1..bins-2
    has = valley.any(1)
    first = valley.int().argmax(1) + 1  # first True (argmax returns the first max)
    thr = first.to(p.dtype) / bins
    thr = torch.where(has, thr, torch.full_like(thr, fallback))
    return (thr, has) if return_found else thr


def _exporting(p: torch.Tensor) -> bool:
    """Inside an ONNX export, a trace, torch.export or torch.compile, or with a symbolic batch size
    (where the graph must stay the exportable one and data-independent)."""
    c = torch.compiler
    return (
        torch.onnx.is_in_onnx_export()
        or torch.jit.is_tracing()
        or c.is_compiling()
        or c.is_exporting()
        or not isinstance(p.shape[0], int)
    )


def _bin_counts(p: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-row histogram [B, bins] (int) of p [B, D] over ``bins`` equal bins of [0, 1]. On CPU one
    ``bincount`` of the flat (row, bin) index in int32 (1.4x the scatter's speed: no int64 [B, D]
    index); elsewhere, and while exporting, a ``scatter_add`` (exportable, no host sync)."""
    b_, d_ = p.shape
    if p.device.type == "cpu" and not _exporting(p) and b_ * bins < 2**31:
        idx = torch.mul(p, bins).clamp_(0, bins - 1).to(torch.int32)
        idx += torch.arange(0, b_ * bins, bins, dtype=torch.int32).unsqueeze(1)
        return torch.bincount(idx.flatten(), minlength=b_ * bins).view(b_, bins).to(torch.int32)
    # the float -> uint8 cast keeps the [B, D] temporaries small before the int64 index
    small = torch.uint8 if bins <= 255 else torch.int32
    idx = torch.mul(p, bins).clamp_(0, bins - 1).to(small).long()
    ones = torch.ones(1, 1, dtype=torch.int32, device=p.device).expand(b_, d_)
    return torch.zeros(b_, bins, dtype=torch.int32, device=p.device).scatter_add_(1, idx, ones)


def gate_regularizer(
    p: torch.Tensor, lambda_reg: float, polarization: bool = True, polarization_weight: float = 1.0
) -> torch.Tensor:
    """``lambda * sum_j (p_ij - beta |p_ij - mean_j p_ij|)`` averaged over the batch (eq. 5: beta = 1).

    ``polarization=False`` keeps the sparsity term ``lambda * sum_j p_ij`` only (ablation). With
    ``beta = polarization_weight < 1`` every open dim is pushed closed (by ``1 - 2 beta (1 - a)``, a the
    share of dims above the mean), not only those below the mean (see docs/search.md)."""
    # one expression for every case (x 1.0 and x 0.0 are exact: the paper's and the ablation's numbers)
    beta = float(polarization_weight) if polarization else 0.0
    per_sample = (p - beta * (p - p.mean(dim=1, keepdim=True)).abs()).sum(dim=1)
    return lambda_reg * per_sample.mean()
