"""Data-parallel search with ``torch.distributed``: shard each batch, average every gradient.

A search launched by ``torchrun --standalone --nproc_per_node=N -m topofx search ...`` runs one process per rank.
All ranks draw the same batches (same seeds); each computes its shard of every batch
(:meth:`World.shard`) and, after every backward, :meth:`World.average_gradients` averages the
gradients of weights *and* architecture parameters over the ranks.  Replicas that start equal and
take equal optimizer steps stay equal, so every rank ends with the same alphas and the same genotype.

This is what ``DistributedDataParallel`` does, written out because a search needs more than one
gradient per step (DARTS-V2's unrolled hypergradient takes four) and plain-tensor alphas that DDP
does not see.  A parameter that got no gradient on some rank (GDAS runs only the sampled operation;
PC-DARTS's channel choice) counts as zero there; one that got no gradient on any rank keeps
``None``, so optimizers skip it exactly as in a single process.  :meth:`World.broadcast_buffers` gives
every rank rank 0's BN running statistics, as DDP does.  Batch normalization normalizes each
shard by its own statistics (``SyncBatchNorm`` is CUDA-only): the averaged gradient is the mean of
the shards' gradients, equal to a single process's on the full batch for networks without BN.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["World"]


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def from_environment(cls) -> World:
        """The world ``torchrun`` describes (``WORLD_SIZE``, ``RANK``; gloo, or NCCL with CUDA), else one
        process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous slice of a batch (batch sizes that do not divide leave the last rank
        the remainder)."""
        if self.size == 1:
            return tensors
        n = tensors[0].shape[0]
        if n < self.size:
            raise ValueError(f"a batch of {n} cannot be split over {self.size} ranks")
        per = n // self.size
        end = n if self.rank == self.size - 1 else (self.rank + 1) * per
        return tuple(t[self.rank * per:end] for t in tensors)

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Average each ``p.grad`` over the ranks (see :meth:`average`)."""
        for p, g in zip(params, self.average([p.grad for p in params], params)):
            p.grad = g

    def average(self, grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Gradients of ``params`` (``p.grad``s, or what ``torch.autograd.grad(allow_unused=True)``
        returns) averaged over the ranks in one flat all-reduce: ``None`` counts as zero, and stays
        ``None`` where every rank has ``None``."""
        grads = list(grads)
        if self.size == 1 or not grads:
            return grads
        has = torch.tensor([g is not None for g in grads], dtype=torch.float32)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(grads, params)])
        dist.all_reduce(has)
        dist.all_reduce(flat)
        flat /= self.size
        out: list[torch.Tensor | None] = []
        offset = 0
        for p, present in zip(params, has.tolist()):
            n = p.numel()
            out.append(flat[offset:offset + n].view_as(p).to(p.dtype) if present else None)
            offset += n
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BN running statistics) to every rank, as ``DistributedDataParallel``
        does before each forward: the ranks' statistics would otherwise drift apart."""
        if self.size == 1:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)

    def close(self) -> None:
        """Wait for every rank, then end the process group: a rank that tears its group down while
        another still exchanges the last collective's messages aborts that one."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out
