"""SNAS on the NAS-Bench-201 cell: Gumbel-softmax edge weights drawn in every ``forward``.

Why this exists: SNAS (Xie, Zheng, Liu & Lin, ICLR 2019) was published on the DARTS space
(:mod:`.snas_style`); ``topofx search --algo snas --space nb201`` needs the same relaxation on
NAS-Bench-201's cell. This network keeps the two code bases' idioms:

* xautodl's NAS-Bench-201 skeleton (a ``ModuleDict`` of edges keyed ``'i<-j'`` with
  ``edge2index`` over the sorted keys, residual reduction blocks between stages, ``lastact``,
  ``(6, 5)`` architecture logits);
* SNAS's relaxed sample ``F.gumbel_softmax(log_alpha, tau=self.temp, hard=False)``, one per forward
  and shared by every cell, log-alphas initialised around 1 (``normal_(1, 0.01)``, the authors'
  ``loc_mean``/``loc_std``), the join written ``op(x) * w`` and a ``set_temperature`` the search
  loop anneals.

``forward`` returns the logits; ``genotype()`` lists, per node, the argmax ``(op, input)`` of every
incoming edge (NAS-Bench-201 keeps every edge, ``none`` included), as xautodl's ``Structure`` nodes.
Written from scratch in those styles; small by default (``C=8``, ``N=1``).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gdas_style import SEARCH_SPACE as NAS_BENCH_201
from .gdas_style import ResidualReduction, make_op

__all__ = ["NAS_BENCH_201", "SNASSearchCell", "TinyNetworkSNAS"]


class SNASSearchCell(nn.Module):
    def __init__(self, C: int, max_nodes: int, op_names: Sequence[str], affine: bool,
                 track_running_stats: bool):
        super().__init__()
        self.op_names = list(op_names)
        self.max_nodes = max_nodes
        self.edges = nn.ModuleDict()
        for i in range(1, max_nodes):
            for j in range(i):
                self.edges["{:}<-{:}".format(i, j)] = nn.ModuleList(
                    [make_op(name, C, affine, track_running_stats) for name in op_names])
        self.edge_keys = sorted(self.edges.keys())
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    def forward(self, inputs, weightss):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                inter_nodes.append(sum(op(nodes[j]) * w for op, w in zip(self.edges[node_str], weights)))
            nodes.append(sum(inter_nodes))
        return nodes[-1]


class TinyNetworkSNAS(nn.Module):
    """SNAS search network on NAS-Bench-201; ``temp`` is the Gumbel-softmax temperature."""

    def __init__(self, C: int = 8, N: int = 1, max_nodes: int = 4, num_classes: int = 10,
                 search_space: Sequence[str] = NAS_BENCH_201, affine: bool = False,
                 track_running_stats: bool = True, temp: float = 1.0):
        super().__init__()
        self._C = C
        self._layerN = N
        self.max_nodes = max_nodes
        self.temp = temp
        self.stem = nn.Sequential(nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(C))
        layer_channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        layer_reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        C_prev, num_edge, edge2index = C, None, None
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(layer_channels, layer_reductions):
            if reduction:
                cell = ResidualReduction(C_prev, C_curr)
            else:
                cell = SNASSearchCell(C_curr, max_nodes, search_space, affine, track_running_stats)
                if num_edge is None:
                    num_edge, edge2index = cell.num_edges, cell.edge2index
            self.cells.append(cell)
            C_prev = C_curr
        self.op_names = list(search_space)
        self.edge2index = edge2index
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.log_alpha = nn.Parameter(torch.zeros(num_edge, len(search_space)).normal_(1, 0.01))

    def set_temperature(self, temp: float) -> None:
        self.temp = temp

    def arch_parameters(self) -> List[nn.Parameter]:
        return [self.log_alpha]

    def genotype(self) -> List[tuple]:
        genotypes = []
        with torch.no_grad():
            for i in range(1, self.max_nodes):
                xlist = []
                for j in range(i):
                    weights = self.log_alpha[self.edge2index["{:}<-{:}".format(i, j)]]
                    xlist.append((self.op_names[int(weights.argmax())], j))
                genotypes.append(tuple(xlist))
        return genotypes

    def forward(self, inputs):
        weightss = F.gumbel_softmax(self.log_alpha, tau=self.temp, hard=False, dim=-1)
        feature = self.stem(inputs)
        for cell in self.cells:
            if isinstance(cell, SNASSearchCell):
                feature = cell(feature, weightss)
            else:
                feature = cell(feature)
        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.view(out.size(0), -1)
        return self.classifier(out)
