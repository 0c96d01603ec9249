"""Multi-process training (``trainer=ddp``): Lightning's DDP launcher and process group, with the
gradients of our hand-stepped optimizers averaged by the modules themselves.

Why not ``DistributedDataParallel``'s reducer: every stage steps its optimizers by hand (manual
optimization), the bi-level search runs two backward passes per training step (the model step, then
the gate step on a validation batch), and the embedding tables have sparse row gradients. DDP's
reducer expects one backward per forward and all-reduces dense buckets (NCCL has no sparse
all-reduce). So :class:`ManualDDPStrategy` is Lightning's ``DDPStrategy`` (launch, process group,
``barrier``, ``broadcast``, rank-zero checkpointing and logging) minus the wrapper, and
:func:`sync_gradients` averages the gradients right before each optimizer step:

* every rank's gradient is weighted by its share of the global batch (``rows / all ranks' rows``) and
  summed: exactly the gradient of the global batch's mean loss, so ``world`` ranks with batches that
  partition a global batch take the step one process takes on that batch (tested);
* dense gradients go in one flattened all-reduce; a sparse gradient (the rows a batch touched) is
  all-gathered as (row ids, row values) and its duplicates are merged by the optimizer
  (:class:`~ihas_lightning.optim.RowwiseAdam`), as for one process.

The data side (each rank's slice of every global batch) is in :mod:`ihas_lightning.data.datamodule`.
The run-dir side: the pipeline's outputs are written by global rank 0 only (:func:`is_global_zero`)
and the other ranks wait for them at :func:`barrier`; stages that do not train (cluster, evaluate,
report) run on rank 0 alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def global_rank() -> int:
    """This process's rank: the process group's once it exists, else the launcher's environment
    (``RANK`` from torchrun, ``SLURM_PROCID`` under srun, ``LOCAL_RANK`` from Lightning's launcher on
    one node), else 0."""
    if initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_global_zero() -> bool:
    return global_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def global_slice(rows: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """(this rank's first row, all ranks' rows) of a global batch split over the ranks in rank order."""
    if not initialized() or dist.get_world_size() == 1:
        return 0, rows
    n = torch.tensor([rows], dtype=torch.long, device=device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    c = [int(t.item()) for t in counts]
    return sum(c[: dist.get_rank()]), sum(c)


@torch.no_grad()
def gather_rows(t: torch.Tensor | None, cols: int = 0) -> torch.Tensor | None:
    """Every rank's per-row ``t`` (its shard's rows, sizes may differ) concatenated in rank order, on
    every rank; ``t`` itself in one process. ``cols`` > 0: ``t`` is [rows, cols] (0: 1-d), so a rank with
    no rows (None) still knows the width. A paired comparison of two passes over the same sharded split
    then sees every row, and every rank takes the same decision. Collective: every rank calls it."""
    if not initialized() or dist.get_world_size() == 1:
        return t
    width = max(int(cols), 1)
    local = t.detach().reshape(-1).double().cpu() if t is not None else torch.zeros(0, dtype=torch.float64)
    n = torch.tensor([local.numel()], dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    c = [int(x.item()) for x in counts]
    pad = torch.zeros(max(c) if c else 0, dtype=torch.float64)
    pad[: local.numel()] = local
    parts = [torch.empty_like(pad) for _ in c]
    dist.all_gather(parts, pad)
    out = torch.cat([p[:k] for p, k in zip(parts, c)])
    if not out.numel():
        return None
    return out.reshape(-1, width) if cols else out


@torch.no_grad()
def sync_gradients(params: Iterable[torch.nn.Parameter], rows: int) -> None:
    """Average ``params``' gradients over the ranks, weighted by each rank's ``rows`` in the global
    batch (a no-op in one process). Every rank must call it with the same parameters in the same order."""
    if not initialized() or dist.get_world_size() == 1:
        return
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    dev = params[0].grad.device
    total = torch.tensor([float(rows)], device=dev)
    dist.all_reduce(total)
    share = float(rows) / max(float(total.item()), 1.0)
    dense = [p.grad for p in params if not p.grad.is_sparse]
    if dense:
        flat = torch._utils._flatten_dense_tensors(dense).mul_(share)
        dist.all_reduce(flat)
        for g, synced in zip(dense, torch._utils._unflatten_dense_tensors(flat, dense)):
            g.copy_(synced)
    for p in params:
        if p.grad.is_sparse:
            p.grad = _gather_sparse(p.grad, share)


def _gather_sparse(grad: torch.Tensor, share: float) -> torch.Tensor:
    """Every rank's (row ids, row values * share) of a sparse row gradient, as one uncoalesced sparse
    gradient (duplicate rows are summed by its consumer)."""
    idx, vals = grad._indices()[0], grad._values() * share
    world = dist.get_world_size()
    n = torch.tensor([idx.numel()], device=idx.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts_l = [int(c.item()) for c in counts]
    most = max(counts_l)
    pad_idx = idx.new_zeros(most)
    pad_idx[: idx.numel()] = idx
    pad_vals = vals.new_zeros((most, *vals.shape[1:]))
    pad_vals[: vals.shape[0]] = vals
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_vals = [torch.empty_like(pad_vals) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_vals, pad_vals)
    cat_idx = torch.cat([a[:c] for a, c in zip(all_idx, counts_l)])
    cat_vals = torch.cat([a[:c] for a, c in zip(all_vals, counts_l)])
    return torch.sparse_coo_tensor(cat_idx.unsqueeze(0), cat_vals, grad.shape)


def manual_ddp_strategy(**kwargs):
    """Lightning's ``DDPStrategy`` without the ``DistributedDataParallel`` wrapper (see the module
    docstring); built lazily so that importing this module does not import Lightning."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    # the stages that do not train run on rank 0 while the other ranks wait at a barrier: on full
    # Criteo the cluster stage alone can pass the process group's default 30 minutes
    kwargs.setdefault("timeout", timedelta(hours=12))

    class ManualDDPStrategy(DDPStrategy):
        strategy_name = "ddp_manual"

        def configure_ddp(self) -> None:
            # no reducer: the modules call sync_gradients before each optimizer step. Ranks start from
            # rank 0's weights (what the DDP wrapper's constructor does).
            for t in self.model.state_dict().values():
                if torch.is_tensor(t) and not t.is_sparse:
                    dist.broadcast(t, 0)

    return ManualDDPStrategy(**kwargs)
