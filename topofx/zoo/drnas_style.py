"""DrNAS search networks: architecture weights sampled from a Dirichlet inside ``forward``.

Why this exists: DrNAS (Chen, Wang, Cheng, Tang & Hsieh, "DrNAS: Dirichlet Neural Architecture
Search", ICLR 2021) treats each edge's mixing weights as a random variable,
``w ~ Dirichlet(F.elu(alpha) + 1)``, drawn with the pathwise (reparameterized) gradient
``torch.distributions.Dirichlet(concentration).rsample()`` in every forward pass. The code base's
idioms that a capture must follow:

* **a ``torch.distributions`` object built in ``forward``**, one per row: ``process_step_matrix``
  loops ``for line in alpha`` and stacks ``Dirichlet(F.elu(line) + 1).rsample()`` (the sample draws
  Gamma variates; its gradient is ``_dirichlet_grad``). Dirichlet samples are never exactly one-hot,
  so unlike softmax models there is no "vertex" to set alphas to; sampling at concentrations far
  below 1 gives weights one-hot to ~1e-38;
* **progressive pruning with a boolean mask** (``pruning(num_keep)``): the mask keeps each edge's
  ``num_keep`` strongest candidates; ``process_step_vector`` then writes
  ``output_pruned = torch.zeros_like(output); output_pruned[mask] = output[mask]; output_pruned /=
  output_pruned.sum()`` -- boolean-index assignment and in-place division, with the mask a plain bool
  tensor attribute (``None`` before the first pruning);
* **a join that skips zero weights**: ``sum(w * op(x) for w, op in zip(weights, ops) if not w == 0)``
  (the Python truth value of a 0-d tensor; pruned candidates are skipped), on a partial-channel slice
  ``x[:, :dim // k]`` when ``k > 1`` (``torch.cat`` with the rest and ``channel_shuffle``, from
  PC-DARTS; ``k=1`` returns the join directly);
* the NAS-Bench-201 model uses xautodl's skeleton (``ModuleDict`` edges keyed ``'i<-j'``, residual
  reduction blocks, ``lastact``), an ``nn.Parameter`` alpha of shape ``(6, 5)``; the DARTS-space model
  uses the DARTS skeleton with plain-tensor alphas ``alphas_normal`` / ``alphas_reduce`` of shape
  ``(14, 8)`` and pools without a BatchNorm after them.

Sizes. NAS-Bench-201 space: ``C=16``, ``N=5`` cells per stage (15 search cells), 4 nodes, 5
candidates -- the zoo default. DARTS space: the zoo default is ``C=16``, 8 cells, 4 steps, 8
candidates, ``k=1`` (the DARTS search size). Note that the code base's own DARTS-space
``train_search.py`` searches *directly at evaluation size* with progressive learning: ``C=36``,
20 cells, partial channels ``k=6`` then ``k=4`` with 7 then 4 candidates kept (``ks=[6, 4]``,
``num_keeps=[7, 4]``); pass ``C=36, layers=20, k=6`` for that. Written from scratch in those idioms;
not a copy.
"""

from __future__ import annotations

from collections import namedtuple
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gdas_style import ResidualReduction
from .gdas_style import SEARCH_SPACE as NAS_BENCH_201
from .gdas_style import make_op as make_nb201_op
from .operations import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN

__all__ = ["NAS_BENCH_201", "PRIMITIVES", "Genotype", "process_step_vector", "process_step_matrix",
           "prune", "channel_shuffle", "TinyNetworkDrNAS", "NetworkDrNAS"]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


# ---------------------------------------------------------------------------------------------
# the sampling utilities of the code base
# ---------------------------------------------------------------------------------------------
def process_step_vector(x, method: str, mask, tau: Optional[float] = None):
    if method == "softmax":
        output = F.softmax(x, dim=-1)
    elif method == "dirichlet":
        output = torch.distributions.dirichlet.Dirichlet(F.elu(x) + 1).rsample()
    elif method == "gumbel":
        output = F.gumbel_softmax(x, tau=tau, hard=False, dim=-1)
    else:
        raise ValueError(method)
    if mask is None:
        return output
    output_pruned = torch.zeros_like(output)
    output_pruned[mask] = output[mask]
    output_pruned /= output_pruned.sum()
    return output_pruned


def process_step_matrix(x, method: str, mask, tau: Optional[float] = None):
    weights = []
    if mask is None:
        for line in x:
            weights.append(process_step_vector(line, method, None, tau))
    else:
        for i, line in enumerate(x):
            weights.append(process_step_vector(line, method, mask[i], tau))
    return torch.stack(weights)


def prune(x, num_keep: int, mask, reset: bool = False):
    """Keep the ``num_keep`` largest alphas of each row; returns the new boolean mask (and, as the
    code base does, rewrites ``x.data``: kept entries keep their value, the others become 0)."""
    if mask is not None:
        x.data[~mask] -= 1000000
    src, index = x.topk(k=num_keep, dim=-1)
    if not reset:
        x.data.copy_(torch.zeros_like(x).scatter(dim=1, index=index, src=src))
    else:
        x.data.copy_(torch.zeros_like(x).scatter(dim=1, index=index, src=1e-3 * torch.randn_like(src)))
    return torch.zeros_like(x, dtype=torch.bool).scatter(
        dim=1, index=index, src=torch.ones_like(src, dtype=torch.bool))


def channel_shuffle(x, groups: int):
    batchsize, num_channels, height, width = x.data.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


# ---------------------------------------------------------------------------------------------
# NAS-Bench-201 space
# ---------------------------------------------------------------------------------------------
class NB201SearchCellDrNAS(nn.Module):
    """xautodl's search cell with DrNAS's partial-channel ``MixedOp`` method."""

    def __init__(self, C: int, max_nodes: int, op_names: Sequence[str], affine: bool,
                 track_running_stats: bool, k: int = 1):
        super().__init__()
        self.k = k
        self.op_names = list(op_names)
        self.max_nodes = max_nodes
        self.in_dim = self.out_dim = C
        self.edges = nn.ModuleDict()
        for i in range(1, max_nodes):
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                self.edges[node_str] = nn.ModuleList(
                    [make_nb201_op(name, C // k, affine, track_running_stats) for name in op_names])
        self.edge_keys = sorted(list(self.edges.keys()))
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    def MixedOp(self, x, ops, weights):
        dim_2 = x.shape[1]
        xtemp = x[:, :dim_2 // self.k, :, :]
        xtemp2 = x[:, dim_2 // self.k:, :, :]
        temp1 = sum(w * op(xtemp) for w, op in zip(weights, ops) if not w == 0)
        if self.k == 1:
            return temp1
        ans = torch.cat([temp1, xtemp2], dim=1)
        return channel_shuffle(ans, self.k)

    def forward(self, inputs, weightss):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                inter_nodes.append(self.MixedOp(x=nodes[j], ops=self.edges[node_str],
                                                weights=weights))
            nodes.append(sum(inter_nodes))
        return nodes[-1]


class TinyNetworkDrNAS(nn.Module):
    """DrNAS on NAS-Bench-201: ``forward`` returns the logits."""

    def __init__(self, C: int = 16, N: int = 5, max_nodes: int = 4, num_classes: int = 10,
                 criterion: Optional[nn.Module] = None,
                 search_space: Sequence[str] = NAS_BENCH_201, affine: bool = False,
                 track_running_stats: bool = True, k: int = 1, species: str = "dirichlet"):
        super().__init__()
        self._C = C
        self._layerN = N
        self.max_nodes = max_nodes
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.k = k
        self.species = species
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
                cell = NB201SearchCellDrNAS(C_curr, max_nodes, search_space, affine,
                                            track_running_stats, k)
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
        self.tau = 10 if species == "gumbel" else None
        self._mask = None

    def arch_parameters(self) -> List[torch.Tensor]:
        return [self._arch_parameters]

    def pruning(self, num_keep: int) -> None:
        self._mask = prune(self._arch_parameters, num_keep, self._mask)

    def genotype(self) -> List[tuple]:
        genotypes = []
        alphas = process_step_matrix(self._arch_parameters, "softmax", self._mask)
        for i in range(1, self.max_nodes):
            xlist = []
            for j in range(i):
                with torch.no_grad():
                    weights = alphas[self.edge2index["{:}<-{:}".format(i, j)]]
                    xlist.append((self.op_names[weights.argmax().item()], j))
            genotypes.append(tuple(xlist))
        return genotypes

    def forward(self, inputs):
        alphas = process_step_matrix(self._arch_parameters, self.species, self._mask, self.tau)
        feature = self.stem(inputs)
        for cell in self.cells:
            if isinstance(cell, NB201SearchCellDrNAS):
                feature = cell(feature, alphas)
            else:
                feature = cell(feature)
        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.view(out.size(0), -1)
        return self.classifier(out)

    def _loss(self, input, target):
        return self._criterion(self(input), target)


# ---------------------------------------------------------------------------------------------
# DARTS space
# ---------------------------------------------------------------------------------------------
class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, k: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.k = k
        self.C = C
        self._ops = nn.ModuleList()
        self.mp = nn.MaxPool2d(2, 2)
        for primitive in primitives:
            self._ops.append(OPS[primitive](C // self.k, stride, False))  # no BN after pools

    def forward(self, x, weights):
        dim_2 = x.shape[1]
        xtemp = x[:, :dim_2 // self.k, :, :]
        xtemp2 = x[:, dim_2 // self.k:, :, :]
        temp1 = sum(w * op(xtemp) for w, op in zip(weights, self._ops) if not w == 0)
        if self.k == 1:
            return temp1
        if temp1.shape[2] == x.shape[2]:
            ans = torch.cat([temp1, xtemp2], dim=1)
        else:
            ans = torch.cat([temp1, self.mp(xtemp2)], dim=1)
        return channel_shuffle(ans, self.k)


class Cell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, k: int,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.reduction = reduction
        self.k = k
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        for i in range(self._steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C, stride, self.k, primitives))

    def forward(self, s0, s1, weights):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class NetworkDrNAS(nn.Module):
    """DrNAS on the DARTS space: ``forward`` returns the logits."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8,
                 criterion: Optional[nn.Module] = None, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, k: int = 1, reg_type: str = "l2",
                 reg_scale: float = 1e-3, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._steps = steps
        self._multiplier = multiplier
        self.k = k
        self._primitives = list(primitives)

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                        k, self._primitives)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._initialize_alphas()
        self.reg_type = reg_type
        self.reg_scale = reg_scale
        self.anchor_normal = torch.distributions.Dirichlet(torch.ones_like(self.alphas_normal))
        self.anchor_reduce = torch.distributions.Dirichlet(torch.ones_like(self.alphas_reduce))

    def _initialize_alphas(self) -> None:
        k = sum(1 for i in range(self._steps) for n in range(2 + i))
        num_ops = len(self._primitives)
        self.alphas_normal = (1e-3 * torch.randn(k, num_ops)).requires_grad_(True)
        self.alphas_reduce = (1e-3 * torch.randn(k, num_ops)).requires_grad_(True)
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce]
        self.mask_normal = None
        self.mask_reduce = None

    def arch_parameters(self) -> List[torch.Tensor]:
        return self._arch_parameters

    def pruning(self, num_keep: int) -> None:
        with torch.no_grad():
            self.mask_normal = prune(self.alphas_normal, num_keep, self.mask_normal)
            self.mask_reduce = prune(self.alphas_reduce, num_keep, self.mask_reduce)

    def forward(self, input):
        s0 = s1 = self.stem(input)
        weights_normal = process_step_matrix(self.alphas_normal, "dirichlet", self.mask_normal)
        weights_reduce = process_step_matrix(self.alphas_reduce, "dirichlet", self.mask_reduce)
        for i, cell in enumerate(self.cells):
            weights = weights_reduce if cell.reduction else weights_normal
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def _get_kl_reg(self):
        q_normal = torch.distributions.Dirichlet(F.elu(self.alphas_normal) + 1)
        q_reduce = torch.distributions.Dirichlet(F.elu(self.alphas_reduce) + 1)
        kl = torch.distributions.kl.kl_divergence
        return self.reg_scale * (torch.sum(kl(q_reduce, self.anchor_reduce))
                                 + torch.sum(kl(q_normal, self.anchor_normal)))

    def _loss(self, input, target):
        loss = self._criterion(self(input), target)
        if self.reg_type == "kl":
            loss = loss + self._get_kl_reg()
        return loss

    def genotype(self) -> Genotype:
        def _parse(weights):
            gene, n, start = [], 2, 0
            for i in range(self._steps):
                end = start + n
                W = weights[start:end].copy()
                edges = sorted(range(i + 2), key=lambda x: -max(W[x][k] for k in range(len(W[x]))))[:2]
                for j in edges:
                    k_best = None
                    for k in range(len(W[j])):
                        if k_best is None or W[j][k] > W[j][k_best]:
                            k_best = k
                    gene.append((self._primitives[k_best], j))
                start = end
                n += 1
            return gene

        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        with torch.no_grad():
            normal = process_step_matrix(self.alphas_normal, "softmax", self.mask_normal)
            reduce = process_step_matrix(self.alphas_reduce, "softmax", self.mask_reduce)
        return Genotype(normal=_parse(normal.cpu().numpy()), normal_concat=concat,
                        reduce=_parse(reduce.cpu().numpy()), reduce_concat=concat)
