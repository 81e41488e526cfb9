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

from . import darts_style
from .darts_style import (Genotype, SearchNetworkMixin, build_search_network,
                          parse_genotype)
from .operations import PRIMITIVES, mixed_candidates


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
        self._ops = mixed_candidates(C // k, stride, primitives)
        self.mp = nn.MaxPool2d(2, 2)
        self.k = k

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


class Cell(darts_style.Cell):
    """DARTS cell over partial-channel edges; ``forward`` also takes the edge weights."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, k: int = 4,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev,
                         primitives,
                         mixed_op=lambda C_edge, stride: MixedOp(C_edge, stride, k, primitives))

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


class Network(SearchNetworkMixin, nn.Module):
    """PC-DARTS search network; ``forward`` returns logits."""

    def __init__(self, C: int = 8, num_classes: int = 10, layers: int = 5,
                 criterion: nn.Module | None = None, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, k: int = 4,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        if C % k or (C // k) % 2:
            raise ValueError(f"C={C} must be a multiple of 2*k={2 * k}")
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._k = k
        build_search_network(
            self, C, num_classes, layers, steps, multiplier, stem_multiplier, primitives,
            lambda C_pp, C_p, C_c, red, red_prev: Cell(steps, multiplier, C_pp, C_p, C_c, red,
                                                       red_prev, k, self._primitives))

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
        return self._classify(s1)

    def _initialize_alphas(self) -> None:
        k = self._num_edges()
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

    def weights(self) -> List[nn.Parameter]:
        arch = {id(p) for p in self._arch_parameters}
        return [p for p in self.parameters() if id(p) not in arch]

    def genotype(self) -> Genotype:
        def _parse(alphas, betas):
            # op weights scaled by the edge-normalization weight of their edge
            weights = F.softmax(alphas, dim=-1).tolist()
            edge_w = self._edge_weights(betas).tolist()
            return parse_genotype([[v * e for v in row] for row, e in zip(weights, edge_w)],
                                  self._steps, self._primitives)

        with torch.no_grad():
            gene_normal = _parse(self.alphas_normal, self.betas_normal)
            gene_reduce = _parse(self.alphas_reduce, self.betas_reduce)
        return self._genotype(gene_normal, gene_reduce)
