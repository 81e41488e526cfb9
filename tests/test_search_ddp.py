"""Data-parallel search (gloo, two CPU processes): each rank's averaged gradient is the mean of the
two shards' gradients computed in one process (with BN on running statistics: the full batch's
gradient), both ranks end with the same alphas and genotype
(DARTS-V2's four gradients, GDAS's operations unused on one rank), and
``torchrun --standalone --nproc_per_node=2 -m topofx search`` runs from the command line.

Batch normalization normalizes each shard by its own statistics (``SyncBatchNorm`` is CUDA-only),
so in train mode the reference is the mean of per-shard gradients, not one gradient of the whole
batch."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import topofx
from topofx import zoo
from topofx.distributed import World
from topofx.search import arch_parameters, logits_of
from topofx.searching import ALGORITHMS, SearchConfig, run_search
from topofx.searching.step import SearchStep

TINY = dict(data="digits", batch_size=16, image_size=8, C=8, N=1, nodes=2, max_steps=2, epochs=1, threads=1)


def _gradients_match(world: World) -> None:
    """One weight+alpha gradient of a simplified supernet on this rank's shard, averaged, against
    the full batch's gradient (eval mode) and the mean of both shards' gradients (train mode)
    computed here."""
    model, (x,) = zoo.build("nb201-darts", batch_size=8, C=4, N=1, image_size=8)
    y = torch.arange(8) % 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = topofx.simplify(model, x[:2], mode="topo")
    reference = copy.deepcopy(net)
    params = list(net.parameters())
    alphas = arch_parameters(model)
    step = SearchStep(net, alphas, [p for p in params if all(p is not a for a in alphas)],
                      ALGORITHMS["darts-v1"].hyper, world=world)
    xs, ys = world.shard(x, y)
    # BN on running statistics (eval mode): samples are independent, the average is the full batch's
    net.eval(), reference.eval()  # before any train-mode forward changes the running statistics
    full = torch.autograd.grad(F.cross_entropy(logits_of(reference(x)), y), list(reference.parameters()),
                               allow_unused=True)
    got = step.gradients(F.cross_entropy(logits_of(net(xs)), ys), params)
    for g, e in zip(got, full):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    net.train(), reference.train()

    expected = [torch.zeros_like(p) for p in params]
    for xh, yh in zip(x.chunk(2), y.chunk(2)):
        grads = torch.autograd.grad(F.cross_entropy(logits_of(reference(xh)), yh), list(reference.parameters()))
        expected = [e + g / 2 for e, g in zip(expected, grads)]
    got = step.gradients(F.cross_entropy(logits_of(net(xs)), ys), params)
    assert len(got) == len(expected) and any(a.requires_grad for a in alphas)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _worker(rank: int, init_file: str, algos: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = World(rank, 2)
        _gradients_match(world)
        for algo in algos:
            result = run_search(SearchConfig(algo=algo, space="nb201", simplify="topo", **TINY),
                                progress=False, world=world)
            assert result.log[-1]["arch_updates"] > 0
            alphas = [a.detach().tolist() for a in arch_parameters(result.model)]
            both = world.gather((alphas, result.arch))
            assert both[0] == both[1], algo  # bitwise: same alphas, same genotype
        world.close()
    finally:
        if dist.is_initialized():  # after a failure: no barrier, the other rank may be gone
            dist.destroy_process_group()


def test_two_ranks_search_one_genotype(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), ["darts-v2", "gdas"]), nprocs=2, join=True)


def test_torchrun_search(tmp_path):
    out = tmp_path / "run"
    args = ["--data", "digits", "--batch-size", "16", "--image-size", "8", "--channels", "8", "--cells", "1",
            "--max-steps", "2", "--epochs", "1", "--no-progress", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "topofx", "search", "--algo", "darts-v1", "--space", "nb201", *args,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks, one genotype" in done.stdout
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype["arch"].startswith("|") and len((out / "log.jsonl").read_text().splitlines()) == 1
