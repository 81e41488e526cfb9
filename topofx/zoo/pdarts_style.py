"""A P-DARTS search network, written in the idioms of the P-DARTS code base.

Why this exists: P-DARTS (Chen, Xie, Wu & Tian, "Progressive Differentiable Architecture Search:
Bridging the Depth Gap between Search and Evaluation", ICCV 2019) searches in three stages; between
stages it throws away the weakest candidates of every edge and builds a *new, deeper* network with the
survivors. Its search code has idioms that a capture must follow:

* **per-edge candidate lists from ``switches``**: ``switches_normal`` / ``switches_reduce`` are lists
  (one per edge) of lists of bools over ``PRIMITIVES``; a ``MixedOp`` builds only the switched-on
  candidates (in ``self.m_ops``) and zips them with the edge's weights. After stage 1 the edges of
  one cell hold *different* candidate sets of the same size;
* **a ``Dropout`` after ``skip_connect``**: when the stage's rate ``p > 0`` every identity candidate is
  wrapped as ``nn.Sequential(Identity(), nn.Dropout(p))``; the rate decays every epoch, the search
  script sets ``model.p = ...`` and calls ``model.update_p()``, which walks cells and mixed ops and
  assigns ``op[1].p`` (a Python float on a module the graph calls). Here ``update_p(p)`` also takes
  the new rate directly;
* **a legacy-constructor ``Zero``**: the ``none`` candidate reads ``n, c, h, w = x.size()`` and returns
  a *fresh* tensor ``torch.FloatTensor(n, c, h // s, w // s).fill_(0)`` (the code base branches on
  ``x.is_cuda`` to build it on the right device; here the CUDA branch builds it on the CPU and moves
  it with ``.to(x.device)``, so the model stays device-agnostic). The zero tensor is float32 whatever
  the model's dtype, and does not depend on ``x``'s values;
* **plain-tensor alphas** (``Variable(1e-3 * torch.randn(k, num_ops), requires_grad=True)``) sized by
  the number of switched-on candidates, and a ``softmax`` over ``dim=0`` when an edge keeps a single
  candidate (``if self.alphas_normal.size(1) == 1``);
* **the stage switch**: :meth:`Network.next_stage_switches` drops, per edge, the ``num_to_drop``
  switched-on candidates with the lowest softmax weight (``get_min_k`` in the code base) and returns
  new switch lists; the caller builds a new :class:`Network` from them (deeper, with a higher
  dropout rate), exactly as P-DARTS's ``train_search.py`` does.

Sizes. Paper/code search schedule on CIFAR-10: ``C=16`` initial channels; stage 1: 5 cells, all 8
candidates, dropout 0.1; stage 2: 11 cells, 5 candidates, dropout 0.4; stage 3: 17 cells,
3 candidates, dropout 0.7 (``--add_layers 6 --add_layers 12 --dropout_rate 0.1 0.4 0.7``). The zoo
default is stage 1 (``C=16, layers=5, p=0.1``). Written from scratch in those idioms; not a copy.
"""

from __future__ import annotations

from collections import namedtuple
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .operations import OPS, PRIMITIVES, FactorizedReduce, Identity, ReLUConvBN

__all__ = ["PRIMITIVES", "Genotype", "Zero", "MixedOp", "Cell", "Network", "all_switches",
           "STAGES"]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

# (extra cells, candidates kept per edge, dropout rate on skip_connect) of the three stages
STAGES = [(0, 8, 0.1), (6, 5, 0.4), (12, 3, 0.7)]


def all_switches(num_edges: int = 14, num_ops: int = len(PRIMITIVES)) -> List[List[bool]]:
    """Stage-1 switches: every candidate of every edge switched on."""
    return [[True for _ in range(num_ops)] for _ in range(num_edges)]


class Zero(nn.Module):
    """The ``none`` candidate as P-DARTS writes it: a new zero tensor from the legacy constructor."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        n, c, h, w = x.size()
        h //= self.stride
        w //= self.stride
        if x.is_cuda:
            padding = torch.FloatTensor(n, c, h, w).fill_(0).to(x.device)
        else:
            padding = torch.FloatTensor(n, c, h, w).fill_(0)
        return padding


def _make_op(primitive: str, C: int, stride: int) -> nn.Module:
    if primitive == "none":
        return Zero(stride)
    return OPS[primitive](C, stride, False)


class MixedOp(nn.Module):
    """Builds only the candidates whose switch is on."""

    def __init__(self, C: int, stride: int, switch: Sequence[bool], p: float):
        super().__init__()
        self.m_ops = nn.ModuleList()
        self.p = p
        for i in range(len(switch)):
            if not switch[i]:
                continue
            primitive = PRIMITIVES[i]
            op = _make_op(primitive, C, stride)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            if isinstance(op, Identity) and p > 0:
                op = nn.Sequential(op, nn.Dropout(self.p))
            self.m_ops.append(op)

    def update_p(self) -> None:
        for op in self.m_ops:
            if isinstance(op, nn.Sequential) and isinstance(op[0], Identity):
                op[1].p = self.p

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.m_ops))


class Cell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, switches: Sequence[Sequence[bool]],
                 p: float):
        super().__init__()
        self.reduction = reduction
        self.p = p
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier

        self.cell_ops = nn.ModuleList()
        switch_count = 0
        for i in range(self._steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.cell_ops.append(MixedOp(C, stride, switches[switch_count], self.p))
                switch_count += 1

    def update_p(self) -> None:
        for op in self.cell_ops:
            op.p = self.p
            op.update_p()

    def forward(self, s0, s1, weights):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            s = sum(self.cell_ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    """P-DARTS search network (one stage); ``forward`` returns the logits."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 5,
                 criterion: Optional[nn.Module] = None, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, switches_normal: Optional[List[List[bool]]] = None,
                 switches_reduce: Optional[List[List[bool]]] = None, p: float = 0.1):
        super().__init__()
        num_edges = sum(1 for i in range(steps) for n in range(2 + i))
        if switches_normal is None:
            switches_normal = all_switches(num_edges)
        if switches_reduce is None:
            switches_reduce = all_switches(num_edges)
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._steps = steps
        self._multiplier = multiplier
        self._stem_multiplier = stem_multiplier
        self.p = p
        self.switches_normal = [list(s) for s in switches_normal]
        self.switches_reduce = [list(s) for s in switches_reduce]
        # the number of switched-on candidates (the same on every edge within a stage)
        switch_ons = []
        for i in range(len(self.switches_normal)):
            ons = 0
            for j in range(len(self.switches_normal[i])):
                if self.switches_normal[i][j]:
                    ons = ons + 1
            switch_ons.append(ons)
        self.switch_on = switch_ons[0]

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                C_curr *= 2
                reduction = True
                cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                            reduction_prev, self.switches_reduce, self.p)
            else:
                reduction = False
                cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                            reduction_prev, self.switches_normal, self.p)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, multiplier * C_curr

        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._initialize_alphas()

    def _initialize_alphas(self) -> None:
        k = sum(1 for i in range(self._steps) for n in range(2 + i))
        num_ops = self.switch_on
        self.alphas_normal = (1e-3 * torch.randn(k, num_ops)).requires_grad_(True)
        self.alphas_reduce = (1e-3 * torch.randn(k, num_ops)).requires_grad_(True)
        self._arch_parameters = [self.alphas_normal, self.alphas_reduce]

    def arch_parameters(self) -> List[torch.Tensor]:
        return self._arch_parameters

    def forward(self, input):
        s0 = s1 = self.stem(input)
        for i, cell in enumerate(self.cells):
            if cell.reduction:
                if self.alphas_reduce.size(1) == 1:
                    weights = F.softmax(self.alphas_reduce, dim=0)
                else:
                    weights = F.softmax(self.alphas_reduce, dim=-1)
            else:
                if self.alphas_normal.size(1) == 1:
                    weights = F.softmax(self.alphas_normal, dim=0)
                else:
                    weights = F.softmax(self.alphas_normal, dim=-1)
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def _loss(self, input, target):
        return self._criterion(self(input), target)

    # ---- between epochs / stages ---------------------------------------------------------------
    def update_p(self, p: Optional[float] = None) -> None:
        """Propagate the skip-connect dropout rate (``model.p = ...; model.update_p()`` in P-DARTS;
        ``update_p(p)`` sets ``self.p`` first)."""
        if p is not None:
            self.p = p
        for cell in self.cells:
            cell.p = self.p
            cell.update_p()

    def dropout_modules(self) -> List[nn.Dropout]:
        return [m for m in self.modules() if isinstance(m, nn.Dropout)]

    def next_stage_switches(self, num_to_drop: int, keep_none: bool = True):
        """P-DARTS's candidate dropping: per edge, switch off the ``num_to_drop`` switched-on
        candidates with the lowest softmax weight (``keep_none=False``: as in the last stage, never
        keep ``none``, it goes first). Returns new ``(switches_normal, switches_reduce)``."""
        new = []
        for switches, alphas in ((self.switches_normal, self.alphas_normal),
                                 (self.switches_reduce, self.alphas_reduce)):
            switches = [list(s) for s in switches]
            prob = F.softmax(alphas, dim=-1).data.cpu().numpy()
            for i in range(len(switches)):
                idxs = [j for j in range(len(PRIMITIVES)) if switches[i][j]]
                order = sorted(range(len(idxs)), key=lambda k: prob[i, k])
                if not keep_none and switches[i][0]:
                    order = [0] + [k for k in order if k != 0]
                for k in order[:num_to_drop]:
                    switches[i][idxs[k]] = False
            new.append(switches)
        return new[0], new[1]

    def genotype(self) -> Genotype:
        """The strongest non-``none`` candidate of the two strongest edges of every node."""

        def _parse(alphas, switches):
            prob = F.softmax(alphas, dim=-1).data.cpu().numpy()
            gene, start, n = [], 0, 2
            for i in range(self._steps):
                best = []
                for j in range(n):
                    names = [PRIMITIVES[k] for k in range(len(PRIMITIVES)) if switches[start + j][k]]
                    cand = [(prob[start + j][k], names[k]) for k in range(len(names))
                            if names[k] != "none"]
                    if cand:
                        best.append((max(cand)[0], max(cand)[1], j))
                for _, name, j in sorted(best, reverse=True)[:2]:
                    gene.append((name, j))
                start += n
                n += 1
            return gene

        with torch.no_grad():
            concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
            return Genotype(normal=_parse(self.alphas_normal, self.switches_normal),
                            normal_concat=concat,
                            reduce=_parse(self.alphas_reduce, self.switches_reduce),
                            reduce_concat=concat)
