"""A PC-DARTS search network (partial channel connections + edge normalization).

Why this exists: PC-DARTS (Xu et al., ICLR 2020) changes the shape of the searchable path in ways
that matter to a graph rewriter:

* only ``1/k`` of the channels go through the candidates (``x[:, :C//k]``); the rest bypass the
  edge and are concatenated back (max-pooled when the edge reduces), followed by a
  ``channel_shuffle`` written with ``view``/``transpose``/``contiguous``/``view`` over
  ``x.size()``;
* every edge output is scaled again by an *edge-normalization* weight ``beta``, softmaxed over the
  incoming edges of a node, computed in ``forward`` with slices and ``torch.cat``.

Styles are deliberately mixed: the operation weights ``alphas_*`` are ``nn.Parameter``s while the
edge weights ``betas_*`` are plain ``requires_grad`` tensors kept as attributes (the original used
``Variable`` for both). The primitive operations are the DARTS ones (PC-DARTS reuses DARTS'
``operations.py``). Written from scratch in the style of the public code; small by default.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .darts_style import OPS, PRIMITIVES, FactorizedReduce, Genotype, ReLUConvBN


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups

    # reshape
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()

    # flatten
    x = x.view(batchsize, -1, height, width)
    return x


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, k: int = 4, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._ops = nn.ModuleList()
        self.mp = nn.MaxPool2d(2, 2)
        self.k = k
        for primitive in primitives:
            op = OPS[primitive](C // self.k, stride, False)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C // self.k, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        # channel proportion k=4
        dim_2 = x.shape[1]
        xtemp = x[:, :dim_2 // self.k, :, :]
        xtemp2 = x[:, dim_2 // self.k:, :, :]
        temp1 = sum(w * op(xtemp) for w, op in zip(weights, self._ops))
        # reduction cell needs pooling before concat
        if temp1.shape[2] == x.shape[2]:
            ans = torch.cat([temp1, xtemp2], dim=1)
        else:
            ans = torch.cat([temp1, self.mp(xtemp2)], dim=1)
        ans = channel_shuffle(ans, self.k)
        return ans


class Cell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, k: int = 4,
                 primitives: Sequence[str] = PRIMITIVES):
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
                self._ops.append(MixedOp(C, stride, k, primitives))

    def forward(self, s0, s1, weights, weights2):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)

        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            s = sum(weights2[offset + j] * self._ops[offset + j](h, weights[offset + j])
                    for j, h in enumerate(states))
            offset += len(states)
            states.append(s)

        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    """PC-DARTS search network; ``forward`` returns logits."""

    def __init__(self, C: int = 8, num_classes: int = 10, layers: int = 5,
                 criterion: nn.Module | None = None, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, k: int = 4,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        if C % k or (C // k) % 2:
            raise ValueError(f"C={C} must be a multiple of 2*k={2 * k}")
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._steps = steps
        self._multiplier = multiplier
        self._k = k
        self._primitives = list(primitives)

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
            else:
                reduction = False
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                        reduction_prev, k, self._primitives)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, multiplier * C_curr

        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        self._initialize_alphas()

    def _edge_weights(self, betas: torch.Tensor) -> torch.Tensor:
        """Softmax of the betas over the incoming edges of each node, concatenated."""
        n = 3
        start = 2
        weights2 = F.softmax(betas[0:2], dim=-1)
        for i in range(self._steps - 1):
            end = start + n
            tw2 = F.softmax(betas[start:end], dim=-1)
            start = end
            n += 1
            weights2 = torch.cat([weights2, tw2], dim=0)
        return weights2

    def forward(self, input):
        s0 = s1 = self.stem(input)
        for i, cell in enumerate(self.cells):
            if cell.reduction:
                weights = F.softmax(self.alphas_reduce, dim=-1)
                weights2 = self._edge_weights(self.betas_reduce)
            else:
                weights = F.softmax(self.alphas_normal, dim=-1)
                weights2 = self._edge_weights(self.betas_normal)
            s0, s1 = s1, cell(s0, s1, weights, weights2)
        out = self.global_pooling(s1)
        logits = self.classifier(out.view(out.size(0), -1))
        return logits

    def _loss(self, input, target):
        logits = self(input)
        return self._criterion(logits, target)

    def _initialize_alphas(self) -> None:
        k = sum(1 for i in range(self._steps) for n in range(2 + i))
        num_ops = len(self._primitives)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, num_ops))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, num_ops))
        # edge normalization weights: plain leaf tensors, not registered anywhere
        self.betas_normal = (1e-3 * torch.randn(k)).requires_grad_()
        self.betas_reduce = (1e-3 * torch.randn(k)).requires_grad_()
        self._arch_parameters = [
            self.alphas_normal,
            self.alphas_reduce,
            self.betas_normal,
            self.betas_reduce,
        ]

    def arch_parameters(self) -> List[torch.Tensor]:
        return self._arch_parameters

    def weights(self) -> List[nn.Parameter]:
        arch = {id(p) for p in self._arch_parameters}
        return [p for p in self.parameters() if id(p) not in arch]

    def genotype(self) -> Genotype:
        primitives = self._primitives
        none_idx = primitives.index("none") if "none" in primitives else -1

        def _parse(weights, edge_w):
            gene = []
            n = 2
            start = 0
            for i in range(self._steps):
                end = start + n
                W = [[v * edge_w[start + j] for v in weights[start + j]] for j in range(n)]

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

        with torch.no_grad():
            gene_normal = _parse(F.softmax(self.alphas_normal, dim=-1).tolist(),
                                 self._edge_weights(self.betas_normal).tolist())
            gene_reduce = _parse(F.softmax(self.alphas_reduce, dim=-1).tolist(),
                                 self._edge_weights(self.betas_reduce).tolist())

        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(normal=gene_normal, normal_concat=concat,
                        reduce=gene_reduce, reduce_concat=concat)
