"""A GDAS search network on a NAS-Bench-201-like macro skeleton.

Why this exists: GDAS (Dong & Yang, CVPR 2019) samples a *hard* one-hot architecture per edge with
the straight-through Gumbel trick (``hardwts = one_h - probs.detach() + probs``) and runs only the
selected candidate, choosing it in Python with ``index[e].item()``. That makes the forward
data-dependent (it cannot be captured as one static graph) while the arch weights are exactly
one-hot, which is the regime in which TopoNAS rewrites must be exact ("vertex-exact"). This model
is the smallest self-contained example of that style (``C=8``, ``N=2`` cells per stage, 4 nodes
per cell, residual reduction blocks), written from scratch; ``forward`` returns the logits only.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from .operations import Identity, ReLUConvBN, Zero

SEARCH_SPACE: List[str] = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3",
                           "avg_pool_3x3"]


class Pooling(nn.Module):
    def __init__(self, C: int, stride: int):
        super().__init__()
        self.op = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)

    def forward(self, x):
        return self.op(x)


def make_op(name: str, C: int, affine: bool, track_running_stats: bool) -> nn.Module:
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(C, C, 1, 1, 0, affine, track_running_stats, bias=not affine)
    if name == "nor_conv_3x3":
        return ReLUConvBN(C, C, 3, 1, 1, affine, track_running_stats, bias=not affine)
    if name == "avg_pool_3x3":
        return Pooling(C, 1)
    raise KeyError(name)


class ResidualReduction(nn.Module):
    """Stride-2 basic residual block used between stages (not searched)."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, 2, 1, True, True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, True, True)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
            nn.Conv2d(C_in, C_out, kernel_size=1, stride=1, padding=0, bias=False),
        )

    def forward(self, x):
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class SearchCell(nn.Module):
    def __init__(self, C: int, max_nodes: int, op_names: Sequence[str], affine: bool,
                 track_running_stats: bool):
        super().__init__()
        self.max_nodes = max_nodes
        self.op_names = list(op_names)
        self.edges = nn.ModuleDict()
        for i in range(1, max_nodes):
            for j in range(i):
                self.edges["{:}<-{:}".format(i, j)] = nn.ModuleList(
                    [make_op(n, C, affine, track_running_stats) for n in op_names])
        self.edge_keys = sorted(self.edges.keys())
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    def forward(self, inputs, hardwts, index):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                e = self.edge2index["{:}<-{:}".format(i, j)]
                argmax = index[e].item()
                inter_nodes.append(sum(
                    hardwts[e][k] * op(nodes[j]) if k == argmax else hardwts[e][k]
                    for k, op in enumerate(self.edges["{:}<-{:}".format(i, j)])
                ))
            nodes.append(sum(inter_nodes))
        return nodes[-1]


class TinyGDAS(nn.Module):
    def __init__(self, C: int = 8, N: int = 2, max_nodes: int = 4, num_classes: int = 10,
                 search_space: Sequence[str] = SEARCH_SPACE, affine: bool = False,
                 track_running_stats: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        channels = [C] * N + [2 * C] + [2 * C] * N + [4 * C] + [4 * C] * N
        reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        self.cells = nn.ModuleList()
        C_prev = C
        num_edges = None
        for C_curr, reduction in zip(channels, reductions):
            if reduction:
                cell = ResidualReduction(C_prev, C_curr)
            else:
                cell = SearchCell(C_curr, max_nodes, search_space, affine, track_running_stats)
                num_edges = cell.num_edges
            self.cells.append(cell)
            C_prev = C_curr
        self.op_names = list(search_space)
        self.max_nodes = max_nodes
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.arch_parameters = nn.Parameter(1e-3 * torch.randn(num_edges, len(search_space)))
        self.tau = 10.0

    def set_tau(self, tau: float) -> None:
        self.tau = tau

    def get_tau(self) -> float:
        return self.tau

    def get_alphas(self) -> List[nn.Parameter]:
        return [self.arch_parameters]

    def sample(self):
        """Straight-through hard Gumbel sample: (hardwts, index), retried on inf/nan."""
        while True:
            gumbels = -torch.empty_like(self.arch_parameters).exponential_().log()
            logits = (self.arch_parameters.log_softmax(dim=1) + gumbels) / self.tau
            probs = nn.functional.softmax(logits, dim=1)
            index = probs.max(-1, keepdim=True)[1]
            one_h = torch.zeros_like(logits).scatter_(-1, index, 1.0)
            hardwts = one_h - probs.detach() + probs
            if torch.isinf(gumbels).any() or torch.isinf(probs).any() or \
                    torch.isnan(probs).any():
                continue
            return hardwts, index

    def genotype(self) -> List[tuple]:
        genotypes = []
        edge2index = next(c for c in self.cells if isinstance(c, SearchCell)).edge2index
        with torch.no_grad():
            for i in range(1, self.max_nodes):
                genotypes.append(tuple(
                    (self.op_names[int(self.arch_parameters[edge2index[f"{i}<-{j}"]].argmax())],
                     j) for j in range(i)))
        return genotypes

    def forward(self, inputs):
        hardwts, index = self.sample()
        feature = self.stem(inputs)
        for cell in self.cells:
            if isinstance(cell, SearchCell):
                feature = cell(feature, hardwts, index)
            else:
                feature = cell(feature)
        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.view(out.size(0), -1)
        return self.classifier(out)
