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

from .darts_style import OPS, PRIMITIVES, FactorizedReduce, Genotype, ReLUConvBN


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._ops = nn.ModuleList()
        for primitive in primitives:
            op = OPS[primitive](C, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        return sum(op(x) * w for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.reduction = reduction
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
                self._ops.append(MixedOp(C, stride, primitives))

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for i in range(self._steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    """SNAS search network; ``forward`` returns logits. ``temp`` is the Gumbel temperature."""

    def __init__(self, C: int = 8, num_classes: int = 10, layers: int = 5, steps: int = 3,
                 multiplier: int = 3, stem_multiplier: int = 3, temp: float = 1.0,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._steps = steps
        self._multiplier = multiplier
        self._primitives = list(primitives)
        self.temp = temp

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in [layers // 3, 2 * layers // 3]
            if reduction:
                C_curr *= 2
            self.cells.append(Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                                   reduction_prev, self._primitives))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr

        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

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
