"""DistributedDataParallel (gloo, two CPU processes) wraps a simplified supernet: each rank runs its
half of the batch, gradients are all-reduced, and they equal the mean of the per-shard gradients
of the reference (exact mode: the original; topo mode: an unwrapped simplified copy)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import topofx
from topofx import zoo


def _grads(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module(x)[-1].logsumexp(-1).sum().backward()
    return [p.grad.clone() for p in module.parameters()]


def _worker(rank: int, mode: str, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, (x,) = zoo.build("nb201-darts", C=8, N=1, batch_size=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            simplified = topofx.simplify(model, x, mode=mode)
        reference = copy.deepcopy(model if mode == "exact" else simplified)
        shards = x.chunk(2)
        expected = [(a + b) / 2 for a, b in zip(_grads(reference, shards[0]), _grads(reference, shards[1]))]

        ddp = nn.parallel.DistributedDataParallel(simplified)
        assert [n for n, _ in ddp.module.named_parameters()] == [n for n, _ in model.named_parameters()]
        got = _grads(ddp, shards[rank])
        assert len(got) == len(expected)
        scale = max(e.abs().max().item() for e in expected)  # a conv bias before a BN has a zero gradient: noise
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-5, atol=1e-6 * scale), (rank, (g - e).abs().max())

        floated = list(simplified.floated_buffers().values())
        assert bool(floated) == (mode == "topo")
        with torch.no_grad():  # DDP broadcasts rank 0's buffers before a forward, floated statistics included
            for b in floated:
                b.fill_(rank)
            ddp.eval()
            ddp(shards[rank])
        for b in floated:
            assert torch.equal(b, torch.zeros_like(b)), rank
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["exact", "topo"])
def test_ddp_two_cpu_processes(mode, tmp_path):
    mp.spawn(_worker, args=(mode, str(tmp_path / "init")), nprocs=2, join=True)
