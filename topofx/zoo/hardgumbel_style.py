"""A hard-Gumbel DARTS-space supernet: one-hot samples every forward, zero-weight candidates skipped.

Why this exists: the GDAS family (Dong & Yang, "Searching for A Robust Neural Architecture in Four
GPU Hours", CVPR 2019) and the many code bases derived from its first release (e.g. the NAS-Bench-1Shot1
optimizers, FedNAS) draw a *hard* straight-through sample per edge, ``F.gumbel_softmax(alpha, tau,
hard=True)``, and run only the candidates whose weight is non-zero. Unlike xautodl's GDAS (zoo
``gdas-style``: ``index[e].item()``), the selection is written as a filter on the weight values:

* the generator form ``sum(w * op(x) for w, op in zip(weights, self._ops) if abs(w) > 1e-10)``
  (``abs`` of a 0-d tensor compared with a float: a Python ``bool`` from tensor data), or
* the loop form over ``cpu_weights = weights.tolist()``: ``if abs(cpu_weight) > 1e-10:
  clist.append(weights[j] * self._ops[j](x))``, ``return clist[0] if len(clist) == 1 else
  sum(clist)`` (``loop_join=True``).

The straight-through sample's unselected entries are exactly ``0.`` in value (``y_hard -
y_soft.detach() + y_soft``), so each edge runs exactly one candidate; the others' parameters get no
gradient and their BatchNorm statistics do not move. The sample is drawn afresh on every call (one per
cell type, shared by all cells of that type) at temperature ``self.tau`` (``set_tau``); alphas are
``nn.Parameter``s.

Sizes. The DARTS search setting: ``C=16``, 8 cells, 4 steps, 8 candidates (the zoo default), with
GDAS's ``tau`` annealed from 10 to 0.1 (default 10). Written from scratch in those idioms; not a copy.
"""

from __future__ import annotations

from collections import namedtuple
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .darts_style import Cell as DartsCell
from .darts_style import build_search_network, parse_genotype
from .operations import PRIMITIVES, mixed_candidates

__all__ = ["PRIMITIVES", "Genotype", "MixedOp", "Network"]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES,
                 loop_join: bool = False):
        super().__init__()
        self._ops = mixed_candidates(C, stride, primitives)
        self.loop_join = loop_join

    def forward(self, x, weights):
        if not self.loop_join:
            return sum(w * op(x) for w, op in zip(weights, self._ops) if abs(w) > 1e-10)
        cpu_weights = weights.tolist()
        clist = []
        for j, cpu_weight in enumerate(cpu_weights):
            if abs(cpu_weight) > 1e-10:
                clist.append(weights[j] * self._ops[j](x))
        if len(clist) == 1:
            return clist[0]
        return sum(clist)


class Network(nn.Module):
    """Hard-Gumbel search network on the DARTS skeleton; ``forward`` returns the logits."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, tau: float = 10.0,
                 loop_join: bool = False, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.tau = tau
        build_search_network(
            self, C, num_classes, layers, steps, multiplier, stem_multiplier, primitives,
            lambda C_pp, C_p, C_c, red, red_prev: DartsCell(
                steps, multiplier, C_pp, C_p, C_c, red, red_prev, self._primitives,
                mixed_op=lambda C_edge, stride: MixedOp(C_edge, stride, self._primitives,
                                                        loop_join)))
        k = sum(1 for i in range(steps) for n in range(2 + i))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, len(self._primitives)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, len(self._primitives)))

    def arch_parameters(self) -> List[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def set_tau(self, tau: float) -> None:
        self.tau = tau

    def get_tau(self) -> float:
        return self.tau

    def forward(self, input):
        weights_normal = F.gumbel_softmax(self.alphas_normal, tau=self.tau, hard=True, dim=-1)
        weights_reduce = F.gumbel_softmax(self.alphas_reduce, tau=self.tau, hard=True, dim=-1)
        s0 = s1 = self.stem(input)
        for cell in self.cells:
            weights = weights_reduce if cell.reduction else weights_normal
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def genotype(self) -> Genotype:
        with torch.no_grad():
            gene_normal = parse_genotype(F.softmax(self.alphas_normal, dim=-1).tolist(),
                                         self._steps, self._primitives)
            gene_reduce = parse_genotype(F.softmax(self.alphas_reduce, dim=-1).tolist(),
                                         self._steps, self._primitives)
        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(normal=gene_normal, normal_concat=concat, reduce=gene_reduce,
                        reduce_concat=concat)
