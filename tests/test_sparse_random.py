"""Random sampled supernets through an adapter with gates: the sparse run against the original's own
branching code (run only the selected candidate), in float64 -- outputs, every gradient (alpha's
included), which parameters get one, BN statistics -- over several draws, in both modes.

The CI sample is ``TOPOFX_SPARSE_N`` models (default 12); ``TOPOFX_SPARSE_N=60`` runs the full set.
Each model varies: cell width (2-4 nodes, one or two inputs), the candidates per edge (a random subset
of convolutions, separable/dilated convolutions, poolings, skip, zero, dropout, an in-place ReLU
branch, a module shared by two edges), the dead rule (GDAS's bare weight or nothing), and one or two
samples.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F
from sampled_step import one_step
from torch import nn

import topofx
from topofx.adapters import hard_gumbel_sample, register_adapter
from topofx.ir import max_rel_error

SPARSE_N = int(os.environ.get("TOPOFX_SPARSE_N", "12"))
SEEDS = 4


class _Zero(nn.Module):
    def forward(self, x):
        return x.mul(0.0)


def _op(name: str, C: int) -> nn.Module:
    conv = lambda k, d=1, g=1: nn.Conv2d(C, C, k, padding=d * (k // 2), dilation=d, groups=g, bias=False)  # noqa: E731
    return {
        "conv3": lambda: nn.Sequential(nn.ReLU(), conv(3), nn.BatchNorm2d(C)),
        "conv1": lambda: nn.Sequential(nn.ReLU(), conv(1), nn.BatchNorm2d(C, affine=False)),
        "conv3_bias": lambda: nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)),
        "sep3": lambda: nn.Sequential(nn.ReLU(), conv(3, g=C), conv(1), nn.BatchNorm2d(C),
                                      nn.ReLU(), conv(3, g=C), conv(1), nn.BatchNorm2d(C)),
        "dil3": lambda: nn.Sequential(nn.ReLU(), conv(3, d=2, g=C), conv(1), nn.BatchNorm2d(C)),
        "avg": lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
        "max_bn": lambda: nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(C, affine=False)),
        "skip": nn.Identity,
        "zero": _Zero,
        "drop": lambda: nn.Sequential(nn.Dropout(0.3), conv(1)),
        "relu_inplace": lambda: nn.Sequential(nn.Conv2d(C, C, 1), nn.ReLU(inplace=True)),
    }[name]()


OP_NAMES = ["conv3", "conv1", "conv3_bias", "sep3", "dil3", "avg", "max_bn", "skip", "zero", "drop", "relu_inplace"]


class RandomGated(nn.Module):
    """Cells of ``nodes`` nodes over ``inputs`` input states; each edge samples one of its candidates."""

    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        C = 4
        self.dead = rng.choice(["weight", "nothing"])
        self.inputs, self.nodes = rng.choice([1, 2]), rng.randint(2, 4)
        self.two_samples = rng.random() < 0.5
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.edge_list = [(i, j) for i in range(self.nodes) for j in range(i + self.inputs)]
        K = rng.randint(2, 5)
        names = [rng.sample(OP_NAMES, K) for _ in self.edge_list]
        self.cells = nn.ModuleList()
        for _ in range(2):
            edges = nn.ModuleList(nn.ModuleList(_op(n, C) for n in row) for row in names)
            self.cells.append(edges)
        if len(self.edge_list) > 1 and rng.random() < 0.5:  # one module shared by two edges of the first cell
            self.cells[0][1][0] = self.cells[0][0][0]
        self.alpha_a = nn.Parameter(1e-3 * torch.randn(len(self.edge_list), K, generator=torch.Generator().manual_seed(seed)))
        self.alpha_b = nn.Parameter(1e-3 * torch.randn(len(self.edge_list), K, generator=torch.Generator().manual_seed(seed + 1)))
        self.tau = rng.choice([0.5, 5.0])
        self.head = nn.Linear(C, 5)

    def samples(self):
        a = hard_gumbel_sample(self.alpha_a, self.tau)
        b = hard_gumbel_sample(self.alpha_b, self.tau) if self.two_samples else a
        return a, b

    def run(self, x, edge):
        states = [self.stem(x)] * self.inputs
        for c, cell in enumerate(self.cells):
            nodes = list(states)
            for i in range(self.nodes):
                terms = [edge(c, e, cell[e], nodes[j]) for e, (n, j) in enumerate(self.edge_list) if n == i]
                nodes.append(sum(terms))
            states = nodes[-self.inputs:]
        return self.head(F.adaptive_avg_pool2d(states[-1], 1).flatten(1))

    def forward(self, x):  # the original: only the selected candidate runs
        (wa, ia), (wb, ib) = self.samples()

        def edge(c, e, ops, h):
            w, index = (wa, ia) if c == 0 else (wb, ib)
            k = index[e].item()
            if self.dead == "weight":
                return sum(w[e][i] * op(h) if i == k else w[e][i] for i, op in enumerate(ops))
            return ops[k](h) * w[e][k]
        return self.run(x, edge)


def _relaxed(m, x, wa, wb):
    def edge(c, e, ops, h):
        w = wa if c == 0 else wb
        return sum(topofx.gate(w[e][i], op(h), dead=m.dead) for i, op in enumerate(ops))
    return m.run(x, edge)


def _sample(m):
    (wa, _), (wb, _) = m.samples()
    return {"wa": wa, "wb": wb}


register_adapter(RandomGated, _sample, _relaxed, "random gated")


@pytest.mark.parametrize("mode", ["exact", "topo"])
@pytest.mark.parametrize("seed", range(SPARSE_N))
def test_random_gated_supernet_equals_its_original(seed, mode):
    torch.manual_seed(seed)
    model = RandomGated(seed).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    simplified = topofx.simplify(model, x, mode=mode, strict=True)
    assert simplified.report.sparse > 0
    for draw in range(SEEDS):
        out_ref, grads_ref, bufs_ref = one_step(model, model, x, 1000 * seed + draw)
        out, grads, bufs = one_step(model, simplified, x, 1000 * seed + draw)
        assert max_rel_error(out_ref, out) <= 1e-9, model.edge_list
        assert set(grads) == set(grads_ref)
        scale = max(g.abs().max().item() for g in grads_ref.values())
        for name, g in grads_ref.items():
            assert (grads[name] - g).abs().max().item() <= 1e-9 * scale, name
        for name, b in bufs_ref.items():
            assert max_rel_error(b.double(), bufs[name].double()) <= 1e-9, name
