"""``topofx.distributed.World`` (gloo, two CPU processes): sharding, gradient averaging with
parameters unused on some ranks, buffer broadcast, gather."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from topofx.distributed import World


class Gated(nn.Module):
    """A layer that runs ``a`` or ``b`` by the batch's first value (as GDAS runs only the sampled op)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # equal replicas, the session's RNG left alone
            torch.manual_seed(0)
            self.a, self.b, self.never = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        return self.a(x) if x[0, 0] > 0 else self.b(x)


def _batch() -> torch.Tensor:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    x[0, 0], x[4, 0] = 5.0, -5.0  # shard 0 runs a, shard 1 runs b
    return x


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = World(rank, 2)
        x = _batch()
        (mine,) = world.shard(x)
        assert torch.equal(mine, x.chunk(2)[rank])

        reference, model = Gated(), Gated()
        for shard in x.chunk(2):  # single process: the mean of the shards' gradients
            (reference(shard).square().sum() / 2).backward()
        model(mine).square().sum().backward()
        world.average_gradients(list(model.parameters()))
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if name.startswith("never"):
                assert p.grad is None and q.grad is None, name
            else:
                torch.testing.assert_close(p.grad, q.grad, msg=name)

        params = [model.bn.weight, model.a.weight, model.never.weight]
        grads = torch.autograd.grad(model(mine).sum(), params, allow_unused=True)
        avg = world.average(grads, params)
        assert avg[2] is None and avg[1] is not None  # a runs on rank 0 only: rank 1 counts zero
        assert world.gather([g.tolist() for g in avg[:2]])[0] == world.gather([g.tolist() for g in avg[:2]])[1]

        with torch.no_grad():
            model.bn.running_mean.fill_(rank + 1.0)
        world.broadcast_buffers(model)
        assert torch.equal(model.bn.running_mean, torch.ones(3))
        assert world.gather(rank) == [0, 1]
        world.close()
    finally:
        if dist.is_initialized():  # after a failure: no barrier, the other rank may be gone
            dist.destroy_process_group()


def test_world_two_cpu_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


def test_one_process_world_is_a_no_op():
    world, model, x = World(), Gated(), _batch()
    assert world.shard(x)[0] is x
    model(x).sum().backward()
    before = [p.grad for p in model.parameters()]
    world.average_gradients(list(model.parameters()))
    assert all(a is b for a, b in zip(before, (p.grad for p in model.parameters())))
