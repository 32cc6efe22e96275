"""Running under torchrun: N processes, one global batch, identical parameters.

`torchrun --nproc_per_node=N -m stagediff run|harvest|train ...` starts N copies of the CLI;
`init()` joins them into one process group from torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK), so several nodes work the same way as one. Without
torchrun (WORLD_SIZE unset or 1) `init()` does nothing and every helper below is a no-op:
the single-process code path is the same code.

What runs where:
  harvest   every rank forwards its own block of whole shards; rank 0 merges the manifests
            (activations.py): the store is the one a single process would have written.
  train     DDP semantics without the DDP wrapper (train.py): every rank reads the same global
            batch from the store's deterministic stream, trains on its slice of the rows, and
            the gradients (weighted by slice size) are summed, so the step is the step of one
            process on the whole batch. BatchTopK picks its k*B activations over the global
            batch (`batchtopk_select`). Only rank 0 writes files.
  the rest  diff, crosscoder, evaluation, report: rank 0 alone, after `finish()`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stagediff.kernels import Active, StepOut
from stagediff.kernels import batchtopk_select as local_batchtopk_select

# Ranks wait for rank 0 while it works alone (e.g. building an organism): allow it hours, not
# the default 30 minutes. A crashed rank does not leave the others waiting: torchrun stops them.
TIMEOUT = timedelta(hours=3)
_rank = 0  # remembered after `finish()`, so rank 0 alone carries on with the single-process steps


def init() -> None:
    """Join torchrun's process group (gloo for CPU tensors, NCCL for CUDA ones); no-op without torchrun."""
    global _rank
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means this rank's GPU
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)
    _rank = dist.get_rank()


def finish() -> None:
    """Leave the process group; from here on this process runs alone (world_size() == 1)."""
    if dist.is_initialized():
        # every rank reaches this point before any tears its communicator down: a rank that
        # leaves while a peer's gloo thread still talks to it aborts ("terminate called ...")
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return _rank


def is_main() -> bool:
    """Rank 0: the one process that writes run files."""
    return _rank == 0


def barrier() -> None:
    """Wait for every rank (a tiny CPU all-reduce: gloo, whatever the device)."""
    if world_size() > 1:
        dist.all_reduce(torch.zeros(1))


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (it writes or caches something), then the others (they find it done)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---------------------------------------------------------------- training


def local_rows(batch_size: int) -> slice:
    """This rank's rows of a global batch: contiguous, sizes differing by at most one."""
    r, w = rank(), world_size()
    return slice(batch_size * r // w, batch_size * (r + 1) // w)


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (every rank starts from the same SAE)."""
    if world_size() > 1:
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def all_reduce_grads(module: nn.Module) -> None:
    """Sum the gradients of all ranks in one flat all-reduce.

    Each rank's loss was scaled by its share of the global batch, so the sum is the gradient
    of the global batch's mean loss: the step a single process takes.
    """
    if world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def reduce_step(out: StepOut, share: float) -> StepOut:
    """The global batch's statistics from every rank's `out` (the loss stays this rank's).

    Per-token means (mse, l0, aux) are weighted by each rank's `share` of the rows and summed;
    sse and the per-feature counts are summed; BatchTopK's min_active is the smallest over the
    ranks that kept any activation (0 if none did, as in one process).
    """
    if world_size() == 1:
        return out
    means = ("mse", "l0", "aux", "sparsity")
    stats = torch.stack([getattr(out, k).double() * share for k in means] + [out.sse.double()])
    packed = torch.cat([stats, out.counts.double()])
    dist.all_reduce(packed)
    reduced = {k: packed[i].to(getattr(out, k).dtype) for i, k in enumerate(means)}
    reduced["sse"] = packed[len(means)].to(out.sse.dtype)
    reduced["counts"] = packed[len(means) + 1:].round().to(out.counts.dtype)
    if out.min_active is not None and float(reduced["counts"].sum()) > 0:  # global counts: all ranks agree
        local = out.min_active if bool(out.min_active > 0) else torch.full_like(out.min_active, float("inf"))
        dist.all_reduce(local, op=dist.ReduceOp.MIN)
        reduced["min_active"] = local
    return out._replace(**reduced)


def batchtopk_select(k: float, global_rows: int) -> Callable[[Tensor], tuple[Active, Tensor]]:
    """BatchTopK over the global batch: the round(k * global_rows) largest positive pre-activations
    of all ranks' rows together, each rank keeping those in its own slice.

    Each rank's K largest values hold every one of its values among the global K largest, so
    gathering those K per rank finds the global K-th value, the cut. The selection equals one
    process's on the whole batch (up to exact ties at the cut, which keep all tied values).
    """
    K = round(k * global_rows)

    def select(pre: Tensor) -> tuple[Active, Tensor]:
        rows, m = pre.shape
        active, vals = local_batchtopk_select(pre, K / max(rows, 1))  # this rank's K largest positives
        mine = vals.new_zeros(K)  # padded with zeros, which are never selected
        mine[:len(vals)] = vals[:K]
        everyone = [torch.empty_like(mine) for _ in range(world_size())]
        dist.all_gather(everyone, mine)
        cut = torch.cat(everyone).topk(K, sorted=False).values.min() if K else vals.new_zeros(())
        keep = ((vals >= cut) & (vals > 0)).nonzero().flatten()
        return Active.from_sorted(active.rows[keep], active.cols[keep], rows, m), vals[keep]

    return select
