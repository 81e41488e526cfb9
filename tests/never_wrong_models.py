"""Small supernets for ``test_never_wrong.py``, each written the way a public NAS codebase writes it.

Every model here is a regression model for one failure class of issue 11 (a construct that made
``topofx.simplify`` hand back a wrong module, crash, or lean on its own safety net). They are kept
tiny (C = 4..8, 8x8 / 16x16 inputs, batch 2..4) so the whole test file runs in seconds. The styles
(in words, no code copied):

* DARTS (quark0/darts ``model_search.py``): ``MixedOp`` returns ``sum(w * op(x) for w, op in ...)``,
  a ``Cell`` with ``preprocess0/1`` (ReLU-Conv-BN, ``affine=False``) over two inputs, ``states``,
  ``offset`` and ``s = sum(self._ops[offset + j](h, weights[offset + j]) ...)``; architecture
  weights are plain ``requires_grad`` tensors returned by ``arch_parameters()``.
* xautodl NAS-Bench-201 (``search_cells.NAS201SearchCell``): ``edges`` is an ``nn.ModuleDict`` keyed
  ``'{i}<-{j}'``, ``edge2index`` maps a key to a row of ``arch_parameters`` (an ``nn.Parameter``).
* SNAS: Gumbel-softmax weights sampled in ``forward`` with hand-written noise
  ``-log(-log(U))``, ``U`` from ``uniform_``.
* ProxylessNAS / FBNet: a chain of ``MixedEdge`` blocks whose candidates are MBConv (inverted
  residual) blocks with several expansion ratios, plus a residual ``x + mixed(x)``.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# primitives (DARTS operations.py idioms)
# ---------------------------------------------------------------------------------------------
class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride=1, padding=0, affine=False, padding_mode="zeros",
                 bn_momentum=0.1):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False,
                      padding_mode=padding_mode),
            nn.BatchNorm2d(C_out, affine=affine, momentum=bn_momentum),
        )

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=False):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride=1):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


def drop_path(x, drop_prob):
    """DARTS ``utils.drop_path`` idiom: one Bernoulli keep-mask per sample, in place."""
    if drop_prob > 0.:
        keep_prob = 1. - drop_prob
        mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep_prob)
        x.div_(keep_prob)
        x.mul_(mask)
    return x


class DropPathOp(nn.Module):
    """A candidate followed by DARTS's drop_path in training (as P-DARTS/PC-DARTS-style searches
    regularize the parameterized candidates)."""

    def __init__(self, op, drop_prob):
        super().__init__()
        self.op = op
        self.drop_prob = drop_prob

    def forward(self, x):
        out = self.op(x)
        if self.training and self.drop_prob > 0.:
            out = drop_path(out, self.drop_prob)
        return out


# ---------------------------------------------------------------------------------------------
# DARTS search network (two-input cells with preprocess; plain-tensor alphas)
# ---------------------------------------------------------------------------------------------
class MixedOp(nn.Module):
    def __init__(self, C, make_ops, join="sum"):
        super().__init__()
        self._ops = nn.ModuleList(make(C) for make in make_ops)
        self.join = join

    def forward(self, x, weights):
        if self.join == "sum":
            return sum(w * op(x) for w, op in zip(weights, self._ops))
        if self.join == "indexed":  # weights[i] read as each candidate is summed
            return sum(weights[i] * op(x) for i, op in enumerate(self._ops))
        if self.join == "inplace":  # accumulate into the first term, in place
            out = weights[0] * self._ops[0](x)
            for i in range(1, len(self._ops)):
                out.add_(weights[i] * self._ops[i](x))
            return out
        if self.join == "reduce":
            return functools.reduce(operator.add, [w * op(x) for w, op in zip(weights, self._ops)])
        raise ValueError(self.join)


class DartsCell(nn.Module):
    def __init__(self, steps, C_pp, C_p, C, make_ops, join="sum", node_sum="sum", residual=False):
        super().__init__()
        self.preprocess0 = ReLUConvBN(C_pp, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        self._steps = steps
        self.node_sum = node_sum
        self.residual = residual
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                self._ops.append(MixedOp(C, make_ops, join))

    def forward(self, s0, s1, weights):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            if self.node_sum == "sum":
                s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            else:  # "loop": s = s + t, as some re-implementations write the node sum
                s = self._ops[offset](states[0], weights[offset])
                for j in range(1, len(states)):
                    s = s + self._ops[offset + j](states[j], weights[offset + j])
            if self.residual:
                s = s + states[-1]
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._steps:], dim=1)


class DartsNetwork(nn.Module):
    """DARTS ``Network`` (search): stem, a few normal cells, global pooling, classifier."""

    def __init__(self, C=4, num_classes=5, layers=2, steps=2, make_ops=(), join="sum", node_sum="sum",
                 residual=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self._steps = steps
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        C_pp, C_p = C, C
        self.cells = nn.ModuleList()
        for _ in range(layers):
            cell = DartsCell(steps, C_pp, C_p, C, make_ops, join, node_sum, residual)
            self.cells.append(cell)
            C_pp, C_p = C_p, steps * C
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        k = sum(2 + i for i in range(steps))
        self.alphas_normal = (1e-3 * torch.randn(k, len(make_ops))).requires_grad_(True)
        self._arch_parameters = [self.alphas_normal]

    def arch_parameters(self):
        return self._arch_parameters

    def forward(self, input):
        s0 = s1 = self.stem(input)
        weights = F.softmax(self.alphas_normal, dim=-1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))


# ---------------------------------------------------------------------------------------------
# xautodl NAS-Bench-201 search cell (ModuleDict edges; nn.Parameter alphas)
# ---------------------------------------------------------------------------------------------
class NB201Cell(nn.Module):
    def __init__(self, C, max_nodes, make_ops):
        super().__init__()
        self.edges = nn.ModuleDict()
        self.max_nodes = max_nodes
        for i in range(1, max_nodes):
            for j in range(i):
                key = "{:}<-{:}".format(i, j)
                self.edges[key] = nn.ModuleList(make(C) for make in make_ops)
        self.edge_keys = sorted(self.edges.keys())
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}

    def forward(self, inputs, weightss):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                inter_nodes.append(sum(layer(nodes[j]) * w for layer, w in zip(self.edges[node_str], weights)))
            nodes.append(sum(inter_nodes))
        return nodes[-1]


class NB201Network(nn.Module):
    """xautodl ``TinyNetworkDarts`` in miniature: stem, search cells, lastact, classifier."""

    def __init__(self, C=8, num_classes=5, cells=1, max_nodes=4, make_ops=(), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList(NB201Cell(C, max_nodes, make_ops) for _ in range(cells))
        self.lastact = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C, num_classes)
        n_edges = len(self.cells[0].edges)
        self.arch_parameters = nn.Parameter(1e-3 * torch.randn(n_edges, len(make_ops)))

    def get_alphas(self):
        return [self.arch_parameters]

    def forward(self, inputs):
        alphas = F.softmax(self.arch_parameters, dim=-1)
        feature = self.stem(inputs)
        for cell in self.cells:
            feature = cell(feature, alphas)
        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.view(out.size(0), -1)
        return out, self.classifier(out)


# ---------------------------------------------------------------------------------------------
# ProxylessNAS / FBNet: MBConv candidates of several expansion ratios
# ---------------------------------------------------------------------------------------------
class MBInvertedConvLayer(nn.Module):
    """Inverted residual without the skip: 1x1 expand (omitted at ratio 1) -> kxk depthwise -> 1x1 project."""

    def __init__(self, C_in, C_out, kernel_size=3, expand_ratio=6):
        super().__init__()
        mid = C_in * expand_ratio
        self.expand_ratio = expand_ratio
        if expand_ratio > 1:
            self.inverted_bottleneck = nn.Sequential(
                nn.Conv2d(C_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True))
        self.depth_conv = nn.Sequential(
            nn.Conv2d(mid, mid, kernel_size, padding=kernel_size // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU6(inplace=True))
        self.point_linear = nn.Sequential(nn.Conv2d(mid, C_out, 1, bias=False), nn.BatchNorm2d(C_out))

    def forward(self, x):
        if self.expand_ratio > 1:
            x = self.inverted_bottleneck(x)
        x = self.depth_conv(x)
        return self.point_linear(x)


class Bottleneck(nn.Module):
    """ResNet-style bottleneck candidate with a 2C middle: ReLU -> 1x1 (C->2C) -> BN -> ReLU -> 3x3 (2C->C) -> BN."""

    def __init__(self, C):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False), nn.Conv2d(C, 2 * C, 1, bias=False), nn.BatchNorm2d(2 * C),
            nn.ReLU(inplace=False), nn.Conv2d(2 * C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))

    def forward(self, x):
        return self.op(x)


class ProxylessMixedEdge(nn.Module):
    def __init__(self, candidate_ops):
        super().__init__()
        self.candidate_ops = nn.ModuleList(candidate_ops)

    def forward(self, x, probs):
        return sum(p * op(x) for p, op in zip(probs, self.candidate_ops))


class ProxylessSuperNet(nn.Module):
    """ProxylessNAS/FBNet-style chain of mixed blocks with a residual ``x + mixed(x)`` (FBNet's
    ``skip`` is the residual here); ``arch_parameters()`` yields one ``AP_path_alpha`` per block."""

    def __init__(self, C=4, blocks=2, num_classes=5, make_ops=(), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.first_conv = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU6())
        self.blocks = nn.ModuleList(ProxylessMixedEdge([make(C) for make in make_ops]) for _ in range(blocks))
        self.AP_path_alpha = nn.ParameterList(
            nn.Parameter(1e-3 * torch.randn(len(make_ops))) for _ in range(blocks))
        self.global_avg_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C, num_classes)

    def arch_parameters(self):
        return list(self.AP_path_alpha)

    def forward(self, x):
        x = self.first_conv(x)
        for block, alpha in zip(self.blocks, self.AP_path_alpha):
            x = x + block(x, F.softmax(alpha, dim=-1))
        x = self.global_avg_pooling(x).flatten(1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------
# SNAS: Gumbel-softmax with hand-written noise, DARTS-style cells
# ---------------------------------------------------------------------------------------------
class SNASNetwork(DartsNetwork):
    """SNAS search network: weights are a Gumbel-softmax sample drawn in forward from ``uniform_``
    noise, ``-log(-log(U))``, at temperature ``self.temp``."""

    def __init__(self, *args, temp=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.temp = temp
        self.alphas_normal = nn.Parameter(self.alphas_normal.detach().clone())
        self._arch_parameters = [self.alphas_normal]

    def _gumbel_softmax(self, logits):
        u = torch.empty_like(logits).uniform_(1e-6, 1.0 - 1e-6)
        g = -torch.log(-torch.log(u))
        return F.softmax((logits + g) / self.temp, dim=-1)

    def forward(self, input):
        s0 = s1 = self.stem(input)
        weights = self._gumbel_softmax(self.alphas_normal)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))


# ---------------------------------------------------------------------------------------------
# candidate factories
# ---------------------------------------------------------------------------------------------
def conv(k, padding_mode="zeros", bn_momentum=0.1):
    return lambda C: ReLUConvBN(C, C, k, 1, k // 2, affine=False, padding_mode=padding_mode, bn_momentum=bn_momentum)


def sep(k):
    return lambda C: SepConv(C, C, k, 1, k // 2, affine=False)


def pool(kind="avg"):
    if kind == "avg":
        return lambda C: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    return lambda C: nn.MaxPool2d(3, stride=1, padding=1)


skip = lambda C: Identity()  # noqa: E731
zero = lambda C: Zero(1)  # noqa: E731


def with_drop_path(make, p=0.3):
    return lambda C: DropPathOp(make(C), p)


def mbconv(e, k=3):
    return lambda C: MBInvertedConvLayer(C, C, k, e)


bottleneck = Bottleneck


class DartsNetworkShapeGuard(DartsNetwork):
    """DARTS search network as re-implementations write it when cells may change resolution: the
    forward checks the two states' spatial sizes and pools the older one when they disagree
    (``if s0.size(2) != s1.size(2)``), a Python decision on shapes only."""

    def forward(self, input):
        s0 = s1 = self.stem(input)
        weights = F.softmax(self.alphas_normal, dim=-1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights)
            if s0.size(2) != s1.size(2):
                s0 = F.avg_pool2d(s0, 2)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))
