"""Data parallelism with torch.distributed (``torchrun --nproc_per_node N -m mtrec train ...``).

Every rank holds the whole model and the whole split, walks the same shuffled permutation, and
takes its share ``rows[rank::world]`` of each global batch. Per-task losses are local means, so a
rank scales its gradients by ``n_local / n_global`` and the ranks sum them: the result is the
gradient of the global batch, the same on every rank, *before* the balancer runs. Every rank then
applies the same update, and the run matches one process with the same global batch (up to the
order of floating-point sums).

Per scope (engine/step.py): ``shared`` sums the per-task gradients of the dense shared tensors;
``all`` also the per-task gradients of the union of the rows every rank touched (``union``);
``representation`` keeps each rank's rows (its samples) where they are, sums only what the balancer
forms over rows (Grams, squared norms: ``summed``) and then the parameters' gradients.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from mtrec.engine.optim import row_grad, unique_rows


class Group:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensors: list[Tensor], scale: float = 1.0) -> None:
        """In place: ``t <- sum over ranks of scale * t`` for every tensor, in one all-reduce."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors]) * scale
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def summed(self, stat: Tensor) -> Tensor:
        """A copy of ``stat`` summed over ranks (fp32; one all-reduce of its numel): the row sums a
        balancer forms on this rank's rows of the global batch (``balancers.base.rows_split``)."""
        total = stat.float().clone()
        dist.all_reduce(total)
        return total.to(stat.dtype)

    def agree(self, choice: str) -> str:
        """Rank 0's ``choice`` on every rank (a decision each rank would otherwise make from its
        own state, e.g. the data placement from its free memory: one broadcast, once per run)."""
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_grads_(self, params: list[Tensor], scale: float = 1.0) -> None:
        """``p.grad <- sum over ranks of scale * p.grad`` for every parameter, in one all-reduce.

        A sparse row gradient (an embedding table's touched rows) becomes one over the union of
        the rows every rank touched, which is what one process with the global batch touches: the
        ranks all-gather their row ids (padded to the largest count), then the union's rows go
        into the all-reduce, never the whole table. Every rank needs the same parameter list with
        the same gradients sparse; an absent gradient is taken as a dense zero.
        """
        dense, sparse = [], []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if p.grad.is_sparse:
                mine, grad = unique_rows(p.grad)  # each row once: they are summed below
                rows = self.union(mine)
                values = grad.new_zeros((rows.numel(), *p.shape[1:]))
                values.index_add_(0, torch.searchsorted(rows, mine), grad)
                sparse.append((p, rows, values))
            else:
                dense.append(p.grad)
        self.sum_(dense + [values for _, _, values in sparse], scale)
        for p, rows, values in sparse:
            p.grad = row_grad(p, rows, values)

    def union(self, ids: Tensor) -> Tensor:
        """The sorted union over ranks of each rank's (unique, non-negative) ids: two all-gathers."""
        counts = [torch.zeros(1, dtype=torch.long, device=ids.device) for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor([ids.numel()], dtype=torch.long, device=ids.device))
        padded = ids.new_full((int(torch.cat(counts).max()),), -1)
        padded[:ids.numel()] = ids
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded)
        every = torch.cat(gathered)
        return every[every >= 0].unique()

    def global_losses(self, losses: Tensor, share: float) -> Tensor:
        """The global batch's mean losses as values, with gradients flowing to the local losses."""
        total = losses.detach() * share
        dist.all_reduce(total)
        return losses + (total - losses.detach())

    def barrier(self) -> None:
        dist.barrier()


def from_env(device_type: str) -> Group | None:
    """The process group when launched by torchrun (WORLD_SIZE > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size())


def is_main_process() -> bool:
    """Rank 0, or not launched by torchrun: the process that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
