"""A DARTS search network written the way the original DARTS code base writes it.

Why this exists: topofx must capture and rewrite *unmodified* supernets, and the original DARTS
implementation (Liu et al., ICLR 2019) has idioms that more recent code bases dropped and that a
tracer can easily get wrong:

* the architecture weights are **plain tensors** with ``requires_grad=True`` kept as ordinary
  attributes (``self.alphas_normal``), not ``nn.Parameter``s: they are neither in
  ``named_parameters()`` nor in the ``state_dict``, and a naive ``torch.fx`` capture would freeze
  them as constants;
* every candidate of an edge is joined with ``sum(w * op(x) for w, op in zip(weights, ops))``,
  i.e. a Python ``sum`` starting from the integer ``0``;
* pooling candidates are wrapped as ``nn.Sequential(pool, nn.BatchNorm2d(C, affine=False))``;
* ``Zero`` multiplies by ``0.`` (a strided slice first when the edge reduces);
* separable convolutions stack two depthwise+pointwise stages.

The model is written from scratch in that style (it is not a copy of the public file) and kept
small by default (``C=8``, five cells) so that the test-suite runs quickly on a CPU.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Callable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .operations import (OPS, PRIMITIVES, DilConv, FactorizedReduce, Identity, ReLUConvBN,
                         SepConv, Zero, mixed_candidates)

__all__ = [
    "Genotype", "PRIMITIVES", "OPS", "ReLUConvBN", "DilConv", "SepConv", "Identity", "Zero",
    "FactorizedReduce", "MixedOp", "Cell", "Network", "SearchNetworkMixin", "build_search_network",
    "parse_genotype",
]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


# --------------------------------------------------------------------------------------------
# search network (the candidate operations live in :mod:`.operations`)
# --------------------------------------------------------------------------------------------
class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._ops = mixed_candidates(C, stride, primitives)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    """DARTS cell: two preprocessed inputs, ``steps`` nodes each summing all earlier states.

    ``mixed_op(C, stride)`` builds the edge module (default: this module's :class:`MixedOp`);
    PC-DARTS and SNAS pass their own.
    """

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, primitives: Sequence[str] = PRIMITIVES,
                 mixed_op: Callable[[int, int], nn.Module] | None = None):
        super().__init__()
        self.reduction = reduction
        if mixed_op is None:
            def mixed_op(C_edge: int, stride: int) -> nn.Module:
                return MixedOp(C_edge, stride, primitives)

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
                self._ops.append(mixed_op(C, stride))

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


def build_search_network(net: nn.Module, C: int, num_classes: int, layers: int, steps: int,
                         multiplier: int, stem_multiplier: int, primitives: Sequence[str],
                         make_cell: Callable[[int, int, int, bool, bool], nn.Module]) -> None:
    """Give ``net`` the DARTS macro skeleton: stem, ``layers`` cells, pooling, linear head.

    Reductions are at ``layers // 3`` and ``2 * layers // 3``; ``make_cell(C_prev_prev, C_prev,
    C, reduction, reduction_prev)`` builds each cell. Also sets ``_C``, ``_num_classes``,
    ``_layers``, ``_steps``, ``_multiplier`` and ``_primitives``.
    """
    net._C = C
    net._num_classes = num_classes
    net._layers = layers
    net._steps = steps
    net._multiplier = multiplier
    net._primitives = list(primitives)

    C_curr = stem_multiplier * C
    net.stem = nn.Sequential(
        nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
        nn.BatchNorm2d(C_curr),
    )

    C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
    net.cells = nn.ModuleList()
    reduction_prev = False
    for i in range(layers):
        reduction = i in [layers // 3, 2 * layers // 3]
        if reduction:
            C_curr *= 2
        net.cells.append(make_cell(C_prev_prev, C_prev, C_curr, reduction, reduction_prev))
        reduction_prev = reduction
        C_prev_prev, C_prev = C_prev, multiplier * C_curr

    net.global_pooling = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Linear(C_prev, num_classes)


class SearchNetworkMixin:
    """Methods shared by the DARTS and PC-DARTS search networks (``_criterion``,
    ``_arch_parameters``, ``_steps``, ``_multiplier`` are set by the network)."""

    def _classify(self, s):
        """Global pooling and the linear head: the logits."""
        out = self.global_pooling(s)
        return self.classifier(out.view(out.size(0), -1))

    def _loss(self, input, target):
        logits = self(input)
        return self._criterion(logits, target)

    def arch_parameters(self) -> List[torch.Tensor]:
        return self._arch_parameters

    def _num_edges(self) -> int:
        return sum(1 for i in range(self._steps) for n in range(2 + i))

    def _genotype(self, gene_normal: List[tuple], gene_reduce: List[tuple]) -> Genotype:
        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(normal=gene_normal, normal_concat=concat,
                        reduce=gene_reduce, reduce_concat=concat)


def parse_genotype(weights: Sequence[Sequence[float]], steps: int,
                   primitives: Sequence[str]) -> List[tuple]:
    """DARTS genotype of one cell type from per-edge op weights (rows of ``weights``).

    Each node keeps the two incoming edges whose best non-``none`` op is strongest, with that op.
    """
    none_idx = primitives.index("none") if "none" in primitives else -1
    gene = []
    n = 2
    start = 0
    for i in range(steps):
        end = start + n
        W = weights[start:end]

        def strength(x):
            return max(W[x][k] for k in range(len(W[x])) if k != none_idx)
        edges = sorted(range(i + 2), key=lambda x: -strength(x))[:2]
        for j in edges:
            k_best = max((k for k in range(len(W[j])) if k != none_idx),
                         key=lambda k: W[j][k])
            gene.append((primitives[k_best], j))
        start = end
        n += 1
    return gene


class Network(SearchNetworkMixin, nn.Module):
    """DARTS search network: stem, ``layers`` cells (reductions at 1/3 and 2/3), linear head.

    ``forward`` returns the logits only (as in DARTS). Architecture weights live in
    ``self.alphas_normal`` / ``self.alphas_reduce`` as plain leaf tensors.
    """

    def __init__(self, C: int = 8, num_classes: int = 10, layers: int = 5,
                 criterion: nn.Module | None = None, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._stem_multiplier = stem_multiplier
        build_search_network(
            self, C, num_classes, layers, steps, multiplier, stem_multiplier, primitives,
            lambda C_pp, C_p, C_c, red, red_prev: Cell(steps, multiplier, C_pp, C_p, C_c, red,
                                                       red_prev, self._primitives))

        self._initialize_alphas()

    def new(self) -> "Network":
        model_new = Network(self._C, self._num_classes, self._layers, self._criterion,
                            self._steps, self._multiplier, self._stem_multiplier,
                            self._primitives)
        for x, y in zip(model_new.arch_parameters(), self.arch_parameters()):
            x.data.copy_(y.data)
        return model_new

    def forward(self, input):
        s0 = s1 = self.stem(input)
        for i, cell in enumerate(self.cells):
            if cell.reduction:
                weights = F.softmax(self.alphas_reduce, dim=-1)
            else:
                weights = F.softmax(self.alphas_normal, dim=-1)
            s0, s1 = s1, cell(s0, s1, weights)
        return self._classify(s1)

    def _initialize_alphas(self) -> None:
        k = self._num_edges()
        num_ops = len(self._primitives)
        # plain tensors, exactly as the original code (which wrapped them in a Variable)
        self.alphas_normal = (1e-3 * torch.randn(k, num_ops)).requires_grad_()
        self.alphas_reduce = (1e-3 * torch.randn(k, num_ops)).requires_grad_()
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce]

    def genotype(self) -> Genotype:
        with torch.no_grad():
            gene_normal = parse_genotype(F.softmax(self.alphas_normal, dim=-1).tolist(),
                                         self._steps, self._primitives)
            gene_reduce = parse_genotype(F.softmax(self.alphas_reduce, dim=-1).tolist(),
                                         self._steps, self._primitives)
        return self._genotype(gene_normal, gene_reduce)
