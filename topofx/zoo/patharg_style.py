"""A NAS-Bench-201 supernet whose ``forward`` takes a path-selecting string argument.

Why this exists: in NASP (Yao, Xu, Tu & Zhu, "Efficient Neural Architecture Search via Proximal
Iterations", AAAI 2020) and the code bases that reuse its search models (e.g. the NAS-Bench-1Shot1
and DARTS-PT ``nasbench201`` optimizers), the weight step and the architecture step run *different
forwards of one module*, chosen by a non-tensor argument with a default:
``def forward(self, inputs, updateType='alpha')`` and ``def _loss(self, input, target,
updateType='alpha'): logits = self(input, updateType=updateType)``.

* ``updateType='alpha'`` (the default, the architecture step): ``F.softmax(alpha, dim=-1)``;
* ``updateType='weight'`` (the weight step): discrete weights. NASP binarizes ``alpha.data`` in place
  before the weight step (``binarization()``: a proximal step to one-hot rows, undone by
  ``restore_arch_parameters()``) and feeds the raw tensor; here the forward computes the same one-hot
  argmax itself, as a straight-through estimate ``one_hot - probs.detach() + probs`` (its value is
  exactly one-hot, its gradient the softmax's). Both methods are provided.

A capture must key its graph on the argument, whether it is passed positionally
(``model(x, 'weight')``) or by keyword (``model(x, updateType='weight')``), and never run the default
path for a call that asked for the other one.

Skeleton: xautodl's NAS-Bench-201 search network (stem, ``3N`` search cells of 4 nodes with
``ModuleDict`` edges ``'i<-j'``, residual reductions, ``lastact``), the 5 NAS-Bench-201 candidates,
edges joined ``sum(layer(nodes[j]) * w for layer, w in zip(edges, weights))``, one ``nn.Parameter``
alpha of shape ``(6, 5)``.

Sizes. NASP's NAS-Bench-201 search: ``C=16``, ``N=5`` (the zoo default). Written from scratch in
those idioms; not a copy.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gdas_style import SEARCH_SPACE as NAS_BENCH_201
from .gdas_style import ResidualReduction
from .gdas_style import make_op as make_nb201_op

__all__ = ["NAS_BENCH_201", "SearchCell", "TinyNetworkPathArg"]


class SearchCell(nn.Module):
    def __init__(self, C: int, max_nodes: int, op_names: Sequence[str], affine: bool,
                 track_running_stats: bool):
        super().__init__()
        self.op_names = list(op_names)
        self.max_nodes = max_nodes
        self.edges = nn.ModuleDict()
        for i in range(1, max_nodes):
            for j in range(i):
                self.edges["{:}<-{:}".format(i, j)] = nn.ModuleList(
                    [make_nb201_op(name, C, affine, track_running_stats) for name in op_names])
        self.edge_keys = sorted(list(self.edges.keys()))
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    def forward(self, inputs, weightss):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                inter_nodes.append(sum(layer(nodes[j]) * w
                                       for layer, w in zip(self.edges[node_str], weights)))
            nodes.append(sum(inter_nodes))
        return nodes[-1]


class TinyNetworkPathArg(nn.Module):
    """``forward(inputs, updateType='alpha')`` returns the logits."""

    def __init__(self, C: int = 16, N: int = 5, max_nodes: int = 4, num_classes: int = 10,
                 criterion: nn.Module | None = None,
                 search_space: Sequence[str] = NAS_BENCH_201, affine: bool = False,
                 track_running_stats: bool = True):
        super().__init__()
        self._C = C
        self._layerN = N
        self.max_nodes = max_nodes
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.stem = nn.Sequential(nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False),
                                  nn.BatchNorm2d(C))
        layer_channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        layer_reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        C_prev, num_edge, edge2index = C, None, None
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(layer_channels, layer_reductions):
            if reduction:
                cell = ResidualReduction(C_prev, C_curr)
            else:
                cell = SearchCell(C_curr, max_nodes, search_space, affine, track_running_stats)
                if num_edge is None:
                    num_edge, edge2index = cell.num_edges, cell.edge2index
            self.cells.append(cell)
            C_prev = C_curr
        self.op_names = list(search_space)
        self.edge2index = edge2index
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._arch_parameters = nn.Parameter(1e-3 * torch.randn(num_edge, len(search_space)))

    def arch_parameters(self) -> List[torch.Tensor]:
        return [self._arch_parameters]

    def genotype(self) -> List[tuple]:
        genotypes = []
        for i in range(1, self.max_nodes):
            xlist = []
            for j in range(i):
                with torch.no_grad():
                    weights = self._arch_parameters[self.edge2index["{:}<-{:}".format(i, j)]]
                    xlist.append((self.op_names[weights.argmax().item()], j))
            genotypes.append(tuple(xlist))
        return genotypes

    # ---- NASP's proximal step on the raw alphas (used by search scripts around the weight step) --
    def binarization(self) -> None:
        self._saved_arch_parameters = self._arch_parameters.clone()
        max_indexs = self._arch_parameters.data.cpu().numpy().argmax(axis=1)
        values = torch.zeros_like(self._arch_parameters.data)
        values[torch.arange(values.shape[0]), torch.as_tensor(max_indexs)] = 1
        self._arch_parameters.data = values

    def restore_arch_parameters(self) -> None:
        self._arch_parameters.data.copy_(self._saved_arch_parameters)
        del self._saved_arch_parameters

    def clip(self) -> None:
        for line in self._arch_parameters:
            max_index = line.argmax()
            line.data.clamp_(0, 1)
            if line.sum() == 0.0:
                line.data[max_index] = 1.0
            line.data.div_(line.sum())

    def _loss(self, input, target, updateType: str = "alpha"):
        logits = self(input, updateType=updateType)
        return self._criterion(logits, target)

    def forward(self, inputs, updateType: str = "alpha"):
        probs = F.softmax(self._arch_parameters, dim=-1)
        if updateType == "weight":
            index = probs.max(-1, keepdim=True)[1]
            one_hot = torch.zeros_like(probs).scatter_(-1, index, 1.0)
            alphas = one_hot - probs.detach() + probs
        else:
            alphas = probs

        feature = self.stem(inputs)
        for cell in self.cells:
            if isinstance(cell, SearchCell):
                feature = cell(feature, alphas)
            else:
                feature = cell(feature)
        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.view(out.size(0), -1)
        return self.classifier(out)
