"""Architecture rows shared across cells, read through a stateless module (regression).

Written in the idiom of a one-shot library whose supernet builder keeps one architecture parameter
per *label* and hands it to every cell of that label (a memo dict keyed by label): the cells of one
type share their rows.  Each cell computes its own ``nn.Softmax(-1)`` module call on the shared row,
joins an edge as ``torch.sum(torch.stack(outs + [zeros]) * w.view(-1, 1, 1, 1, 1), 0)`` (one extra
weight for "this input not chosen"), and its candidates run their own parameters through
``F.conv2d`` / ``F.batch_norm`` (modules whose forward calls the functional ops, not ``nn.Conv2d`` /
``nn.BatchNorm2d``).

Prefix sharing computes the softmax of a shared row once for all cells (exact).  The topo self-check
picks its one-hot vertex by the value number of each edge's row: it must give the softmax calls of
one row one number, or the rewritten graph is checked at another vertex than the graph as captured
and the (correct) rewrite is refused.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx.testing import assert_train_step_equivalent, set_one_hot, train_step_equivalence


class FConvBN(nn.Module):
    """ReLU -> conv -> BN, the conv and BN as functional calls on this module's own tensors."""

    def __init__(self, C: int, k: int, dilation: int = 1):
        super().__init__()
        self.relu = nn.ReLU()
        self.k, self.dilation = k, dilation
        self.weight = nn.Parameter(torch.randn(C, C, k, k) * 0.3)
        self.bn_weight = nn.Parameter(torch.ones(C))
        self.bn_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("running_mean", torch.zeros(C))
        self.register_buffer("running_var", torch.ones(C))

    def forward(self, x):
        y = F.conv2d(self.relu(x), self.weight, None, 1, self.dilation * (self.k - 1) // 2, self.dilation)
        return F.batch_norm(y, self.running_mean, self.running_var, self.bn_weight, self.bn_bias,
                            self.training, 0.1, 1e-5)


def candidates(C: int) -> nn.ModuleDict:
    return nn.ModuleDict({
        "max_pool": nn.MaxPool2d(3, 1, 1),
        "avg_pool": nn.AvgPool2d(3, 1, 1, count_include_pad=False),
        "skip": nn.Identity(),
        "conv_3x3": FConvBN(C, 3),
        "conv_5x5": FConvBN(C, 5),
        "dil_conv_3x3": FConvBN(C, 3, dilation=2),
    })


class Cell(nn.Module):
    def __init__(self, C: int, steps: int, label: str, memo: dict):
        super().__init__()
        self.steps = steps
        self.ops = nn.ModuleList()
        self.alpha = nn.ParameterDict()
        for i in range(2, steps + 2):
            self.ops.append(nn.ModuleList(candidates(C) for _ in range(i)))
            for j in range(i):
                key = f"{label}/{i}_{j}"
                if key not in memo:  # one row per label: every cell of this label reads it
                    memo[key] = nn.Parameter(torch.randn(len(self.ops[-1][j]) + 1) * 1e-3)
                self.alpha[key.replace("/", "_")] = memo[key]
        self.label = label
        self.softmax = nn.Softmax(-1)

    def forward(self, s0, s1):
        states = [s0, s1]
        for i, ops in enumerate(self.ops, start=2):
            current = []
            for j in range(i):
                outs = torch.stack([op(states[j]) for op in ops[j].values()])
                w = self.softmax(self.alpha[f"{self.label}_{i}_{j}"])
                outs = torch.cat((outs, torch.zeros_like(outs[:1])), 0)
                current.append(torch.sum(outs * w.view(-1, 1, 1, 1, 1), 0))
            states.append(sum(current))
        return sum(states[2:])


class Net(nn.Module):
    def __init__(self, C: int = 4, cells: int = 3, steps: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        memo: dict = {}
        self.cells = nn.ModuleList(Cell(C, steps, "normal", memo) for _ in range(cells))
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.head(s1.mean((2, 3)))

    def arch_parameters(self):
        return list(dict.fromkeys(p for c in self.cells for p in c.alpha.values()))


CELLS, STEPS = 3, 2
EDGES = CELLS * sum(range(2, STEPS + 2))


def build():
    torch.manual_seed(0)
    return Net(cells=CELLS, steps=STEPS), torch.randn(2, 3, 8, 8)


def test_shared_rows_topo_self_check_passes():
    """The topo self-check accepts the rewrite (it failed before: softmax calls of one shared row had
    different value numbers, so the captured graph and the rewritten one were checked at different
    vertices), every edge is found, and the simplified module is vertex-exact against the original."""
    model, x = build()
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="topo", strict=True)
    assert simple.report.fallback is None
    assert simple.report.edges == EDGES
    for pick in (0, 3, 5):
        set_one_hot(reference.arch_parameters(), lambda r, n, k=pick: k)
        set_one_hot(model.arch_parameters(), lambda r, n, k=pick: k)
        report = train_step_equivalence(reference, simple, (x,))
        assert not report.problems, report.problems
        bad = [f"{c.category} {c.name}: rel {c.rel_error:.3g}" for c in report.comparisons
               if not c.ok and c.category in ("output", "weight_grad")]
        assert not bad, bad


def test_shared_rows_exact():
    model, x = build()
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="exact", strict=True)
    assert simple.report.fallback is None and simple.report.edges == EDGES
    assert_train_step_equivalent(reference, simple, (x,), arch_params=reference.arch_parameters())
