"""An SNAS search network: architecture weights sampled with Gumbel-softmax inside ``forward``.

Why this exists: in SNAS (Xie et al., ICLR 2019) the weights of an edge are a *random*
relaxed-categorical sample, ``F.gumbel_softmax(log_alpha, tau=temp, hard=False)``, drawn afresh in
every forward pass. A capture must keep that sampling in the graph (it is neither a constant nor
data-independent of the RNG), and an equivalence test must seed the RNG identically for the
original and the rewritten model. The join is written ``sum(op(x) * w ...)`` (operand order
reversed with respect to DARTS) to exercise pattern matching on both orders; ``log_alpha`` are
``nn.Parameter``s. Operations are the DARTS primitives. Small by default (``C=8``, 5 cells,
3 steps).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import darts_style
from .darts_style import Genotype, build_search_network
from .operations import PRIMITIVES, mixed_candidates


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._ops = mixed_candidates(C, stride, primitives)

    def forward(self, x, weights):
        return sum(op(x) * w for w, op in zip(weights, self._ops))


class Cell(darts_style.Cell):
    """The DARTS cell with SNAS edges (``op(x) * w``)."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, primitives: Sequence[str] = PRIMITIVES):
        super().__init__(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev,
                         primitives,
                         mixed_op=lambda C_edge, stride: MixedOp(C_edge, stride, primitives))


class Network(nn.Module):
    """SNAS search network; ``forward`` returns logits. ``temp`` is the Gumbel temperature."""

    def __init__(self, C: int = 8, num_classes: int = 10, layers: int = 5, steps: int = 3,
                 multiplier: int = 3, stem_multiplier: int = 3, temp: float = 1.0,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.temp = temp
        build_search_network(
            self, C, num_classes, layers, steps, multiplier, stem_multiplier, primitives,
            lambda C_pp, C_p, C_c, red, red_prev: Cell(steps, multiplier, C_pp, C_p, C_c, red,
                                                       red_prev, self._primitives))

        k = sum(1 for i in range(steps) for n in range(2 + i))
        num_ops = len(self._primitives)
        self.log_alpha_normal = nn.Parameter(
            torch.zeros(k, num_ops).normal_(1, 0.01))
        self.log_alpha_reduce = nn.Parameter(
            torch.zeros(k, num_ops).normal_(1, 0.01))

    def set_temperature(self, temp: float) -> None:
        self.temp = temp

    def arch_parameters(self) -> List[nn.Parameter]:
        return [self.log_alpha_normal, self.log_alpha_reduce]

    def forward(self, input):
        # one relaxed sample per forward pass, shared by all cells of a type
        weights_normal = F.gumbel_softmax(self.log_alpha_normal, tau=self.temp, hard=False,
                                          dim=-1)
        weights_reduce = F.gumbel_softmax(self.log_alpha_reduce, tau=self.temp, hard=False,
                                          dim=-1)
        s0 = s1 = self.stem(input)
        for cell in self.cells:
            weights = weights_reduce if cell.reduction else weights_normal
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def genotype(self) -> Genotype:
        primitives = self._primitives

        def _parse(log_alpha: torch.Tensor):
            gene = []
            start, n = 0, 2
            for i in range(self._steps):
                W = log_alpha[start:start + n]
                for j in range(n):
                    k_best = int(W[j].argmax())
                    if primitives[k_best] != "none":
                        gene.append((primitives[k_best], j))
                start += n
                n += 1
            return gene

        with torch.no_grad():
            concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
            return Genotype(normal=_parse(self.log_alpha_normal), normal_concat=concat,
                            reduce=_parse(self.log_alpha_reduce), reduce_concat=concat)
