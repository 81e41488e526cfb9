"""PC-DARTS on the NAS-Bench-201 cell: partial channel connections and edge normalization.

Why this exists: PC-DARTS (Xu, Xie, Zhang, Chen, Qi, Tian & Xiong, ICLR 2020) was published on the
DARTS space (:mod:`.pcdarts_style`); ``topofx search --algo pcdarts --space nb201`` needs its two
ideas on NAS-Bench-201's cell, written as their code bases write them:

* **partial channels**: an edge's ``MixedOp`` sends only ``x[:, :C//k]`` through the candidates
  (built for ``C // k`` channels), concatenates the untouched rest back and mixes the two with
  ``channel_shuffle(ans, k)`` (``view``/``transpose``/``contiguous``/``view``); NAS-Bench-201's
  edges never reduce, so no max-pool branch;
* **edge normalization**: every node sums its incoming edges scaled by ``softmax`` of the edge
  weights ``betas`` over that node's edges (node 1 has one edge, node 2 two, node 3 three), computed
  in ``forward`` with slices and ``torch.cat`` as PC-DARTS's ``weights2``.

The skeleton is xautodl's (``'i<-j'`` edges, residual reduction blocks, ``lastact``); the operation
weights ``alphas`` ``(6, 5)`` and ``betas`` ``(6,)`` are both ``nn.Parameter``s.
``forward`` returns the logits; ``genotype()`` lists the argmax ``(op, input)`` of every edge per
node. Written from scratch in those styles; small by default (``C=8``, ``N=1``, ``k=4``).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gdas_style import SEARCH_SPACE as NAS_BENCH_201
from .gdas_style import ResidualReduction, make_op
from .pcdarts_style import channel_shuffle

__all__ = ["NAS_BENCH_201", "PCSearchCell", "TinyNetworkPCDARTS"]


class PCSearchCell(nn.Module):
    def __init__(self, C: int, max_nodes: int, op_names: Sequence[str], affine: bool,
                 track_running_stats: bool, k: int = 4):
        super().__init__()
        self.k = k
        self.op_names = list(op_names)
        self.max_nodes = max_nodes
        self.edges = nn.ModuleDict()
        for i in range(1, max_nodes):
            for j in range(i):
                self.edges["{:}<-{:}".format(i, j)] = nn.ModuleList(
                    [make_op(name, C // k, affine, track_running_stats) for name in op_names])
        self.edge_keys = sorted(self.edges.keys())
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    def MixedOp(self, x, ops, weights):
        dim_2 = x.shape[1]
        xtemp = x[:, :dim_2 // self.k, :, :]
        xtemp2 = x[:, dim_2 // self.k:, :, :]
        temp1 = sum(w * op(xtemp) for w, op in zip(weights, ops))
        ans = torch.cat([temp1, xtemp2], dim=1)
        return channel_shuffle(ans, self.k)

    def forward(self, inputs, weightss, weights2):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                e = self.edge2index["{:}<-{:}".format(i, j)]
                inter_nodes.append(weights2[e] * self.MixedOp(nodes[j], self.edges["{:}<-{:}".format(i, j)],
                                                              weightss[e]))
            nodes.append(sum(inter_nodes))
        return nodes[-1]


class TinyNetworkPCDARTS(nn.Module):
    """PC-DARTS search network on NAS-Bench-201 (``k``: channel proportion 1/k)."""

    def __init__(self, C: int = 8, N: int = 1, max_nodes: int = 4, num_classes: int = 10,
                 search_space: Sequence[str] = NAS_BENCH_201, affine: bool = False,
                 track_running_stats: bool = True, k: int = 4):
        super().__init__()
        if C % k:
            raise ValueError(f"C={C} must be a multiple of k={k}")
        self._C = C
        self._layerN = N
        self.max_nodes = max_nodes
        self.k = k
        self.stem = nn.Sequential(nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(C))
        layer_channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        layer_reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        C_prev, num_edge, edge2index = C, None, None
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(layer_channels, layer_reductions):
            if reduction:
                cell = ResidualReduction(C_prev, C_curr)
            else:
                cell = PCSearchCell(C_curr, max_nodes, search_space, affine, track_running_stats, k)
                if num_edge is None:
                    num_edge, edge2index = cell.num_edges, cell.edge2index
            self.cells.append(cell)
            C_prev = C_curr
        self.op_names = list(search_space)
        self.edge2index = edge2index
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.alphas = nn.Parameter(1e-3 * torch.randn(num_edge, len(search_space)))
        self.betas = nn.Parameter(1e-3 * torch.randn(num_edge))

    def arch_parameters(self) -> List[nn.Parameter]:
        return [self.alphas, self.betas]

    def _edge_weights(self) -> torch.Tensor:
        """Softmax of the betas over the incoming edges of each node (1, 2, 3, ... edges)."""
        start, n = 0, 1
        weights2 = []
        for _ in range(1, self.max_nodes):
            weights2.append(F.softmax(self.betas[start:start + n], dim=-1))
            start += n
            n += 1
        return torch.cat(weights2, dim=0)

    def genotype(self) -> List[tuple]:
        genotypes = []
        with torch.no_grad():
            for i in range(1, self.max_nodes):
                xlist = []
                for j in range(i):
                    weights = self.alphas[self.edge2index["{:}<-{:}".format(i, j)]]
                    xlist.append((self.op_names[int(weights.argmax())], j))
                genotypes.append(tuple(xlist))
        return genotypes

    def forward(self, inputs):
        alphas = F.softmax(self.alphas, dim=-1)
        weights2 = self._edge_weights()
        feature = self.stem(inputs)
        for cell in self.cells:
            if isinstance(cell, PCSearchCell):
                feature = cell(feature, alphas, weights2)
            else:
                feature = cell(feature)
        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.view(out.size(0), -1)
        return self.classifier(out)
