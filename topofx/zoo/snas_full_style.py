"""An SNAS search network with the official code base's sampling and resource penalty.

Why this exists: the zoo's ``snas`` model samples with ``F.gumbel_softmax``. The SNAS authors' own
search code (Xie, Zheng, Liu & Lin, "SNAS: Stochastic Neural Architecture Search", ICLR 2019; the
``SNAS-Series`` repository) writes it differently, and every difference is something a capture must
follow:

* **Gumbel noise by hand**: ``u = torch.zeros_like(log_alpha).uniform_()`` then
  ``-((-(u.log())).log())`` (here with the usual ``eps`` guard:
  ``-torch.log(-torch.log(u + eps) + eps)``) -- an in-place random fill of a fresh tensor;
* **a module built inside ``forward``**: ``softmax = nn.Softmax(-1)`` is constructed on every call and
  then applied to ``(log_alpha + gumbel) / self._temp`` (a Python float read from the network);
* **architecture weights as plain tensors** (``Variable(torch.zeros(k, n).normal_(mean, std),
  requires_grad=True)`` in the non-distributed branch), one sample per forward for each cell type;
* **in-place accumulation joins**: the mixed op writes ``result = 0; result += w * op(x)`` and the
  cell ``s = 0; s += h`` (the second ``+=`` is an in-place ``add_`` on a tensor); optional
  ``drop_path`` on every edge output in training (``x.div_(keep_prob); x.mul_(mask)`` with a Bernoulli
  mask from ``torch.FloatTensor(n, 1, 1, 1).bernoulli_``), and optional ``torch.utils.checkpoint``
  of the preprocessing and of each mixed op (``use_ckpt``);
* **a resource penalty computed in ``forward``**, partly in NumPy: each cell holds a cost table
  ``op_size`` (candidates' parameter counts in MB, a *plain* tensor that its mixed ops fill through row
  views at construction); per cell the forward computes the differentiable Monte-Carlo cost
  ``(op_size * weights).sum(-1)``, a baseline ``np.average(costs, axis=-1, weights=probs)`` with
  ``probs = F.softmax(log_alpha, -1).detach().cpu().numpy()`` (it follows the *current* alphas, but
  carries no gradient), and the official ``np.average((op_size.sum(0) / op_size.shape[0]).tolist())``
  normaliser, turned back into tensors with ``torch.tensor(...)``. ``forward`` returns
  ``(logits, penalty)``.

Sizes. SNAS searches on CIFAR-10 with 8 cells (reductions at 1/3 and 2/3), ``C=16`` initial channels,
4 intermediate nodes, the 8 DARTS candidates; the zoo default is that (``C=16, layers=8, steps=4``).
Written from scratch in those idioms; not a copy.
"""

from __future__ import annotations

from collections import namedtuple
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import checkpoint as cp

from .operations import OPS, PRIMITIVES, FactorizedReduce, Identity, ReLUConvBN

__all__ = ["PRIMITIVES", "Genotype", "drop_path", "MixedOp", "Cell", "Network"]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


def drop_path(x, drop_prob: float):
    if drop_prob > 0.:
        keep_prob = 1. - drop_prob
        mask = torch.FloatTensor(x.size(0), 1, 1, 1).bernoulli_(keep_prob).to(x.device)
        x.div_(keep_prob)
        x.mul_(mask)
    return x


def _param_size_mb(module: nn.Module) -> float:
    return sum(np.prod(v.size()) for v in module.parameters()) / 1e6


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, op_size: torch.Tensor, primitives: Sequence[str],
                 bn_affine: bool):
        super().__init__()
        self._ops = nn.ModuleList()
        self._resource_size = op_size  # a row view of the cell's cost table
        self.Primitives = list(primitives)
        for primitive in self.Primitives:
            op = OPS[primitive](C, stride, bn_affine)
            if "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=bn_affine))
            # the candidate's size in MB (pools and zero: their BN has none; give them a floor)
            self._resource_size[self.Primitives.index(primitive)] = max(_param_size_mb(op), 1e-6)
            self._ops.append(op)

    def forward(self, x, weights):
        result = 0
        for w, op in zip(weights, self._ops):
            result += w * op(x)
        return result


class Cell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, primitives: Sequence[str],
                 bn_affine: bool = False, use_ckpt: bool = False):
        super().__init__()
        self.reduction = reduction
        self.use_ckpt = use_ckpt
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=bn_affine)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=bn_affine)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=bn_affine)
        self._steps = steps
        self._multiplier = multiplier

        self._k = sum(1 for i in range(self._steps) for n in range(2 + i))
        self._num_ops = len(primitives)
        self.op_size = torch.zeros(self._k, self._num_ops)  # plain tensor, filled by the mixed ops

        self._ops = nn.ModuleList()
        count = 0
        for i in range(self._steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C, stride, self.op_size[count], primitives, bn_affine))
                count += 1

    def forward(self, s0, s1, weights, drop_path_prob: float = 0.):
        if self.use_ckpt:
            s0 = cp.checkpoint(self.preprocess0, s0, use_reentrant=False)
            s1 = cp.checkpoint(self.preprocess1, s1, use_reentrant=False)
        else:
            s0 = self.preprocess0(s0)
            s1 = self.preprocess1(s1)

        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            s = 0
            for j, h in enumerate(states):
                op = self._ops[offset + j]
                if self.use_ckpt:
                    h = cp.checkpoint(op, h, weights[offset + j], use_reentrant=False)
                else:
                    h = op(h, weights[offset + j])
                if self.training and drop_path_prob > 0.:
                    if not isinstance(op, Identity):
                        h = drop_path(h, drop_path_prob)
                s += h
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1), self.op_size


class Network(nn.Module):
    """SNAS search network; ``forward(input)`` returns ``(logits, resource_penalty)``."""

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8,
                 criterion: Optional[nn.Module] = None, steps: int = 4, multiplier: int = 4,
                 stem_multiplier: int = 3, temp: float = 1.0, loc_mean: float = 1.0,
                 loc_std: float = 0.001, drop_path_prob: float = 0.0, use_ckpt: bool = False,
                 bn_affine: bool = False, resource_lambda: float = 1e-2,
                 primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._steps = steps
        self._multiplier = multiplier
        self._temp = temp
        self._drop_path_prob = drop_path_prob
        self._resource_lambda = resource_lambda
        self.Primitives = list(primitives)
        self._k = sum(1 for i in range(self._steps) for n in range(2 + i))
        self._num_ops = len(self.Primitives)

        # plain tensors, as in the code base's non-distributed branch
        self.normal_log_alpha = torch.zeros(self._k, self._num_ops).normal_(
            loc_mean, loc_std).requires_grad_(True)
        self.reduce_log_alpha = torch.zeros(self._k, self._num_ops).normal_(
            loc_mean, loc_std).requires_grad_(True)
        self._arch_parameters = [self.normal_log_alpha, self.reduce_log_alpha]

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        self.reduce_list = [layers // 3, 2 * layers // 3]
        for i in range(layers):
            if i in self.reduce_list:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                        self.Primitives, bn_affine, use_ckpt)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def arch_parameters(self) -> List[torch.Tensor]:
        return self._arch_parameters

    def set_temperature(self, temp: float) -> None:
        self._temp = temp

    def _get_categ_mask(self, log_alpha, eps: float = 1e-20):
        """Relaxed one-hot sample: Gumbel noise from ``uniform_``, a softmax built here."""
        u = torch.zeros_like(log_alpha).uniform_()
        gumbel = -torch.log(-torch.log(u + eps) + eps)
        softmax = nn.Softmax(-1)
        return softmax((log_alpha + gumbel) / self._temp)

    def _resource_penalty(self, log_alpha, weights, op_size):
        resource_size = op_size * weights  # edges x ops, differentiable through the sample
        probs = F.softmax(log_alpha, dim=-1).detach().cpu().numpy()
        baseline = np.average(op_size.cpu().numpy(), axis=-1, weights=probs)
        average = np.average((op_size.sum(0) / op_size.shape[0]).tolist())
        baseline = torch.tensor(baseline.tolist(), dtype=resource_size.dtype,
                                device=resource_size.device)
        average = torch.tensor(average, dtype=resource_size.dtype, device=resource_size.device)
        return ((resource_size.sum(-1) - baseline) / average).sum()

    def forward(self, input):
        normal_weights = self._get_categ_mask(self.normal_log_alpha)
        reduce_weights = self._get_categ_mask(self.reduce_log_alpha)

        penalty = 0
        s0 = s1 = self.stem(input)
        for i, cell in enumerate(self.cells):
            if cell.reduction:
                log_alpha, weights = self.reduce_log_alpha, reduce_weights
            else:
                log_alpha, weights = self.normal_log_alpha, normal_weights
            s0, result = s1, cell(s0, s1, weights, self._drop_path_prob)
            s1 = result[0]
            penalty = penalty + self._resource_penalty(log_alpha, weights, result[1])
        out = self.global_pooling(s1)
        logits = self.classifier(out.view(out.size(0), -1))
        return logits, self._resource_lambda * penalty

    def _loss(self, input, target):
        logits, penalty = self(input)
        return self._criterion(logits, target) + penalty

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
                    gene.append((self.Primitives[k_best], j))
                start = end
                n += 1
            return gene

        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(
            normal=_parse(F.softmax(self.normal_log_alpha, dim=-1).detach().cpu().numpy()),
            normal_concat=concat,
            reduce=_parse(F.softmax(self.reduce_log_alpha, dim=-1).detach().cpu().numpy()),
            reduce_concat=concat)
