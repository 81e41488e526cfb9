"""Hypothesis strategy drawing small random one-shot NAS supernets as plain ``nn.Module``s.

Why: the rewrites must hold for *any* supernet written in the usual styles, not just the zoo. This
generator uses none of topofx's capture or rewrite code: it writes models the way a user would, with
random cell DAGs, random candidate sets per edge and random code styles, so that property tests can
check capture + rewrite against the eager model. Only plain building blocks that are identical to
the zoo's (``ReLUConvBN``, ``Identity``, ``Zero``) come from :mod:`topofx.zoo.operations`.

What is random (see :func:`supernets`):

* 1-2 cells, optionally one of them a reduction cell (stride 2 on the edges leaving the cell input;
  skip becomes a FactorizedReduce-like block, zero becomes a strided slice times zero);
* per cell: 2-4 intermediate nodes, each summing the edges from a random nonempty subset of the
  earlier nodes; the cell outputs the concatenation of the nodes nobody consumes, or just the last
  node (possibly leaving dead nodes);
* per edge: a random nonempty subset of candidates: ReLU-Conv-BN (k=1/3/5), separable conv
  (depthwise + pointwise, 1 or 2 stages), dilated conv, avg/max pool with or without a following
  BN, skip, zero (``x.mul(0.)``); per candidate: affine, track_running_stats, conv bias;
* channel counts 4-12 (the stem and every cell);
* architecture weights stored as ``nn.Parameter`` or as plain ``requires_grad`` tensor attributes,
  one tensor per edge or one flat tensor sliced per edge; softmaxed in ``forward``; joined with
  ``sum(w * op(x) ...)`` or ``sum(op(x) * w ...)``.

Every model has ``arch_parameters()`` and a ``spec`` attribute (a plain dict describing what was
drawn, shown by ``repr``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from topofx.zoo.operations import Identity, ReLUConvBN, Zero

__all__ = ["supernets", "build_supernet", "CANDIDATE_KINDS"]

CANDIDATE_KINDS = [
    "conv_1", "conv_3", "conv_5",
    "sep_1stage", "sep_2stage",
    "dil",
    "avg_pool", "avg_pool_bn", "max_pool", "max_pool_bn",
    "skip", "zero",
]


# ---------------------------------------------------------------------------------------------
# candidate operations
# ---------------------------------------------------------------------------------------------
def _bn(C: int, o: Dict[str, Any]) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(C, affine=o["affine"], track_running_stats=o["track"])


class SepConv(nn.Module):
    def __init__(self, C: int, k: int, stride: int, stages: int, o: Dict[str, Any]):
        super().__init__()
        layers: List[nn.Module] = []
        for s in range(stages):
            layers += [
                nn.ReLU(inplace=False),
                nn.Conv2d(C, C, k, stride=stride if s == 0 else 1, padding=k // 2, groups=C,
                          bias=False),
                nn.Conv2d(C, C, 1, bias=o["bias"]),
                _bn(C, o),
            ]
        self.op = nn.Sequential(*layers)

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, C: int, k: int, stride: int, o: Dict[str, Any]):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.dw = nn.Conv2d(C, C, k, stride=stride, padding=2 * (k // 2), dilation=2, groups=C,
                            bias=False)
        self.pw = nn.Conv2d(C, C, 1, bias=o["bias"])
        self.bn = _bn(C, o)

    def forward(self, x):
        return self.bn(self.pw(self.dw(self.relu(x))))


class FactorizedReduce(nn.Module):
    def __init__(self, C: int, o: Dict[str, Any]):
        super().__init__()
        C1 = C // 2
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C, C1, 1, stride=2, bias=o["bias"])
        self.conv_2 = nn.Conv2d(C, C - C1, 1, stride=2, bias=o["bias"])
        self.bn = _bn(C, o)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def make_candidate(kind: str, C: int, stride: int, o: Dict[str, Any]) -> nn.Module:
    if kind.startswith("conv_"):
        k = int(kind[-1])
        return ReLUConvBN(C, C, k, stride, k // 2, affine=o["affine"],
                          track_running_stats=o["track"], bias=o["bias"])
    if kind == "sep_1stage":
        return SepConv(C, o["k"], stride, 1, o)
    if kind == "sep_2stage":
        return SepConv(C, o["k"], stride, 2, o)
    if kind == "dil":
        return DilConv(C, o["k"], stride, o)
    if "pool" in kind:
        pool = (nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
                if kind.startswith("avg") else nn.MaxPool2d(3, stride=stride, padding=1))
        return nn.Sequential(pool, _bn(C, o)) if kind.endswith("_bn") else pool
    if kind == "skip":
        return Identity() if stride == 1 else FactorizedReduce(C, o)
    if kind == "zero":
        return Zero(stride)
    raise KeyError(kind)


# ---------------------------------------------------------------------------------------------
# edges, cells, network
# ---------------------------------------------------------------------------------------------
class MixedEdge(nn.Module):
    def __init__(self, C: int, stride: int, candidates: List[Dict[str, Any]], w_first: bool):
        super().__init__()
        self._ops = nn.ModuleList(make_candidate(c["kind"], C, stride, c) for c in candidates)
        self.w_first = w_first

    def forward(self, x, weights):
        if self.w_first:
            return sum(w * op(x) for w, op in zip(weights, self._ops))
        return sum(op(x) * w for w, op in zip(weights, self._ops))


class RandomCell(nn.Module):
    def __init__(self, C_in: int, spec: Dict[str, Any], w_first: bool):
        super().__init__()
        C = spec["C"]
        self.reduction = spec["reduction"]
        if spec["preprocess"]:
            self.preprocess = nn.Sequential(nn.ReLU(inplace=False),
                                            nn.Conv2d(C_in, C, 1, bias=False),
                                            nn.BatchNorm2d(C, affine=False))
        else:
            self.preprocess = Identity()
        self.inputs: List[List[int]] = [list(n["inputs"]) for n in spec["nodes"]]
        self.outputs: List[int] = list(spec["outputs"])
        self.edges = nn.ModuleList()
        for node in spec["nodes"]:
            for j, cands in zip(node["inputs"], node["candidates"]):
                stride = 2 if (self.reduction and j == 0) else 1
                self.edges.append(MixedEdge(C, stride, cands, w_first))
        self.out_channels = C * len(self.outputs)

    def forward(self, x, weights: List[torch.Tensor]):
        states = [self.preprocess(x)]
        e = 0
        for inputs in self.inputs:
            s = 0
            for j in inputs:
                s = s + self.edges[e](states[j], weights[e])
                e += 1
            states.append(s)
        if len(self.outputs) == 1:
            return states[self.outputs[0]]
        return torch.cat([states[i] for i in self.outputs], dim=1)


class RandomSupernet(nn.Module):
    def __init__(self, spec: Dict[str, Any]):
        super().__init__()
        self.spec = spec
        C_stem = spec["C_stem"]
        self.stem = nn.Sequential(nn.Conv2d(3, C_stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_stem))
        self.cells = nn.ModuleList()
        C_prev = C_stem
        sizes: List[int] = []
        for cs in spec["cells"]:
            cell = RandomCell(C_prev, cs, spec["w_first"])
            self.cells.append(cell)
            C_prev = cell.out_channels
            sizes += [len(c) for n in cs["nodes"] for c in n["candidates"]]
        self._edge_sizes = sizes
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, spec["num_classes"])

        init = [1e-1 * torch.randn(k) for k in sizes]
        self._flat = spec["arch_layout"] == "flat"
        as_param = spec["arch_storage"] == "parameter"
        if self._flat:
            flat = torch.cat(init)
            self.alphas = nn.Parameter(flat) if as_param else flat.requires_grad_()
            self._arch_parameters = [self.alphas]
        else:
            self._arch_parameters = []
            for i, a in enumerate(init):
                t = nn.Parameter(a) if as_param else a.requires_grad_()
                setattr(self, f"alpha_{i}", t)
                self._arch_parameters.append(t)

    def arch_parameters(self) -> List[torch.Tensor]:
        return self._arch_parameters

    def _edge_weights(self) -> List[torch.Tensor]:
        if self._flat:
            out, start = [], 0
            for k in self._edge_sizes:
                out.append(F.softmax(self.alphas[start:start + k], dim=-1))
                start += k
            return out
        return [F.softmax(getattr(self, f"alpha_{i}"), dim=-1)
                for i in range(len(self._edge_sizes))]

    def forward(self, x):
        weights = self._edge_weights()
        h = self.stem(x)
        e = 0
        for cell in self.cells:
            n = len(cell.edges)
            h = cell(h, weights[e:e + n])
            e += n
        out = self.global_pooling(h)
        return self.classifier(out.flatten(1))

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


def build_supernet(spec: Dict[str, Any]) -> Tuple[nn.Module, torch.Tensor]:
    """Build the model and example input described by a drawn ``spec`` (deterministic)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = RandomSupernet(spec)
        x = torch.randn(spec["batch"], 3, spec["size"], spec["size"])
    model.train()
    return model, x


# ---------------------------------------------------------------------------------------------
# strategy
# ---------------------------------------------------------------------------------------------
@st.composite
def _candidate(draw, kind: str) -> Dict[str, Any]:
    return {
        "kind": kind,
        "k": draw(st.sampled_from([3, 5])),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "bias": draw(st.booleans()),
    }


@st.composite
def _cell_spec(draw, reduction: bool) -> Dict[str, Any]:
    C = draw(st.integers(4, 12))
    n_nodes = draw(st.integers(2, 4))
    nodes = []
    for i in range(1, n_nodes + 1):
        inputs = sorted(draw(st.sets(st.integers(0, i - 1), min_size=1, max_size=i)))
        candidates = []
        for _ in inputs:
            kinds = draw(st.lists(st.sampled_from(CANDIDATE_KINDS), min_size=1, max_size=5,
                                  unique=True))
            candidates.append([draw(_candidate(k)) for k in kinds])
        nodes.append({"inputs": inputs, "candidates": candidates})
    consumed = {j for n in nodes for j in n["inputs"]}
    if draw(st.booleans()):
        outputs = [i for i in range(1, n_nodes + 1) if i not in consumed]
    else:
        outputs = [n_nodes]
    return {"C": C, "reduction": reduction, "nodes": nodes, "outputs": outputs,
            "preprocess": True}


@st.composite
def supernet_specs(draw) -> Dict[str, Any]:
    """The plain-data description of a random supernet (see the module docstring)."""
    n_cells = draw(st.integers(1, 2))
    reduce_at = draw(st.sampled_from([None] + list(range(n_cells))))
    C_stem = draw(st.integers(4, 12))
    cells = []
    C_prev = C_stem
    for i in range(n_cells):
        cs = draw(_cell_spec(reduction=(i == reduce_at)))
        # the cell input feeds the edges directly when channels already agree, sometimes
        cs["preprocess"] = C_prev != cs["C"] or draw(st.booleans())
        cells.append(cs)
        C_prev = cs["C"] * len(cs["outputs"])
    return {
        "seed": draw(st.integers(0, 2 ** 31 - 1)),
        "batch": draw(st.integers(2, 4)),
        "size": 8,
        "C_stem": C_stem,
        "cells": cells,
        "num_classes": draw(st.integers(2, 10)),
        "arch_storage": draw(st.sampled_from(["parameter", "tensor"])),
        "arch_layout": draw(st.sampled_from(["per_edge", "flat"])),
        "w_first": draw(st.booleans()),
    }


def supernets() -> st.SearchStrategy[Tuple[nn.Module, torch.Tensor]]:
    """Strategy for ``(model, example_input)``: a random small supernet in train mode."""
    return supernet_specs().map(build_supernet)
