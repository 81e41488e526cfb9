"""Style fuzzer: random small supernets written as *Python source* in the coding styles of public NAS
codebases, checked against topofx's contracts.

Why: the zoo and the hypothesis strategy in the tests write supernets one way.  Users' search scripts
write the same ``sum_k w_k * op_k(x)`` in many ways -- DARTS's ``zip``-sum with plain-tensor alphas,
PC-DARTS's partial channels and edge betas, xautodl's ``ModuleDict`` cells keyed ``'1<-0'``, SNAS's
hand-written Gumbel, ProxylessNAS/FBNet layer-wise choices of inverted bottlenecks, DARTS-PT's
projected weights, joins over stacked candidates (NNI's ``torch.sum(torch.stack(outs) * w.view(-1, 1, 1,
1, 1), 0)``, with a zero weight slice; einsum, tensordot, matmul, stacked first or last; ``JOIN_FORMS``)
or in-place accumulation, float64 models, drop-path draws in forward.
Every generated model is a module text written to a temporary file and imported, so the tracer sees
real user source lines, and a failing model is its own standalone reproducer.

Contracts checked (per model, per mode):

* ``exact``: :func:`topofx.testing.train_step_equivalence` of ``simplify(model, x, mode="exact")``
  against the original (outputs, every weight's and architecture parameter's gradient, BN buffers;
  rtol 1e-5).  Gradients outside it in float32 are compared again on float64 copies of both, at the
  same 1e-5 (:func:`topofx.selfcheck.mismatch`): through batch norms of tiny batches float32
  rounding of another (equally exact) summation order can reach 1e-2, a wrong gradient stays wrong;
  where the original's own gradient jumps (a kink's input exactly at it, e.g. a ReLU after a batch
  norm of a sample drop-path zeroed), other draws judge it.
* ``topo``: the simplified module runs forward+backward at the model's own (mixed) weights; at a
  one-hot vertex (set by the generated ``set_vertex``; skipped for weight kinds that cannot be
  one-hot, e.g. Dirichlet) the train-mode output equals the original's within 1e-5
  (``vertex_output``) and so do the weight gradients (``vertex_weight_grad``, its own category; judged
  as the exact contract's).
  A join written other than as ``zipsum``'s ``+`` chain (conditional joins aside) finds as many mixed
  edges and makes as many floating merges as the same model written with ``zipsum`` (``missed``).

* between steps (models drawn with a capture-v2 dimension that asks for it, :data:`_BETWEEN_STEPS`):
  the check changes what a training loop changes -- the generated ``step_schedule()`` decays a Python
  float read from outside the modules' attributes (a module-level scheduler object, a global dict, a
  closure over a config object, a class attribute), ``drop_candidate(model)`` sets a candidate to
  ``None``, ``new_epoch_alphas(model)`` replaces a tensor in a list of architecture tensors -- and
  compares again at the model's own weights: ``exact`` one train step against the changed original,
  ``topo`` the output against a fresh topo simplify of the changed model (key
  ``<mode>: after <change>: <category>``); a value the graph froze would otherwise go unnoticed.

The capture-v2 dimensions (:data:`V2_DIMENSIONS`: custom ``torch.autograd.Function``s with their own
backward, one of them given closures made in forward over the candidates, the scheduled floats above, ``isinstance``/``torch.is_tensor``/``assert``/``Variable`` in
forward, alphas in Python lists, candidates set to ``None``) are drawn from a random stream of their
own, so every seed keeps the values it drew before on all the other dimensions; ``--v1`` leaves them
out and gives back the models the seeds gave before.  A value added later takes a share of the value it
refines, from a stream of its own (:data:`_REFINEMENTS`): the other seeds keep their models.

Outcomes: ``ok`` (captured, ran its graph, equivalent), ``refused`` (fell back to the eager forward:
no graph, or the graph was not used for the call; the warning text is recorded), ``silent`` (the
graph ran and differs -- warnings, if any, are recorded but do not excuse a mismatch), ``missed`` (topo:
the join's mixed edges were not all found or merged as the ``+`` chain's are), ``crash``
(an exception from ``simplify`` or from running the simplified module, a timeout included), and
``invalid`` (the generated model itself does not run: a fuzzer bug).

Command line::

    topofx fuzz --n 1000 --seed 0 [--mode exact,topo] [--out fuzz-failures] [--jobs 2] [--timeout 60] [--v1]
    python -m topofx.fuzz ...
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import multiprocessing
import pprint
import random
import re
import signal
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

__all__ = [
    "DIMENSIONS", "JOIN_FORMS", "OP_POOL", "CHAIN_OPS", "Outcome", "Summary",
    "generate", "render", "build", "check", "check_spec", "minimize", "run", "main",
]

MODES = ("exact", "topo")
VERTEX_RTOL = 1e-5

# ---------------------------------------------------------------------------------------------
# style dimensions
# ---------------------------------------------------------------------------------------------
#: Each model draws one value per dimension (``ops`` is a set drawn from the cell kind's pool).
DIMENSIONS: dict[str, tuple[str, ...]] = {
    # which codebase's idioms: decides the cell kind and the naming / construction idioms
    "flavor": ("darts", "pcdarts", "pdarts", "darts_pt", "snas", "nb201", "proxyless", "fbnet"),
    # how a mixed edge joins its candidates
    "join": ("zipsum", "index", "unbind", "loop", "reduce", "add_", "stack_view", "einsum",
             "tensordot", "matmul", "cond_ne", "cond_gt"),
    # how architecture weights derive from the architecture parameters
    "weights": ("softmax", "softmax_temp", "sigmoid", "gumbel_soft", "gumbel_hard", "gumbel_manual",
                "relu_norm", "dirichlet"),
    # where the weights are computed: the network's forward, each cell, each mixed op
    "where": ("network", "cell", "mixed"),
    # how the architecture parameters are stored
    "storage": ("parameter", "tensor", "paramlist"),
    # the container of an edge's candidates
    "container": ("modulelist", "moduledict"),
    "dtype": ("float32", "float64"),
    # random draws in forward: DARTS drop_path (bernoulli_, in place) or P-DARTS dropout after skips
    "drop": ("none", "drop_path", "dropout"),
    # the candidates' batch norms
    "bn": ("no_affine", "affine", "no_track"),
}

#: The forms a join style is written in (``spec["join_form"]``; the first is the style's default): NNI's
#: ``torch.sum(torch.stack(outs) * w.view(-1, 1, 1, 1, 1), 0)``, with a zero weight slice for a zero
#: output appended, candidates stacked last and reduced there, ``torch.add(..., alpha=)``.  Drawn from a
#: stream of its own, so that every other draw of a seed stays what it was.
JOIN_FORMS: dict[str, tuple[str, ...]] = {
    "stack_view": ("mul_sum", "torch_sum", "zero_pad", "stack_last", "stacked_terms"),
    "einsum": ("stack_first", "stack_last"),
    "tensordot": ("stack_first", "stack_last"),
    "matmul": ("flat", "stack_last"),
    "add_": ("add_", "add_alpha"),
}

CELL_OF_FLAVOR = {"darts": "darts", "pcdarts": "darts", "pdarts": "darts", "darts_pt": "darts",
                  "snas": "darts", "nb201": "nb201", "proxyless": "chain", "fbnet": "chain"}
DEFAULT_FLAVOR = {"darts": "darts", "nb201": "nb201", "chain": "fbnet"}
DEFAULTS = {"join": "zipsum", "weights": "softmax", "where": "network", "storage": "parameter",
            "container": "modulelist", "dtype": "float32", "drop": "none", "bn": "no_affine"}

#: Candidates of DARTS-space and NAS-Bench-201 cells (``C -> C``, stride 1 or 2).
OP_POOL = ("none", "skip_connect", "avg_pool_3x3", "max_pool_3x3", "conv_1x1", "conv_3x3", "conv_5x5",
           "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7",
           "grouped_conv_3x3", "bottleneck_3x3", "conv_3x3_reflect", "conv_3x3_replicate",
           "conv_3x3_circular", "conv_3x3_in", "conv_3x3_gn")
#: Candidates of ProxylessNAS/FBNet layer-wise choices (``C_in -> C_out``): inverted bottlenecks.
CHAIN_OPS = ("mb_e1_k3", "mb_e1_k5", "mb_e3_k3", "mb_e3_k5", "mb_e6_k3", "mb_e6_k5")

_ALPHA_NAMES = {"snas": ("log_alphas_normal", "log_alphas_reduce")}

#: Constructs of capture v2 (issue 22), drawn from a random stream of their own (:func:`_draw_v2`): the
#: dimensions above keep, for every seed, the values they had before these were added.
V2_DIMENSIONS: dict[str, tuple[str, ...]] = {
    # a user's torch.autograd.Function with a backward of its own: a straight-through hard one-hot on
    # the weights, a ProxylessNAS-style binary gate joining the candidates (every weight gets
    # <grad, out_k>), a straight-through clamp on the conv candidates' outputs; ``closure_gate``: the
    # binary gate as ProxylessNAS's full_v2 writes it, given closures made in forward over the
    # candidates' container (one runs the kept path, the backward's runs every candidate again);
    # ``ste_indexed``: the hard one-hot written with a Python index per row (``int(row.argmax())``), a
    # forward with no meta run
    "function": ("none", "ste_weights", "binary_gate", "ste_candidate", "closure_gate", "ste_indexed"),
    # a Python float outside the modules' own attributes scales each mixed edge's output; the check
    # changes it between steps (the generated ``step_schedule``)
    # (``aliased_object``: the scheduler read through a local, ``schedule = scheduler``)
    "scalar": ("none", "module_object", "global_dict", "closure", "class_attr", "type_attr", "aliased_object"),
    # type checks and legacy wrappers on traced values in the mixed edge's forward
    "typecheck": ("none", "isinstance", "is_tensor", "assert_or", "variable"),
    # architecture tensors in a plain Python list: one row per edge, appended in __init__ and stacked
    # in forward (storage parameter/tensor), or the groups themselves (storage paramlist); "replaced":
    # the check also replaces an element between steps (the generated ``new_epoch_alphas``)
    "alpha_list": ("none", "list", "replaced"),
    # the training loop sets a candidate to None between steps and forward skips it (the generated
    # ``drop_candidate``)
    "drop_candidate": ("none", "last"),
    # a coin drawn in each edge's forward from a generator outside torch (drop-path style: the output
    # halved on heads): ``random.random()``, a function imported by name before capture (``from random
    # import random as coin``; NumPy's ``rand``), a ``random.Random`` object of the edge's own
    "host_draw": ("none", "module_function", "bound_name", "numpy_bound", "own_generator"),
}
#: Relative weights of the values.  A change between steps costs a capture anew (topo: two), about a
#: model's whole check: those values are rarer, so that a run (and the CI sample) takes about as long
#: as before; the others cost nothing measurable.
_V2_WEIGHTS = {"function": (10, 2, 2, 2), "scalar": (50, 1, 1, 1, 1, 1, 1), "typecheck": (10, 1, 1, 1, 1),
               "alpha_list": (16, 3, 1), "drop_candidate": (30, 1), "host_draw": (40, 1, 1, 1, 1)}
#: Values added after seeds' models were relied on (reproducers, the CI sample): each takes a share of the
#: draws of the value it refines, from a stream of its own, so that every other seed keeps its model.
_REFINEMENTS = {"closure_gate": ("function", "binary_gate", 0.5), "ste_indexed": ("function", "ste_weights", 0.5)}
V2_DEFAULTS = {dim: values[0] for dim, values in V2_DIMENSIONS.items()}
DEFAULTS.update(V2_DEFAULTS)  # the minimizer's shrink targets
#: Changes the check makes between steps: (dimension, the values that ask for it, the generated hook).
_BETWEEN_STEPS = (("scalar", V2_DIMENSIONS["scalar"][1:], "step_schedule"),
                  ("drop_candidate", ("last",), "drop_candidate"),
                  ("alpha_list", ("replaced",), "new_epoch_alphas"))


def _hooks(spec: dict[str, Any]) -> list[str]:
    """The changes between steps that ``spec`` asks for, in the order the check makes them."""
    return [hook for dim, values, hook in _BETWEEN_STEPS if spec.get(dim, "none") in values]


# ---------------------------------------------------------------------------------------------
# drawing a spec
# ---------------------------------------------------------------------------------------------
def _draw_spec(seed: int, v2: bool = True) -> dict[str, Any]:
    """A random style and size: plain data, so that it can be shrunk and rendered again.

    ``v2=False``: without the capture-v2 constructs (every :data:`V2_DIMENSIONS` value ``"none"``),
    the model the seed gave before they were added."""
    spec = _draw_v1(seed)
    spec.update(_draw_v2(seed, spec) if v2 else V2_DEFAULTS)
    return spec


def _draw_v2(seed: int, spec: dict[str, Any]) -> dict[str, str]:
    """The capture-v2 dimensions of model ``seed``, from a stream of their own (the other dimensions'
    draws are untouched); a few combinations whose eager model cannot run are not drawn."""
    rng = random.Random(f"capture-v2:{seed}")
    out = {dim: rng.choices([v for v in values if v not in _REFINEMENTS], _V2_WEIGHTS[dim])[0]
           for dim, values in V2_DIMENSIONS.items()}
    refine = random.Random(f"capture-v2-refinements:{seed}")
    for value, (dim, refined, share) in _REFINEMENTS.items():
        if out[dim] == refined and refine.random() < share:
            out[dim] = value
    hard = spec["weights"] == "gumbel_hard" or out["function"] in ("ste_weights", "ste_indexed")
    if out["function"] in ("binary_gate", "closure_gate") or (hard and spec["join"] in ("cond_ne", "cond_gt")):
        # the binary gate takes every candidate; a hard-weighted conditional join whose only selected
        # candidate was dropped would sum nothing (0, not a tensor) and the eager model fails
        out["drop_candidate"] = "none"
    return out


def _draw_v1(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    spec: dict[str, Any] = {"seed": seed}
    for dim, values in DIMENSIONS.items():
        spec[dim] = rng.choice(values)
    if spec["join"] in JOIN_FORMS:
        spec["join_form"] = random.Random(f"{seed}:join_form").choice(JOIN_FORMS[spec["join"]])
    cell = CELL_OF_FLAVOR[spec["flavor"]]
    spec["cell"] = cell
    spec["C"] = rng.choice((4, 8))
    if cell == "chain":
        spec["ops"] = sorted(rng.sample(CHAIN_OPS, rng.randint(2, 4)), key=CHAIN_OPS.index)
        spec["stem"] = spec["C"]
        widths = [spec["C"]]
        layers = []
        for _ in range(rng.randint(2, 3)):
            c_out = rng.choice((widths[-1], 2 * widths[-1] if widths[-1] < 16 else widths[-1]))
            stride = rng.choice((1, 1, 2)) if len(layers) < 2 else 1
            layers.append([c_out, stride])
            widths.append(c_out)
        spec["layers"] = layers
        spec["where"] = spec["where"] if spec["where"] != "cell" else "network"
        return spec
    spec["ops"] = sorted(rng.sample(OP_POOL, rng.randint(2, 5)), key=OP_POOL.index)
    spec["cells"] = rng.randint(1, 3) if cell == "nb201" else rng.choice((1, 2, 2))
    # NAS-Bench-201: a ResNet block before cell i; DARTS: cell i reduces (at least one normal cell)
    spec["reductions"] = sorted(rng.sample(range(1, spec["cells"]) if cell == "nb201" else range(spec["cells"]),
                                           rng.randint(0, spec["cells"] - 1)))
    if cell == "nb201":
        spec["nodes"] = rng.randint(3, 4)
    else:
        spec["steps"] = rng.randint(1, 3)
    if spec["flavor"] == "darts_pt":
        spec["where"] = "network"  # DARTS-PT writes projected rows into the network's weights
        n_edges = sum(2 + i for i in range(spec["steps"]))
        spec["projected"] = [[rng.randrange(n_edges), rng.randrange(len(spec["ops"]))]]
    return spec


def generate(seed: int, v2: bool = True) -> tuple[str, dict[str, Any]]:
    """``(source, spec)`` of the random supernet number ``seed``: its module text and what was drawn
    (``v2=False``: without the capture-v2 constructs, the model the seed gave before them)."""
    spec = _draw_spec(seed, v2)
    return render(spec), spec


# ---------------------------------------------------------------------------------------------
# rendering a spec as Python source
# ---------------------------------------------------------------------------------------------
def _bn_args(spec: dict[str, Any]) -> str:
    return {"no_affine": "affine=False", "affine": "affine=True",
            "no_track": "affine=False, track_running_stats=False"}[spec["bn"]]


def _op_classes(spec: dict[str, Any]) -> list[str]:
    """Definitions of the candidate operations the spec uses, written as DARTS/xautodl write them."""
    bn = _bn_args(spec)
    ops = set(spec["ops"])
    out: list[str] = []
    if spec["cell"] == "chain":
        out.append(f'''
class MBInvertedConvLayer(nn.Module):
    """ProxylessNAS-style inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project."""

    def __init__(self, C_in, C_out, kernel_size, stride, expand_ratio):
        super().__init__()
        mid = C_in * expand_ratio
        if expand_ratio > 1:
            self.inverted_bottleneck = nn.Sequential(OrderedDict([
                ('conv', nn.Conv2d(C_in, mid, 1, 1, 0, bias=False)),
                ('bn', nn.BatchNorm2d(mid, {bn})),
                ('act', nn.ReLU6(inplace=True)),
            ]))
        else:
            self.inverted_bottleneck = None
        self.depth_conv = nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(mid, mid, kernel_size, stride, kernel_size // 2, groups=mid, bias=False)),
            ('bn', nn.BatchNorm2d(mid, {bn})),
            ('act', nn.ReLU6(inplace=True)),
        ]))
        self.point_linear = nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(mid, C_out, 1, 1, 0, bias=False)),
            ('bn', nn.BatchNorm2d(C_out, {bn})),
        ]))

    def forward(self, x):
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        x = self.depth_conv(x)
        x = self.point_linear(x)
        return x
''')
        return out
    if ops & {"conv_1x1", "conv_3x3", "conv_5x5", "grouped_conv_3x3", "conv_3x3_reflect",
              "conv_3x3_replicate", "conv_3x3_circular"} or spec["cell"] == "darts" or spec["reductions"]:
        out.append(f'''
class ReLUConvBN(nn.Module):

    def __init__(self, C_in, C_out, kernel_size, stride, padding, groups=1, padding_mode='zeros'):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, groups=groups,
                      padding_mode=padding_mode, bias=False),
            nn.BatchNorm2d(C_out, {bn}),
        )

    def forward(self, x):
        return self.op(x)
''')
    if ops & {"dil_conv_3x3", "dil_conv_5x5"}:
        out.append(f'''
class DilConv(nn.Module):

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, {bn}),
        )

    def forward(self, x):
        return self.op(x)
''')
    if ops & {"sep_conv_3x3", "sep_conv_5x5"}:
        out.append(f'''
class SepConv(nn.Module):

    def __init__(self, C_in, C_out, kernel_size, stride, padding):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=stride, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, {bn}),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, {bn}),
        )

    def forward(self, x):
        return self.op(x)
''')
    if "bottleneck_3x3" in ops:
        out.append(f'''
class Bottleneck(nn.Module):
    """ReLU-conv1x1 up to a 2C middle, conv3x3 there, conv1x1 back down to C."""

    def __init__(self, C, stride):
        super().__init__()
        mid = 2 * C
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, mid, 1, bias=False),
            nn.BatchNorm2d(mid, {bn}),
            nn.ReLU(inplace=False),
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(mid, {bn}),
            nn.ReLU(inplace=False),
            nn.Conv2d(mid, C, 1, bias=False),
            nn.BatchNorm2d(C, {bn}),
        )

    def forward(self, x):
        return self.op(x)
''')
    out.append('''
class Identity(nn.Module):

    def forward(self, x):
        return x
''')
    if "none" in ops:
        out.append('''
class Zero(nn.Module):

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)
''')
    if spec["cell"] == "darts" or (spec["reductions"] and "skip_connect" in ops):
        out.append(f'''
class FactorizedReduce(nn.Module):

    def __init__(self, C_in, C_out):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, {bn})

    def forward(self, x):
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)
''')
    return out


_OP_LAMBDAS = {
    "none": "lambda C, stride: Zero(stride)",
    "skip_connect": "lambda C, stride: Identity() if stride == 1 else FactorizedReduce(C, C)",
    "avg_pool_3x3": "lambda C, stride: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)",
    "max_pool_3x3": "lambda C, stride: nn.MaxPool2d(3, stride=stride, padding=1)",
    "conv_1x1": "lambda C, stride: ReLUConvBN(C, C, 1, stride, 0)",
    "conv_3x3": "lambda C, stride: ReLUConvBN(C, C, 3, stride, 1)",
    "conv_5x5": "lambda C, stride: ReLUConvBN(C, C, 5, stride, 2)",
    "sep_conv_3x3": "lambda C, stride: SepConv(C, C, 3, stride, 1)",
    "sep_conv_5x5": "lambda C, stride: SepConv(C, C, 5, stride, 2)",
    "dil_conv_3x3": "lambda C, stride: DilConv(C, C, 3, stride, 2, 2)",
    "dil_conv_5x5": "lambda C, stride: DilConv(C, C, 5, stride, 4, 2)",
    "conv_7x1_1x7": "lambda C, stride: nn.Sequential(\n"
                    "        nn.ReLU(inplace=False),\n"
                    "        nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),\n"
                    "        nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),\n"
                    "        nn.BatchNorm2d(C, {bn}))",
    "grouped_conv_3x3": "lambda C, stride: ReLUConvBN(C, C, 3, stride, 1, groups=2)",
    "bottleneck_3x3": "lambda C, stride: Bottleneck(C, stride)",
    "conv_3x3_reflect": "lambda C, stride: ReLUConvBN(C, C, 3, stride, 1, padding_mode='reflect')",
    "conv_3x3_replicate": "lambda C, stride: ReLUConvBN(C, C, 3, stride, 1, padding_mode='replicate')",
    "conv_3x3_circular": "lambda C, stride: ReLUConvBN(C, C, 3, stride, 1, padding_mode='circular')",
    "conv_3x3_in": "lambda C, stride: nn.Sequential(\n"
                   "        nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride, 1, bias=False),\n"
                   "        nn.InstanceNorm2d(C, affine=True))",
    "conv_3x3_gn": "lambda C, stride: nn.Sequential(\n"
                   "        nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride, 1, bias=False),\n"
                   "        nn.GroupNorm(2, C))",
}

_CHAIN_LAMBDAS = {name: f"lambda C_in, C_out, stride: MBInvertedConvLayer(C_in, C_out, {name[-1]}, stride, "
                        f"{name.split('_')[1][1:]})" for name in CHAIN_OPS}


def _ops_table(spec: dict[str, Any]) -> list[str]:
    """``OPS = {...}`` for the pool the spec draws from (P-DARTS: the whole pool, switched)."""
    if spec["cell"] == "chain":
        names, table = spec["ops"], _CHAIN_LAMBDAS
    else:
        names = OP_POOL if spec["flavor"] == "pdarts" else spec["ops"]
        table = {k: v.replace("{bn}", _bn_args(spec)) for k, v in _OP_LAMBDAS.items()}
    lines = ["OPS = {"]
    lines += [f"    '{n}': {table[n]}," for n in names]
    lines.append("}")
    if spec["flavor"] == "pdarts":
        lines.append(f"PRIMITIVES = {list(OP_POOL)!r}".replace(", '", ",\n              '"))
        lines.append("# P-DARTS: the candidates this stage keeps")
        lines.append(f"SWITCH = [p in {tuple(spec['ops'])!r} for p in PRIMITIVES]")
    else:
        lines.append(f"PRIMITIVES = {list(spec['ops'])!r}")
    return lines


def _helpers(spec: dict[str, Any]) -> list[str]:
    """Module-level helper functions of the weight kind and the random draws in forward."""
    out: list[str] = []
    if spec["weights"] == "gumbel_manual":
        out.append('''
def gumbel_softmax_sample(logits, tau):
    """SNAS-style relaxed sample: softmax((logits + Gumbel noise) / tau), the noise from uniform draws."""
    u = torch.empty_like(logits).uniform_()
    gumbel = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    return F.softmax((logits + gumbel) / tau, dim=-1)
''')
    if spec["weights"] == "relu_norm":
        out.append('''
def normalized_relu(alpha):
    """Sparse weights: ReLU of the architecture parameters, normalized to sum to one."""
    w = F.relu(alpha)
    return w / w.sum(dim=-1, keepdim=True)
''')
    if spec["drop"] == "drop_path":
        out.append('''
def drop_path(x, drop_prob):
    if drop_prob > 0.:
        keep_prob = 1. - drop_prob
        mask = x.new_empty(x.size(0), 1, 1, 1).bernoulli_(keep_prob)
        x.div_(keep_prob)
        x.mul_(mask)
    return x


class DropPath(nn.Module):

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.training and self.drop_prob > 0.:
            x = drop_path(x, self.drop_prob)
        return x
''')
    if spec["flavor"] == "pcdarts":
        out.append('''
def channel_shuffle(x, groups):
    batchsize, num_channels, height, width = x.data.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, -1, height, width)
    return x
''')
    return out


def _weights_expr(spec: dict[str, Any], alpha: str) -> str:
    """The expression turning architecture parameters ``alpha`` into weights (``self.tau`` where used)."""
    expr = _soft_weights_expr(spec, alpha)
    return f"HardGate.apply({expr})" if _v2(spec, "function") in ("ste_weights", "ste_indexed") else expr


def _soft_weights_expr(spec: dict[str, Any], alpha: str) -> str:
    return {
        "softmax": f"F.softmax({alpha}, dim=-1)",
        "softmax_temp": f"F.softmax({alpha} / self.tau, dim=-1)",
        "sigmoid": f"torch.sigmoid({alpha})",
        "gumbel_soft": f"F.gumbel_softmax({alpha}, tau=self.tau, hard=False, dim=-1)",
        "gumbel_hard": f"F.gumbel_softmax({alpha}, tau=self.tau, hard=True, dim=-1)",
        "gumbel_manual": f"gumbel_softmax_sample({alpha}, self.tau)",
        "relu_norm": f"normalized_relu({alpha})",
        "dirichlet": f"torch.distributions.Dirichlet(F.elu({alpha}) + 1).rsample()",
    }[spec["weights"]]


def _tau_line(spec: dict[str, Any]) -> list[str]:
    tau = {"softmax_temp": "5.0", "gumbel_soft": "1.0", "gumbel_hard": "1.0", "gumbel_manual": "1.0"}
    return [f"        self.tau = {tau[spec['weights']]}"] if spec["weights"] in tau else []


def _join(spec: dict[str, Any], ops: str, x: str, w: str, out: str) -> list[str]:
    """Statements that set ``out`` to the weighted sum of the candidates ``ops`` applied to ``x``."""
    join = spec["join"]
    form = spec.get("join_form", JOIN_FORMS.get(join, ("",))[0])
    as_dict = spec["container"] == "moduledict"
    it = f"{ops}.values()" if as_dict else ops
    if _v2(spec, "function") == "binary_gate":
        return [f"{out} = BinaryGate.apply({w}, *[op({x}) for op in {it}])"]
    if _v2(spec, "function") == "closure_gate":
        return [f"{out} = ClosureGate.apply({x}, {w}, *gate_closures({ops}))"]
    if _v2(spec, "drop_candidate") != "none":
        return _join_skipping_none(spec, ops, x, w, out)
    stack = f"torch.stack([op({x}) for op in {it}]{', dim=-1' if form == 'stack_last' else ''})"
    if join == "zipsum":
        return [f"{out} = sum(w * op({x}) for w, op in zip({w}, {it}))"]
    if join == "index":
        if as_dict:
            return [f"{out} = sum({w}[i] * {ops}[name]({x}) for i, name in enumerate({ops}))"]
        return [f"{out} = sum({w}[i] * {ops}[i]({x}) for i in range(len({ops})))"]
    if join == "unbind":
        return [f"{out} = sum(w * op({x}) for w, op in zip({w}.unbind(-1), {it}))"]
    if join == "loop":
        return [f"{out} = 0", f"for w, op in zip({w}, {it}):", f"    {out} += w * op({x})"]
    if join == "reduce":
        return [f"{out} = functools.reduce(operator.add, [w * op({x}) for w, op in zip({w}, {it})])"]
    if join == "add_":
        seq = f"list({it})" if as_dict else ops
        accumulate = (f"{out} = torch.add({out}, {w}[k] * candidates[k]({x}), alpha=0.5)" if form == "add_alpha"
                      else f"{out}.add_({w}[k] * candidates[k]({x}))")
        return [f"candidates = {seq}", f"{out} = {w}[0] * candidates[0]({x})",
                "for k in range(1, len(candidates)):", f"    {accumulate}"]
    if join == "stack_view":
        return {
            "mul_sum": [f"outs = {stack}", f"{out} = outs.mul({w}.view(-1, 1, 1, 1, 1)).sum(0)"],
            "torch_sum": [f"outs = {stack}", f"{out} = torch.sum(outs * {w}.view(-1, 1, 1, 1, 1), 0)"],
            "zero_pad": [f"outs = [op({x}) for op in {it}]", "outs.append(torch.zeros_like(outs[0]))",
                         f"padded = torch.cat([{w}, {w}.new_zeros(1)])",
                         f"{out} = torch.sum(torch.stack(outs) * padded.view(-1, 1, 1, 1, 1), 0)"],
            "stack_last": [f"outs = {stack}", f"{out} = (outs * {w}).sum(-1)"],
            "stacked_terms": [f"{out} = torch.stack([w * op({x}) for w, op in zip({w}, {it})]).sum(dim=0)"],
        }[form]
    if join == "einsum":
        if form == "stack_last":
            return [f"outs = {stack}", f"{out} = torch.einsum('...k,k->...', outs, {w})"]
        return [f"outs = {stack}", f"{out} = torch.einsum('k,kbchw->bchw', {w}, outs)"]
    if join == "tensordot":
        if form == "stack_last":
            return [f"outs = {stack}", f"{out} = torch.tensordot(outs, {w}, dims=([-1], [0]))"]
        return [f"outs = {stack}", f"{out} = torch.tensordot({w}, outs, dims=1)"]
    if join == "matmul":
        if form == "stack_last":
            return [f"outs = {stack}", f"{out} = outs @ {w}"]
        return [f"outs = {stack}", f"{out} = torch.matmul({w}, outs.flatten(1)).view(outs.shape[1:])"]
    if join == "cond_ne":
        return [f"{out} = sum(w * op({x}) for w, op in zip({w}, {it}) if w != 0)"]
    if join == "cond_gt":
        return [f"{out} = sum(w * op({x}) for w, op in zip({w}, {it}) if w > 0)"]
    raise ValueError(f"unknown join {join!r}")


def _join_skipping_none(spec: dict[str, Any], ops: str, x: str, w: str, out: str) -> list[str]:
    """:func:`_join` of an edge whose candidates the training loop may set to ``None``: skipped."""
    join = spec["join"]
    as_dict = spec["container"] == "moduledict"
    it = f"{ops}.values()" if as_dict else ops
    if join == "zipsum":
        return [f"{out} = sum(w * op({x}) for w, op in zip({w}, {it}) if op is not None)"]
    if join == "index":
        pad = " " * len(f"{out} = sum(")
        if as_dict:
            return [f"candidates = {ops}", f"{out} = sum({w}[i] * candidates[name]({x})",
                    f"{pad}for i, name in enumerate(candidates) if candidates[name] is not None)"]
        return [f"candidates = {ops}", f"{out} = sum({w}[i] * candidates[i]({x})",
                f"{pad}for i in range(len(candidates)) if candidates[i] is not None)"]
    if join == "unbind":
        return [f"{out} = sum(w * op({x}) for w, op in zip({w}.unbind(-1), {it}) if op is not None)"]
    if join == "loop":
        return [f"{out} = 0", f"for w, op in zip({w}, {it}):", "    if op is None:  # freed by the training loop",
                "        continue", f"    {out} += w * op({x})"]
    if join == "reduce":
        return [f"terms = [w * op({x}) for w, op in zip({w}, {it}) if op is not None]",
                f"{out} = functools.reduce(operator.add, terms)"]
    if join == "add_":
        seq = f"list({it})" if as_dict else ops
        return [f"candidates = {seq}", "kept = [k for k in range(len(candidates)) if candidates[k] is not None]",
                f"{out} = {w}[kept[0]] * candidates[kept[0]]({x})",
                "for k in kept[1:]:", f"    {out}.add_({w}[k] * candidates[k]({x}))"]
    if join in ("stack_view", "einsum", "tensordot", "matmul"):
        lines = [f"kept = [k for k, op in enumerate({it}) if op is not None]",
                 f"outs = torch.stack([op({x}) for op in {it} if op is not None])",
                 f"w_kept = {w}[kept]"]
        return lines + [{
            "stack_view": f"{out} = outs.mul(w_kept.view(-1, 1, 1, 1, 1)).sum(0)",
            "einsum": f"{out} = torch.einsum('k,kbchw->bchw', w_kept, outs)",
            "tensordot": f"{out} = torch.tensordot(w_kept, outs, dims=1)",
            "matmul": f"{out} = torch.matmul(w_kept, outs.flatten(1)).view(outs.shape[1:])",
        }[join]]
    if join in ("cond_ne", "cond_gt"):
        test = "w != 0" if join == "cond_ne" else "w > 0"
        return [f"{out} = sum(w * op({x}) for w, op in zip({w}, {it}) if op is not None and {test})"]
    raise ValueError(f"unknown join {join!r}")


def _candidate_container(spec: dict[str, Any], attr: str, names: str, make: str) -> list[str]:
    """``self.<attr> = ModuleList/ModuleDict`` of ``make(primitive)`` for ``primitive in names``."""
    if spec["container"] == "moduledict":
        return [f"        self.{attr} = nn.ModuleDict()",
                f"        for primitive in {names}:",
                f"            self.{attr}[primitive] = {make}"]
    return [f"        self.{attr} = nn.ModuleList()",
            f"        for primitive in {names}:",
            f"            self.{attr}.append({make})"]


def _make_op_function(spec: dict[str, Any]) -> list[str]:
    """``make_op(primitive, C, stride)``: the candidate and the wrappers its codebase adds."""
    lines = ["", "", "def make_op(primitive, C, stride):", "    op = OPS[primitive](C, stride)"]
    if spec["cell"] == "darts":
        lines += ["    if 'pool' in primitive:",
                  f"        op = nn.Sequential(op, nn.BatchNorm2d(C, {_bn_args(spec)}))"]
    if _v2(spec, "function") == "ste_candidate":
        lines += ["    if 'conv' in primitive:",
                  "        op = nn.Sequential(op, BoundedOutput(1.0))"]
    if spec["drop"] == "dropout":
        lines += ["    if isinstance(op, Identity):",
                  "        op = nn.Sequential(op, nn.Dropout(0.2))"]
    if spec["drop"] == "drop_path":
        lines += ["    if not isinstance(op, Identity):",
                  "        op = nn.Sequential(op, DropPath(0.2))"]
    lines.append("    return op")
    return lines


def _arch_groups(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(attribute, shape expression, role)`` of each architecture tensor; role alpha or beta."""
    if spec["cell"] == "nb201":
        return [("arch_parameters", "(num_edge, len(PRIMITIVES))", "alpha")]
    if spec["cell"] == "chain":
        return [("alphas", "(len(self.blocks), len(PRIMITIVES))", "alpha")]
    normal, reduce = _ALPHA_NAMES.get(spec["flavor"], ("alphas_normal", "alphas_reduce"))
    groups = [(normal, "(k, num_ops)", "alpha")]
    if spec["reductions"]:
        groups.append((reduce, "(k, num_ops)", "alpha"))
    if spec["flavor"] == "pcdarts":
        groups.append(("betas_normal", "(k,)", "beta"))
        if spec["reductions"]:
            groups.append(("betas_reduce", "(k,)", "beta"))
    return groups


def _per_edge(spec: dict[str, Any]) -> bool:
    """Whether each alpha group is a plain list of one tensor per edge (stacked where it is used)."""
    return _v2(spec, "alpha_list") != "none" and spec["storage"] != "paramlist"


def _group_ref(spec: dict[str, Any], index: int, attr: str) -> str:
    if spec["storage"] == "paramlist":
        return f"self.arch_params[{index}]"
    if _per_edge(spec) and _arch_groups(spec)[index][2] == "alpha":
        return f"torch.stack(self.{attr})"
    return f"self.{attr}"


def _init_alphas(spec: dict[str, Any], indent: str) -> list[str]:
    groups = _arch_groups(spec)
    init = "torch.rand({shape})" if spec["weights"] == "relu_norm" else "1e-3 * torch.randn({shape})"
    lines = []
    if spec["storage"] == "paramlist" and _v2(spec, "alpha_list") != "none":
        lines.append(f"{indent}self.arch_params = []  # a plain list (the optimizer takes arch_parameters())")
        for attr, shape, role in groups:
            value = (init if role == "alpha" else "1e-3 * torch.randn({shape})").format(shape=shape)
            lines += [f"{indent}# {attr}", f"{indent}self.arch_params.append(Variable({value}, requires_grad=True))"]
        return lines
    if spec["storage"] == "paramlist":
        lines.append(f"{indent}self.arch_params = nn.ParameterList([")
        for attr, shape, role in groups:
            lines.append(f"{indent}    nn.Parameter({(init if role == 'alpha' else '1e-3 * torch.randn({shape})').format(shape=shape)}),  # {attr}")
        lines.append(f"{indent}])")
        return lines
    for attr, shape, role in groups:
        value = (init if role == "alpha" else "1e-3 * torch.randn({shape})").format(shape=shape)
        if _per_edge(spec) and role == "alpha":  # one tensor per edge, appended to a plain list
            rows, cols = shape[1:-1].split(", ")
            row = init.format(shape=cols)
            row = f"nn.Parameter({row})" if spec["storage"] == "parameter" else f"Variable({row}, requires_grad=True)"
            lines += [f"{indent}self.{attr} = []", f"{indent}for _ in range({rows}):", f"{indent}    self.{attr}.append({row})"]
            continue
        if spec["storage"] == "parameter":
            lines.append(f"{indent}self.{attr} = nn.Parameter({value})")
        else:
            lines.append(f"{indent}self.{attr} = Variable({value}, requires_grad=True)")
    return lines


def _arch_accessors(spec: dict[str, Any]) -> list[str]:
    groups = _arch_groups(spec)
    refs = ", ".join(f"*self.{a}" if _per_edge(spec) and role == "alpha" else _group_ref(spec, i, a)
                     for i, (a, _, role) in enumerate(groups))
    if spec["cell"] == "nb201":
        return ["", "    def get_alphas(self):", f"        return [{refs}]"]
    return ["", "    def arch_parameters(self):", f"        return [{refs}]"]


# --- DARTS-space cells (DARTS, PC-DARTS, P-DARTS, DARTS-PT, SNAS) ------------------------------
def _darts_mixed_op(spec: dict[str, Any]) -> list[str]:
    pc = spec["flavor"] == "pcdarts"
    lines = ["", "", "class MixedOp(nn.Module):", ""] + _edge_class_lines(spec)
    if spec["flavor"] == "pdarts":
        lines += ["    def __init__(self, C, stride, switch):", "        super().__init__()"]
        names = "[p for p, on in zip(PRIMITIVES, switch) if on]"
    else:
        lines += ["    def __init__(self, C, stride):", "        super().__init__()"]
        names = "PRIMITIVES"
    if pc:
        lines += ["        self.mp = nn.MaxPool2d(2, 2)", "        self.k = 2"]
    lines += _candidate_container(spec, "_ops", names, f"make_op(primitive, {'C // self.k' if pc else 'C'}, stride)")
    lines += _edge_init_lines(spec)
    if spec["where"] == "mixed":
        lines += _tau_line(spec)
    arg = "alpha" if spec["where"] == "mixed" else "weights"
    lines += ["", f"    def forward(self, x, {arg}):"]
    body: list[str] = []
    if spec["where"] == "mixed":
        body.append(f"weights = {_weights_expr(spec, 'alpha')}")
    body += _edge_checks(spec, "x", "weights")
    if pc:
        body += ["dim_2 = x.shape[1]", "xtemp = x[:, :dim_2 // self.k, :, :]", "xtemp2 = x[:, dim_2 // self.k:, :, :]"]
        body += _join(spec, "self._ops", "xtemp", "weights", "temp1")
        body += ["if temp1.shape[2] == x.shape[2]:", "    ans = torch.cat([temp1, xtemp2], dim=1)", "else:",
                 "    ans = torch.cat([temp1, self.mp(xtemp2)], dim=1)"]
        last = _edge_output(spec, "out")
        body += ["return channel_shuffle(ans, self.k)"] if not last else \
            ["out = channel_shuffle(ans, self.k)", *last, "return out"]
    else:
        body += _join(spec, "self._ops", "x", "weights", "out")
        body += _edge_output(spec, "out")
        body.append("return out")
    lines += ["        " + b for b in body]
    return lines


def _darts_cell(spec: dict[str, Any]) -> list[str]:
    pc = spec["flavor"] == "pcdarts"
    pd = spec["flavor"] == "pdarts"
    lines = ["", "", "class Cell(nn.Module):", "",
             f"    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev{', switches' if pd else ''}):",
             "        super().__init__()",
             "        self.reduction = reduction",
             "        if reduction_prev:",
             "            self.preprocess0 = FactorizedReduce(C_prev_prev, C)",
             "        else:",
             "            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)",
             "        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)",
             "        self._steps = steps",
             "        self._multiplier = multiplier",
             "        self._ops = nn.ModuleList()",
             "        for i in range(self._steps):",
             "            for j in range(2 + i):",
             "                stride = 2 if reduction and j < 2 else 1",
             f"                self._ops.append(MixedOp(C, stride{', switches[len(self._ops)]' if pd else ''}))"]
    if spec["where"] == "cell":
        lines += _tau_line(spec)
    arg = "alphas" if spec["where"] == "cell" else ("weights" if spec["where"] == "network" else "alphas")
    sig = f"s0, s1, {arg}" + (", weights2" if pc else "")
    lines += ["", f"    def forward(self, {sig}):"]
    body = []
    if spec["where"] == "cell":
        body.append(f"weights = {_weights_expr(spec, 'alphas')}")
    per_edge = "alphas" if spec["where"] == "mixed" else "weights"
    body += ["s0 = self.preprocess0(s0)", "s1 = self.preprocess1(s1)", "", "states = [s0, s1]", "offset = 0",
             "for i in range(self._steps):"]
    edge = f"self._ops[offset + j](h, {per_edge}[offset + j])"
    if pc:
        edge = f"weights2[offset + j] * {edge}"
    body += [f"    s = sum({edge} for j, h in enumerate(states))",
             "    offset += len(states)", "    states.append(s)", "",
             "return torch.cat(states[-self._multiplier:], dim=1)"]
    lines += [("        " + b) if b else "" for b in body]
    return lines


def _darts_network(spec: dict[str, Any]) -> list[str]:
    pc = spec["flavor"] == "pcdarts"
    pd = spec["flavor"] == "pdarts"
    pt = spec["flavor"] == "darts_pt"
    groups = _arch_groups(spec)
    refs = {role_attr: _group_ref(spec, i, role_attr) for i, (role_attr, _, _) in enumerate(groups)}
    normal, reduce = _ALPHA_NAMES.get(spec["flavor"], ("alphas_normal", "alphas_reduce"))
    lines = ["", "", "class Network(nn.Module):", "",
             "    def __init__(self, C, num_classes, layers, reduction_layers, steps, multiplier, stem_multiplier=3"
             + (",\n                 switches_normal=None, switches_reduce=None):" if pd else "):"),
             "        super().__init__()",
             "        self._C = C",
             "        self._num_classes = num_classes",
             "        self._layers = layers",
             "        self._steps = steps",
             "        self._multiplier = multiplier",
             "        C_curr = stem_multiplier * C",
             "        self.stem = nn.Sequential(",
             "            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),",
             "            nn.BatchNorm2d(C_curr),",
             "        )",
             "        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C",
             "        self.cells = nn.ModuleList()",
             "        reduction_prev = False",
             "        for i in range(layers):",
             "            if i in reduction_layers:",
             "                C_curr *= 2",
             "                reduction = True",
             "            else:",
             "                reduction = False"]
    extra = ",\n                        switches_reduce if reduction else switches_normal" if pd else ""
    lines += [f"            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev{extra})",
              "            reduction_prev = reduction",
              "            self.cells.append(cell)",
              "            C_prev_prev, C_prev = C_prev, multiplier * C_curr",
              "        self.global_pooling = nn.AdaptiveAvgPool2d(1)"]
    if spec["drop"] == "dropout":
        lines.append("        self.dropout = nn.Dropout(0.1)")
    lines += ["        self.classifier = nn.Linear(C_prev, num_classes)"]
    if spec["where"] == "network":
        lines += _tau_line(spec)
    lines += ["        self._initialize_alphas()"]
    lines += ["", "    def _initialize_alphas(self):",
              "        k = sum(1 for i in range(self._steps) for n in range(2 + i))",
              "        num_ops = sum(SWITCH)" if pd else "        num_ops = len(PRIMITIVES)"]
    lines += _init_alphas(spec, "        ")
    if pt:
        proj = spec["projected"]
        lines += ["        self.candidate_flags = {'normal': [True] * k, 'reduce': [True] * k}",
                  "        self.proj_weights = {'normal': torch.zeros(k, num_ops), 'reduce': torch.zeros(k, num_ops)}"]
        for eid, opid in proj:
            lines += [f"        self.candidate_flags['normal'][{eid}] = False",
                      f"        self.proj_weights['normal'][{eid}, {opid}] = 1."]
    lines += _arch_accessors(spec)
    if pt:
        lines += ["", "    def get_projected_weights(self, cell_type):",
                  f"        alphas = {refs[normal]} if cell_type == 'normal' else {refs.get(reduce, refs[normal])}",
                  f"        weights = {_weights_expr(spec, 'alphas')}",
                  "        for eid in range(len(self.candidate_flags[cell_type])):",
                  "            if not self.candidate_flags[cell_type][eid]:",
                  "                weights[eid].data.copy_(self.proj_weights[cell_type][eid])",
                  "        return weights"]
    lines += ["", "    def forward(self, input):", "        s0 = s1 = self.stem(input)"]
    if pc:
        lines += _pc_betas(spec, refs, "normal", "betas_normal")
        if spec["reductions"]:
            lines += _pc_betas(spec, refs, "reduce", "betas_reduce")
    lines += ["        for i, cell in enumerate(self.cells):"]
    branches = [("normal", refs[normal], "            ")]
    if reduce in refs:
        lines.append("            if cell.reduction:")
        branches = [("reduce", refs[reduce], "                "), ("normal", refs[normal], "                ")]
    for cell_type, alpha, ind in branches:
        if cell_type == "normal" and reduce in refs:
            lines.append("            else:")
        if pt:
            lines.append(f"{ind}weights = self.get_projected_weights('{cell_type}')")
        elif spec["where"] == "network":
            lines.append(f"{ind}weights = {_weights_expr(spec, alpha)}")
        else:
            lines.append(f"{ind}weights = {alpha}")
        if pc:
            lines.append(f"{ind}weights2 = weights2_{cell_type}")
    call = "cell(s0, s1, weights, weights2)" if pc else "cell(s0, s1, weights)"
    lines += [f"            s0, s1 = s1, {call}",
              "        out = self.global_pooling(s1)"]
    if spec["drop"] == "dropout":
        lines.append("        out = self.dropout(out)")
    lines += ["        logits = self.classifier(out.view(out.size(0), -1))", "        return logits"]
    return lines


def _pc_betas(spec: dict[str, Any], refs: dict[str, str], cell_type: str, attr: str) -> list[str]:
    beta = refs[attr]
    return ["        n = 3",
            "        start = 2",
            f"        weights2_{cell_type} = F.softmax({beta}[0:2], dim=-1)",
            "        for i in range(self._steps - 1):",
            "            end = start + n",
            f"            tw2 = F.softmax({beta}[start:end], dim=-1)",
            "            start = end",
            "            n += 1",
            f"            weights2_{cell_type} = torch.cat([weights2_{cell_type}, tw2], dim=0)"]


# --- NAS-Bench-201 cells (xautodl) ---------------------------------------------------------
def _nb201(spec: dict[str, Any]) -> list[str]:
    where = spec["where"]
    lines = ["", "", "class ResNetBasicblock(nn.Module):", "",
             "    def __init__(self, inplanes, planes, stride):",
             "        super().__init__()",
             "        self.conv_a = ReLUConvBN(inplanes, planes, 3, stride, 1)",
             "        self.conv_b = ReLUConvBN(planes, planes, 3, 1, 1)",
             "        self.downsample = nn.Sequential(",
             "            nn.AvgPool2d(kernel_size=2, stride=2, padding=0),",
             "            nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, padding=0, bias=False),",
             "        )",
             "",
             "    def forward(self, inputs):",
             "        basicblock = self.conv_a(inputs)",
             "        basicblock = self.conv_b(basicblock)",
             "        return self.downsample(inputs) + basicblock",
             "", "",
             "class SearchCell(nn.Module):", "", *_edge_class_lines(spec),
             "    def __init__(self, C, max_nodes, op_names):",
             "        super().__init__()",
             "        self.edges = nn.ModuleDict()",
             "        for i in range(1, max_nodes):",
             "            for j in range(i):",
             "                node_str = '{:}<-{:}'.format(i, j)"]
    if spec["container"] == "moduledict":
        lines += ["                self.edges[node_str] = nn.ModuleDict({name: make_op(name, C, 1) for name in op_names})"]
    else:
        lines += ["                self.edges[node_str] = nn.ModuleList([make_op(name, C, 1) for name in op_names])"]
    lines += ["        self.max_nodes = max_nodes",
              "        self.edge_keys = sorted(list(self.edges.keys()))",
              "        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}",
              "        self.num_edges = len(self.edges)"]
    lines += _edge_init_lines(spec)
    if where in ("cell", "mixed"):
        lines += _tau_line(spec)
    arg = "alphas" if where == "cell" else ("weightss" if where == "network" else "alphas")
    lines += ["", f"    def forward(self, inputs, {arg}):"]
    body = []
    if where == "cell":
        body.append(f"weightss = {_weights_expr(spec, 'alphas')}")
    body += ["nodes = [inputs]", "for i in range(1, self.max_nodes):", "    inter_nodes = []", "    for j in range(i):",
             "        node_str = '{:}<-{:}'.format(i, j)"]
    if where == "mixed":
        body.append(f"        weights = {_weights_expr(spec, 'alphas[self.edge2index[node_str]]')}")
    else:
        body.append("        weights = weightss[self.edge2index[node_str]]")
    body += ["        " + c for c in _edge_checks(spec, "nodes[j]", "weights")]
    body += ["        " + j for j in _join(spec, "self.edges[node_str]", "nodes[j]", "weights", "edge")]
    body += ["        " + e for e in _edge_output(spec, "edge")]
    body += ["        inter_nodes.append(edge)", "    nodes.append(sum(inter_nodes))", "return nodes[-1]"]
    lines += ["        " + b for b in body]

    lines += ["", "", "class TinyNetwork(nn.Module):", "",
              "    def __init__(self, C, N, max_nodes, num_classes, search_space, reduction_layers):",
              "        super().__init__()",
              "        self._C = C",
              "        self.max_nodes = max_nodes",
              "        self.stem = nn.Sequential(",
              "            nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False),",
              "            nn.BatchNorm2d(C),",
              "        )",
              "        C_prev = C",
              "        self.cells = nn.ModuleList()",
              "        num_edge = None",
              "        for index in range(N):",
              "            if index in reduction_layers:",
              "                self.cells.append(ResNetBasicblock(C_prev, C_prev * 2, 2))",
              "                C_prev *= 2",
              "            cell = SearchCell(C_prev, max_nodes, search_space)",
              "            num_edge = cell.num_edges",
              "            self.cells.append(cell)",
              "        self.op_names = list(search_space)",
              "        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))",
              "        self.global_pooling = nn.AdaptiveAvgPool2d(1)"]
    if spec["drop"] == "dropout":
        lines.append("        self.dropout = nn.Dropout(0.1)")
    lines.append("        self.classifier = nn.Linear(C_prev, num_classes)")
    if where == "network":
        lines += _tau_line(spec)
    lines += _init_alphas(spec, "        ")
    lines += _arch_accessors(spec)
    ref = _group_ref(spec, 0, "arch_parameters")
    lines += ["", "    def forward(self, inputs):"]
    if where == "network":
        lines.append(f"        alphas = {_weights_expr(spec, ref)}")
    else:
        lines.append(f"        alphas = {ref}")
    lines += ["        feature = self.stem(inputs)",
              "        for i, cell in enumerate(self.cells):",
              "            if isinstance(cell, SearchCell):",
              "                feature = cell(feature, alphas)",
              "            else:",
              "                feature = cell(feature)",
              "        out = self.lastact(feature)",
              "        out = self.global_pooling(out)",
              "        out = out.view(out.size(0), -1)"]
    if spec["drop"] == "dropout":
        lines.append("        out = self.dropout(out)")
    lines += ["        logits = self.classifier(out)", "        return out, logits"]
    return lines


# --- layer-wise choice chains (ProxylessNAS, FBNet) ----------------------------------------
def _chain(spec: dict[str, Any]) -> list[str]:
    where = spec["where"]
    proxyless = spec["flavor"] == "proxyless"
    name = "MixedEdge" if proxyless else "MixedBlock"
    lines = ["", "", f"class {name}(nn.Module):", "", *_edge_class_lines(spec),
             "    def __init__(self, C_in, C_out, stride, op_names):",
             "        super().__init__()",
             "        self.has_shortcut = C_in == C_out and stride == 1"]
    make = "OPS[primitive](C_in, C_out, stride)"
    wrappers = (["BoundedOutput(1.0)"] if _v2(spec, "function") == "ste_candidate" else []) + \
        (["DropPath(0.2)"] if spec["drop"] == "drop_path" else [])
    if wrappers:
        make = f"nn.Sequential({', '.join([make, *wrappers])})"
    lines += _candidate_container(spec, "candidate_ops", "op_names", make)
    lines += _edge_init_lines(spec)
    if where == "mixed":
        lines += _tau_line(spec)
    arg = "alpha" if where == "mixed" else "weights"
    lines += ["", f"    def forward(self, x, {arg}):"]
    body = []
    if where == "mixed":
        body.append(f"weights = {_weights_expr(spec, 'alpha')}")
    body += _edge_checks(spec, "x", "weights")
    body += _join(spec, "self.candidate_ops", "x", "weights", "out")
    body += _edge_output(spec, "out")
    body.append("return out")
    lines += ["        " + b for b in body]
    lines += ["", "", "class SuperNet(nn.Module):", "",
              "    def __init__(self, stem_width, layers, op_names, num_classes):",
              "        super().__init__()",
              "        self.first_conv = nn.Sequential(",
              "            nn.Conv2d(3, stem_width, 3, 1, 1, bias=False),",
              "            nn.BatchNorm2d(stem_width),",
              "            nn.ReLU6(inplace=True),",
              "        )",
              "        self.blocks = nn.ModuleList()",
              "        C_in = stem_width",
              "        for C_out, stride in layers:",
              f"            self.blocks.append({name}(C_in, C_out, stride, op_names))",
              "            C_in = C_out",
              "        self.feature_mix_layer = nn.Sequential(",
              "            nn.Conv2d(C_in, 2 * C_in, 1, bias=False),",
              "            nn.BatchNorm2d(2 * C_in),",
              "            nn.ReLU6(inplace=True),",
              "        )",
              "        self.global_avg_pooling = nn.AdaptiveAvgPool2d(1)"]
    if spec["drop"] == "dropout":
        lines.append("        self.dropout = nn.Dropout(0.1)")
    lines.append("        self.classifier = nn.Linear(2 * C_in, num_classes)")
    if where == "network":
        lines += _tau_line(spec)
    lines += _init_alphas(spec, "        ")
    lines += _arch_accessors(spec)
    ref = _group_ref(spec, 0, "alphas")
    lines += ["", "    def forward(self, x):", "        x = self.first_conv(x)"]
    if where == "network":
        lines.append(f"        weights = {_weights_expr(spec, ref)}")
    lines.append("        for i, block in enumerate(self.blocks):")
    w = "weights[i]" if where == "network" else ("self.alphas[i]" if _per_edge(spec) else f"{ref}[i]")
    if proxyless:
        lines += ["            if block.has_shortcut:", f"                x = x + block(x, {w})",
                  "            else:", f"                x = block(x, {w})"]
    else:
        lines.append(f"            x = block(x, {w})")
    lines += ["        x = self.feature_mix_layer(x)", "        x = self.global_avg_pooling(x)",
              "        x = x.view(x.size(0), -1)"]
    if spec["drop"] == "dropout":
        lines.append("        x = self.dropout(x)")
    lines += ["        return self.classifier(x)"]
    return lines


# --- capture-v2 constructs (issue 22) --------------------------------------------------------
def _v2(spec: dict[str, Any], dim: str) -> str:
    return spec.get(dim, V2_DEFAULTS[dim])  # specs written before the dimension existed: its default


def _edge_class(spec: dict[str, Any]) -> str:
    """The class whose forward joins an edge's candidates."""
    if spec["cell"] == "chain":
        return "MixedEdge" if spec["flavor"] == "proxyless" else "MixedBlock"
    return {"darts": "MixedOp", "nb201": "SearchCell"}[spec["cell"]]


_SCALAR_READS = {"module_object": "scheduler.decay_rate", "global_dict": "SEARCH_CONFIG['edge_scale']",
                 "class_attr": "self.edge_scale", "type_attr": "type(self).edge_scale"}


def _edge_class_lines(spec: dict[str, Any]) -> list[str]:
    """Class-body lines of the edge class: a class attribute the training loop sets on the class."""
    if _v2(spec, "scalar") in ("class_attr", "type_attr"):
        return ["    edge_scale = 1.0  # the search script decays it on the class between steps", ""]
    return []


def _edge_init_lines(spec: dict[str, Any]) -> list[str]:
    lines = ["        self.rescale = make_scaler(CONFIG)"] if _v2(spec, "scalar") == "closure" else []
    if _v2(spec, "host_draw") == "own_generator":
        lines.append("        self.coin = random.Random(7)  # the edge's own stream")
    return lines


def _edge_checks(spec: dict[str, Any], x: str, w: str) -> list[str]:
    """Statements at the top of an edge's join that check what it was given (library-style)."""
    check = _v2(spec, "typecheck")
    if check == "isinstance":
        return [f"if not isinstance({w}, torch.Tensor):  # a derived architecture passes a list of floats",
                f"    {w} = torch.tensor({w}, dtype={x}.dtype)"]
    if check == "is_tensor":
        return [f"if not torch.is_tensor({x}):",
                f"    raise TypeError('{_edge_class(spec)} takes a tensor, got {{}}'.format(type({x})))"]
    if check == "assert_or":
        return [f"assert isinstance({x}, dict) or isinstance({x}, torch.Tensor), type({x})"]
    if check == "variable":
        return [f"keep = Variable({x}.data.new_ones({x}.size(0), 1, 1, 1), requires_grad=False)"]
    return []


def _edge_output(spec: dict[str, Any], out: str) -> list[str]:
    """Statements applied to an edge's joined output ``out`` (the legacy mask, the scheduled scale)."""
    lines = [f"{out} = {out} * keep"] if _v2(spec, "typecheck") == "variable" else []
    scalar = _v2(spec, "scalar")
    if scalar == "closure":
        lines.append(f"{out} = self.rescale({out})")
    elif scalar == "aliased_object":
        lines += ["schedule = scheduler  # the run's schedule, through a local", f"{out} = {out} * schedule.decay_rate"]
    elif scalar != "none":
        lines.append(f"{out} = {out} * {_SCALAR_READS[scalar]}")
    if _v2(spec, "host_draw") != "none":
        lines.append(f"{out} = {out} * 0.5 if {_HOST_DRAWS[_v2(spec, 'host_draw')][1]} < 0.5 else {out}")
    return lines


#: ``host_draw``: (the import it needs, the coin's expression)
_HOST_DRAWS = {"module_function": ("import random", "random.random()"),
               "bound_name": ("from random import random as coin", "coin()"),
               "numpy_bound": ("from numpy.random import rand as numpy_coin", "numpy_coin()"),
               "own_generator": ("import random", "self.coin.random()")}


#: The straight-through hard one-hot Functions (``function`` ste_weights / ste_indexed): docstring, forward body.
_HARD_GATES = {
    "ste_weights": ("""Binarized architecture weights: forward keeps the largest weight of each row as a one-hot
    row, backward passes the gradient straight through to the soft weights.""",
                    """        top = weights.max(dim=-1, keepdim=True)[0]
        return (weights == top).to(weights.dtype)
"""),
    "ste_indexed": ("""Binarized architecture weights, one Python index per row: forward sets the largest weight of
    each row to one, backward passes the gradient straight through to the soft weights.""",
                    """        rows = weights.reshape(-1, weights.shape[-1])
        hard = torch.zeros_like(rows)
        for i in range(rows.shape[0]):
            hard[i, int(rows[i].argmax())] = 1.0
        return hard.view_as(weights)
"""),
}


def _v2_definitions(spec: dict[str, Any]) -> list[str]:
    """Module-level definitions the capture-v2 constructs use: autograd Functions, schedule objects."""
    out: list[str] = []
    function = _v2(spec, "function")
    if function in _HARD_GATES:
        doc, body = _HARD_GATES[function]
        out.append(f'''
class HardGate(torch.autograd.Function):
    """{doc}"""

    @staticmethod
    def forward(ctx, weights):
{body}
    @staticmethod
    def backward(ctx, grad_output):
        return grad_output
''')
    if function == "binary_gate":
        out.append('''
class BinaryGate(torch.autograd.Function):
    """Binary gates over the candidates' outputs: forward is the output of the path with the largest
    weight; backward gives that path the gradient and every weight k the estimate <grad, out_k>."""

    @staticmethod
    def forward(ctx, weights, *outs):
        gates = (weights == weights.max()).to(outs[0].dtype)
        ctx.save_for_backward(gates, *outs)
        return sum(g * o for g, o in zip(gates, outs))

    @staticmethod
    def backward(ctx, grad_output):
        gates, *outs = ctx.saved_tensors
        grad_weights = torch.stack([(grad_output * o).sum() for o in outs])
        return (grad_weights, *[g * grad_output for g in gates])
''')
    if function == "closure_gate":
        paths = "list(candidate_ops.values())" if spec["container"] == "moduledict" else "candidate_ops"
        out.append('''
class ClosureGate(torch.autograd.Function):
    """Binary gate given closures (ProxylessNAS's full_v2): forward keeps the path with the largest
    weight (``run_paths`` under one-hot gates); backward gives the input the kept path's gradient and
    every weight k the estimate <grad, out_k> that ``path_grads`` computes, running the candidates again."""

    @staticmethod
    def forward(ctx, x, weights, run_paths, path_grads):
        gates = (weights == weights.max()).to(x.dtype)
        detached_x = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            output = run_paths(detached_x, gates)
        ctx.path_grads = path_grads
        ctx.save_for_backward(detached_x, output)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        detached_x, output = ctx.saved_tensors
        grad_x = None
        if detached_x.requires_grad and output.requires_grad:
            grad_x = torch.autograd.grad(output, detached_x, grad_output, allow_unused=True)[0]
        return grad_x, ctx.path_grads(detached_x.detach(), grad_output), None, None


def gate_closures(candidate_ops):
    """The gate's two closures over the edge's candidates, made anew on every forward."""

    def run_paths(x, gates):
        return sum(g * op(x) for g, op in zip(gates, {paths}))

    def path_grads(x, grad_output):
        with torch.no_grad():
            return torch.stack([(grad_output * op(x)).sum() for op in {paths}])

    return run_paths, path_grads
'''.format(paths=paths))
    if function == "ste_candidate":
        out.append('''
class ClampSTE(torch.autograd.Function):
    """A bounded activation trained straight through: forward clamps to [-bound, bound], backward
    passes the gradient unchanged, also where the clamp saturates."""

    @staticmethod
    def forward(ctx, x, bound):
        return x.clamp(-bound, bound)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class BoundedOutput(nn.Module):

    def __init__(self, bound):
        super().__init__()
        self.bound = bound

    def forward(self, x):
        return ClampSTE.apply(x, self.bound)
''')
    scalar = _v2(spec, "scalar")
    if scalar in ("module_object", "aliased_object"):
        out.append('''
class DecaySchedule:
    """Decays the mixed edges' output scale once per epoch (an object of the search script)."""

    def __init__(self, initial):
        self.initial = initial
        self.decay_rate = initial

    def reset(self):
        self.decay_rate = self.initial

    def step(self):
        self.decay_rate *= 0.5


scheduler = DecaySchedule(1.0)
''')
    if scalar == "global_dict":
        out.append("SEARCH_CONFIG = {'edge_scale': 1.0, 'epochs': 50}")
    if scalar == "closure":
        out.append('''
class SearchConfig:

    def __init__(self, **entries):
        self.__dict__.update(entries)


CONFIG = SearchConfig(edge_scale=1.0, epochs=50)


def make_scaler(config):
    """The mixed edges' output scaling, reading the run's config at every call."""
    def rescale(t):
        return t * config.edge_scale
    return rescale
''')
    return out


def _v2_hooks(spec: dict[str, Any]) -> list[str]:
    """Module-level functions the check calls between steps (``_BETWEEN_STEPS``), as a training loop
    would change the model, and ``reset_schedule`` (called by ``build``)."""
    lines: list[str] = []
    scalar = _v2(spec, "scalar")
    if scalar != "none":
        reset, step = {
            "module_object": ("scheduler.reset()", "scheduler.step()"),
            "aliased_object": ("scheduler.reset()", "scheduler.step()"),
            "global_dict": ("SEARCH_CONFIG['edge_scale'] = 1.0", "SEARCH_CONFIG['edge_scale'] *= 0.5"),
            "closure": ("CONFIG.edge_scale = 1.0", "CONFIG.edge_scale *= 0.5"),
        }.get(scalar, (f"{_edge_class(spec)}.edge_scale = 1.0", f"{_edge_class(spec)}.edge_scale *= 0.5"))
        lines += ["", "", "def reset_schedule():", '    """The schedule at the start of the search."""', f"    {reset}",
                  "", "", "def step_schedule():", '    """Between steps: the mixed edges\' output scale decays."""',
                  f"    {step}"]
    if _v2(spec, "drop_candidate") != "none":
        first = {"darts": "model.cells[0]._ops[0]._ops",
                 "nb201": "next(c for c in model.cells if isinstance(c, SearchCell)).edges['1<-0']",
                 "chain": "model.blocks[0].candidate_ops"}[spec["cell"]]
        key = "list(ops.keys())[-1]" if spec["container"] == "moduledict" else "len(ops) - 1"
        lines += ["", "", "def drop_candidate(model):",
                  '    """Between steps: the loop frees the last candidate of the first mixed edge (forward skips it)."""',
                  f"    ops = {first}", f"    ops[{key}] = None"]
    if "new_epoch_alphas" in _hooks(spec):
        attr = "arch_params" if spec["storage"] == "paramlist" else _arch_groups(spec)[0][0]
        new = "2 * old.detach().roll(1, -1)"  # (a re-initialization whose change shows: the largest moves)
        wrap = "nn.Parameter(new)" if _per_edge(spec) and spec["storage"] == "parameter" else "Variable(new, requires_grad=True)"
        lines += ["", "", "def new_epoch_alphas(model):",
                  '    """Between epochs: a re-initialized tensor replaces the first in the list of architecture tensors."""',
                  f"    old = model.{attr}[0]", f"    new = {new}", f"    model.{attr}[0] = {wrap}"]
    return lines


def _vertex_values(spec: dict[str, Any]) -> tuple[str, str] | None:
    """(selected, others) parameter values that make the weights exactly one-hot; None if impossible."""
    return {"softmax": ("1e4", "0."), "softmax_temp": ("1e4", "0."), "gumbel_soft": ("1e4", "0."),
            "gumbel_hard": ("1e4", "0."), "gumbel_manual": ("1e4", "0."), "sigmoid": ("1e4", "-1e4"),
            "relu_norm": ("1.", "-1."), "dirichlet": None}[spec["weights"]]


def _build_functions(spec: dict[str, Any]) -> list[str]:
    cell = spec["cell"]
    groups = _arch_groups(spec)
    alphas = [(i, a) for i, (a, _, role) in enumerate(groups) if role == "alpha"]
    if cell == "darts":
        ctor = f"Network({spec['C']}, 10, {spec['cells']}, {spec['reductions']}, {spec['steps']}, {spec['steps']}"
        if spec["flavor"] == "pdarts":
            k = sum(2 + i for i in range(spec["steps"]))
            ctor += f",\n                    switches_normal=[SWITCH] * {k}, switches_reduce=[SWITCH] * {k}"
        ctor += ")"
    elif cell == "nb201":
        ctor = f"TinyNetwork({spec['C']}, {spec['cells']}, {spec['nodes']}, 10, PRIMITIVES, {spec['reductions']})"
    else:
        ctor = f"SuperNet({spec['stem']}, {spec['layers']}, PRIMITIVES, 10)"
    lines = ["", "", "def build():", '    """The supernet and its example inputs."""']
    if _v2(spec, "scalar") != "none":
        lines.append("    reset_schedule()")
    lines += [f"    torch.manual_seed({spec['seed']})",
              f"    model = {ctor}",
              "    x = torch.randn(2, 3, 8, 8)"]
    if spec["dtype"] == "float64":
        lines += ["    model = model.double()", "    x = x.double()"]
        # plain tensors (and parameters in a plain list) are not module state: .double() leaves them alone
        if spec["storage"] == "paramlist" and _v2(spec, "alpha_list") != "none":
            lines.append("    model.arch_params = [Variable(a.detach().double(), requires_grad=True) for a in model.arch_params]")
        for attr, _, role in groups if spec["storage"] != "paramlist" else ():
            if _per_edge(spec) and role == "alpha":
                wrap = ("nn.Parameter(a.detach().double())" if spec["storage"] == "parameter"
                        else "Variable(a.detach().double(), requires_grad=True)")
                lines.append(f"    model.{attr} = [{wrap} for a in model.{attr}]")
            elif spec["storage"] == "tensor":
                lines.append(f"    model.{attr} = Variable(model.{attr}.detach().double(), requires_grad=True)")
    lines.append("    return model, (x,)")
    vertex = _vertex_values(spec)
    if vertex is None:
        lines += ["", "", "# the weights (Dirichlet samples) cannot be set exactly one-hot", "set_vertex = None"]
    elif _per_edge(spec):
        refs = [f"*model.{a}" for _, a in alphas]
        lines += ["", "", "def set_vertex(model, choose):",
                  '    """Set the architecture parameters so that every edge\'s weights are exactly one-hot;',
                  '    choose(row, n) picks the candidate of each edge (one tensor per edge, numbered across lists)."""',
                  "    with torch.no_grad():",
                  f"        for row, alpha in enumerate(({', '.join(refs)},)):",
                  f"            alpha.fill_({vertex[1]})",
                  f"            alpha[choose(row, alpha.shape[0])] = {vertex[0]}"]
    else:
        refs = [("model.arch_params[%d]" % i) if spec["storage"] == "paramlist" else f"model.{a}" for i, a in alphas]
        lines += ["", "", "def set_vertex(model, choose):",
                  '    """Set the architecture parameters so that every edge\'s weights are exactly one-hot;',
                  '    choose(row, n) picks the candidate of each row (rows numbered across tensors)."""',
                  "    row = 0",
                  "    with torch.no_grad():",
                  f"        for alpha in ({', '.join(refs)},):",
                  "            for r in range(alpha.shape[0]):",
                  f"                alpha[r] = {vertex[1]}",
                  f"                alpha[r, choose(row, alpha.shape[1])] = {vertex[0]}",
                  "                row += 1"]
    return lines + _v2_hooks(spec)


def render(spec: dict[str, Any]) -> str:
    """The module text of the supernet that ``spec`` describes (``build()``, ``set_vertex``)."""
    summary = ", ".join(f"{k}={spec[k]}" for k in ("flavor", *[d for d in DIMENSIONS if d != "flavor"], "join_form")
                        if k in spec)
    summary += "".join(f", {d}={_v2(spec, d)}" for d in V2_DIMENSIONS if _v2(spec, d) != "none")
    head = [f'"""Generated by topofx.fuzz (seed {spec["seed"]}): a {spec["flavor"]}-style supernet.',
            "", *textwrap.wrap(summary, 100), *textwrap.wrap(f"ops={spec['ops']}", 100), '"""']
    imports = []
    if spec["join"] == "reduce":
        imports += ["import functools", "import operator"]
    if spec["cell"] == "chain":
        imports.append("from collections import OrderedDict")
    imports += ["", "import torch", "import torch.nn as nn", "import torch.nn.functional as F"]
    if spec["storage"] == "tensor" or _v2(spec, "typecheck") == "variable" or (
            _v2(spec, "alpha_list") != "none" and spec["storage"] == "paramlist"):
        imports.append("from torch.autograd import Variable")
    if _v2(spec, "host_draw") != "none":
        imports.append(_HOST_DRAWS[_v2(spec, "host_draw")][0])
    lines = head + sorted(i for i in imports if i.startswith(("import f", "import o", "from c"))) + \
        [i for i in imports if not i.startswith(("import f", "import o", "from c"))]
    lines += ["", "SPEC = " + pprint.pformat(spec, width=100, sort_dicts=True).replace("\n", "\n       "), ""]
    for block in _op_classes(spec) + _helpers(spec) + _v2_definitions(spec):
        lines += ["", block.strip("\n"), ""]
    lines += [""] + _ops_table(spec)
    if spec["cell"] != "chain":
        lines += _make_op_function(spec)
    if spec["cell"] == "darts":
        lines += _darts_mixed_op(spec) + _darts_cell(spec) + _darts_network(spec)
    elif spec["cell"] == "nb201":
        lines += _nb201(spec)
    else:
        lines += _chain(spec)
    lines += _build_functions(spec)
    text = "\n".join(lines) + "\n"
    return re.sub(r"\n{4,}", "\n\n\n", text)


# ---------------------------------------------------------------------------------------------
# building a model from its source
# ---------------------------------------------------------------------------------------------
_BUILD_DIR: Path | None = None


def _build_dir() -> Path:
    """One temporary folder per process for the generated module files (they stay importable and
    their lines readable in tracebacks while the process lives)."""
    global _BUILD_DIR
    if _BUILD_DIR is None:
        _BUILD_DIR = Path(tempfile.mkdtemp(prefix="topofx-fuzz-"))
    return _BUILD_DIR


def build(source: str, spec: dict[str, Any]) -> tuple[nn.Module, tuple, Callable[[Callable[[int, int], int]], None] | None]:
    """Import ``source`` from a file and return ``(model, example_inputs, set_vertex)``.

    ``set_vertex(choose)`` sets the model's architecture parameters so that every edge's weights are
    exactly one-hot, ``choose(row, n)`` picking each row's candidate; it is ``None`` for weight kinds
    that cannot be one-hot (Dirichlet samples)."""
    module = _load(source, spec)
    model, inputs = module.build()
    setter = module.set_vertex
    return model, tuple(inputs), (None if setter is None else functools.partial(setter, model))


def _load(source: str, spec: dict[str, Any]) -> Any:
    """The module of ``source``, imported from a file once per process (``step_schedule`` and the other
    hooks of :data:`_BETWEEN_STEPS` live there)."""
    digest = abs(hash(source)) & 0xFFFFFFFFFFFF
    path = _build_dir() / f"fuzz_{spec['seed']}_{digest:012x}.py"
    if not path.exists():
        path.write_text(source)
    name = path.stem
    module = sys.modules.get(name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# checking one model
# ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one model in one mode.

    ``key`` names the failure class within (mode, outcome): the first failing category of a
    mismatch, the exception type, where in topofx it was raised and its normalized message, or the
    fallback reason of a refusal; empty for ``ok``."""

    seed: int
    mode: str
    outcome: str  # ok, refused, silent, crash, invalid
    key: str = ""
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failure_class(self) -> tuple[str, str, str]:
        return (self.mode, self.outcome, self.key)

    @property
    def failed(self) -> bool:
        return self.outcome in ("silent", "missed", "crash", "invalid")


class _Timeout(Exception):
    """The per-model time limit ran out."""


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_Timeout` after ``seconds`` (main thread of a POSIX process only, else no limit)."""
    import threading

    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise _Timeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _normalize(text: str, limit: int = 90) -> str:
    """A message's first line without the parts that vary between models (numbers, names, addresses)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    line = re.sub(r"0x[0-9a-fA-F]+", "0x?", line)
    line = re.sub(r"/\S+/([\w.]+\.py)", r"\1", line)
    line = re.sub(r"fuzz_\d+_[0-9a-f]+", "model", line)
    line = re.sub(r"\b(Network|TinyNetwork|SuperNet)\b", "Model", line)
    line = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
    return line[:limit]


def _where_raised(exc: BaseException) -> str:
    """``file.function`` of the innermost frame in topofx (or its passes), else of the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    root = Path(__file__).resolve().parent.parent
    for fs in reversed(frames):
        p = Path(fs.filename).resolve()
        if (p.is_relative_to(root / "topofx") or p.is_relative_to(root / "passes")) and p.name != "fuzz.py":
            return f"{p.stem}.{fs.name}"
    if not frames:
        return "?"
    stem = Path(frames[-1].filename).stem
    return f"{'model' if stem.startswith('fuzz_') else stem}.{frames[-1].name}"


def _exception_key(stage: str, exc: BaseException) -> str:
    if isinstance(exc, _Timeout):
        return f"{stage}: timeout"
    return f"{stage}: {type(exc).__name__} @{_where_raised(exc)}: {_normalize(exc)}"


def _first_failure(report: Any, categories: Sequence[str]) -> str | None:
    """The first category (in ``categories`` order) with a tensor outside tolerance, or ``problem``."""
    if report.problems:
        return "problem"
    failing = {c.category for c in report.failures}
    return next((c for c in categories if c in failing), None)


def _vertex_choice(seed: int) -> Callable[[int, int], int]:
    """A deterministic random pick per row (same picks for the same seed and row)."""
    return lambda row, n: random.Random(seed * 7919 + row).randrange(n)


class _GraphCalls:
    """Counts calls of the simplified module's graph (to tell a graph run from an eager fallback)."""

    def __init__(self, simplified: nn.Module):
        self.count = 0
        gm = getattr(simplified, "graph_module", None)
        self.handle = gm.register_forward_pre_hook(self._hook) if isinstance(gm, nn.Module) else None

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def check_spec(spec: dict[str, Any], mode: str, *, simplify: Callable[..., Any] | None = None,
               timeout: float | None = 60.0) -> Outcome:
    """Render ``spec``, build the model and check ``mode``'s contract; never raises.

    ``simplify`` defaults to :func:`topofx.simplify` (tests pass deliberately broken stand-ins)."""
    start = time.perf_counter()
    out = Outcome(spec["seed"], mode, "ok", spec=spec)
    try:
        with _time_limit(timeout):
            _check(spec, mode, simplify, out)
    except _Timeout as exc:
        out.outcome, out.key, out.message = "crash", _exception_key("check", exc), str(exc)
    out.seconds = time.perf_counter() - start
    return out


def _check(spec: dict[str, Any], mode: str, simplify: Callable[..., Any] | None, out: Outcome,
           hooks: Sequence[str] | None = None) -> None:
    import topofx
    from topofx.ir import max_rel_error, preserved_state
    from topofx.testing import find_arch_parameters, seeded_outputs, train_step_equivalence

    simplify = simplify or topofx.simplify
    try:
        model, inputs, set_vertex = build(render(spec), spec)
        model.train()
        with preserved_state(model, tensors=find_arch_parameters(model)):
            torch.manual_seed(0)
            _loss(model(*inputs)).backward()
        for p in find_arch_parameters(model):
            p.grad = None
        model.zero_grad(set_to_none=True)
    except _Timeout:
        raise
    except Exception as exc:  # noqa: BLE001 - the generated model does not run: a fuzzer bug
        out.outcome, out.key, out.message = "invalid", _exception_key("build", exc), traceback.format_exc()
        return

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            simplified = simplify(model, inputs, mode=mode)
        except _Timeout:
            raise
        except Exception as exc:  # noqa: BLE001 - any exception from simplify is a crash
            out.outcome, out.key, out.message = "crash", _exception_key("simplify", exc), traceback.format_exc()
            out.warnings = _warning_texts(caught)
            return
        if getattr(simplified, "graph_module", None) is None:
            reason = getattr(getattr(simplified, "report", None), "fallback", None) or "no graph"
            out.outcome, out.key = "refused", f"fallback: {_normalize(str(reason).split(' at ')[0])}"
            out.message = str(reason)
            out.warnings = _warning_texts(caught)
            return
        calls = _GraphCalls(simplified)
        captured = simplified.report  # the join check reads the model as built, not as the hooks leave it
        try:
            if mode == "exact":
                failing, report = _exact_failure(model, simplified, inputs)
                if failing:
                    out.outcome, out.key, out.message = "silent", f"exact: {failing}", str(report)
            else:
                _check_topo(model, simplified, inputs, set_vertex, spec, out, seeded_outputs,
                            max_rel_error, preserved_state, train_step_equivalence, find_arch_parameters)
        except _Timeout:
            raise
        except Exception as exc:  # noqa: BLE001 - running the simplified module raised
            out.outcome, out.key, out.message = "crash", _exception_key("run", exc), traceback.format_exc()
        finally:
            calls.close()
            out.warnings = _warning_texts(caught)
        if out.outcome in ("ok", "silent") and calls.count == 0:
            out.outcome = "refused"
            out.key = "runs eagerly: " + (_normalize(out.warnings[0]) if out.warnings else "no warning")
        if out.outcome == "ok":
            _between_steps(spec, mode, model, simplified, inputs, simplify, out, hooks)
            out.warnings = _warning_texts(caught)
    if mode == "topo" and out.outcome == "ok":
        try:
            _check_join(spec, captured, simplify, out)
        except _Timeout:
            raise
        except Exception as exc:  # noqa: BLE001 - simplifying the + chain twin raised
            out.outcome, out.key, out.message = "crash", _exception_key("join", exc), traceback.format_exc()


def _edges_and_merges(report: Any) -> tuple[int, int]:
    """The mixed edges a report found and the floating merges it made."""
    return report.edges, sum(len(p.rewrites) for p in report.passes if p.name == "floating_merge")


def _check_join(spec: dict[str, Any], report: Any, simplify: Callable[..., Any], out: Outcome) -> None:
    """Topo contract of a join written other than as ``zipsum``'s ``+`` chain: its mixed edges are found
    and merged as the chain's are (the same model written with ``zipsum``).  Conditional joins decide per
    candidate and are left out.  ``report`` is the first capture's: the twin is built fresh, so neither has
    the changes a generated training loop makes between steps (``drop_candidate`` leaves one candidate)."""
    if spec["join"] in ("zipsum", "cond_ne", "cond_gt"):
        return
    twin = {**{k: v for k, v in spec.items() if k != "join_form"}, "join": "zipsum"}
    model, inputs, _ = build(render(twin), twin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _edges_and_merges(simplify(model, inputs, mode="topo", check=False).report)
    got = _edges_and_merges(report)
    if got != expected:
        form = f" ({spec['join_form']})" if "join_form" in spec else ""
        out.outcome, out.key = "missed", f"topo: {spec['join']}{form} join not rewritten as a + chain"
        out.message = (f"{got[0]} mixed edges found, {got[1]} floating merges; "
                       f"the same model written as a + chain: {expected[0]}, {expected[1]}")


def _same_history(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that runs per call what ``model``'s simplified module has come to run per
    call (a speculated decision on draws that came out otherwise, e.g. at the vertex check): a fresh
    topo simplify of it is then what the simplified module should equal at mixed weights (a unit run
    per call is exact there, its topo rewrite only vertex-exact)."""
    import copy

    from topofx import capture

    clone = copy.deepcopy(model)
    if model in capture.PER_CALL:
        capture.PER_CALL[clone] = set(capture.PER_CALL[model])
    return clone


def _exact_failure(model: nn.Module, simplified: nn.Module, inputs: tuple) -> tuple[str | None, Any]:
    """The first failing category of the exact contract (one train step equal), or None; and the report."""
    from topofx.selfcheck import mismatch
    from topofx.testing import find_arch_parameters, train_step_equivalence

    report = train_step_equivalence(model, simplified, inputs)
    failing = _first_failure(report, ("output", "weight_grad", "arch_grad", "buffer"))
    if failing in ("weight_grad", "arch_grad") and mismatch(
            model, simplified, inputs, arch=find_arch_parameters(model)) is None:
        failing = None  # float32 rounding: equal on float64 copies
    return failing, report


def _between_steps(spec: dict[str, Any], mode: str, model: nn.Module, simplified: nn.Module, inputs: tuple,
                   simplify: Callable[..., Any], out: Outcome, hooks: Sequence[str] | None = None) -> None:
    """What a training loop changes between steps (:data:`_BETWEEN_STEPS`: the generated
    ``step_schedule()``, ``drop_candidate(model)``, ``new_epoch_alphas(model)``), all of the drawn ones at
    once, then the contract at the model's own weights: exact, one train step equal to the changed
    original's; topo (vertex-exact only), the output equal to a fresh topo simplify of the changed
    model's.  A value the graph froze shows as ``silent`` with key ``<mode>: after <change>: ...``,
    the first change that fails alone (the check is run again on fewer changes, only after a failure:
    one comparison per model keeps a run's time down)."""
    drawn = _hooks(spec)
    hooks = drawn if hooks is None else list(hooks)
    if not hooks:
        return
    _after_changes(spec, mode, model, simplified, inputs, simplify, out, hooks)
    if out.outcome == "ok" or len(hooks) == 1 or not out.key.startswith(f"{mode}: after "):
        return
    for k in range(1, len(hooks)):  # which change does it: the first prefix of them that fails
        fewer = Outcome(spec["seed"], mode, "ok", spec=spec)
        _check(spec, mode, simplify, fewer, hooks=hooks[:k])
        if fewer.outcome == out.outcome and fewer.key.startswith(f"{mode}: after "):
            out.key, out.message = fewer.key, fewer.message
            return


def _after_changes(spec: dict[str, Any], mode: str, model: nn.Module, simplified: nn.Module, inputs: tuple,
                   simplify: Callable[..., Any], out: Outcome, hooks: Sequence[str]) -> None:
    from topofx.ir import max_rel_error, preserved_state, run_seeded

    module = _load(render(spec), spec)
    change = "+".join(hooks)
    try:
        with torch.no_grad(), preserved_state(model):
            before = run_seeded(model, inputs, 0)
        torch.manual_seed(1)
        for hook in hooks:
            getattr(module, hook)(*(() if hook == "step_schedule" else (model,)))
        with torch.no_grad(), preserved_state(model):
            after = run_seeded(model, inputs, 0)
    except _Timeout:
        raise
    except Exception as exc:  # noqa: BLE001 - the generated hook or the changed model fails: a fuzzer bug
        out.outcome, out.key, out.message = "invalid", _exception_key(change, exc), traceback.format_exc()
        return
    if max_rel_error(after, before) <= VERTEX_RTOL:
        out.notes.append(f"{change}: the original's output did not change (the check after it is weak)")
    stage = f"run after {change}"
    try:
        if mode == "exact":
            failing, report = _exact_failure(model, simplified, inputs)
            if failing:
                out.outcome, out.key, out.message = "silent", f"exact: after {change}: {failing}", str(report)
                return
        else:
            with torch.no_grad(), preserved_state(model):  # first: this call may make units run per call
                got = run_seeded(simplified, inputs, 0)
            stage = f"fresh simplify after {change}"
            fresh = simplify(_same_history(model), inputs, mode="topo")
            stage = f"run after {change}"
            with torch.no_grad(), preserved_state(model):
                expected = run_seeded(fresh, inputs, 0)
            err = max_rel_error(got, expected)
            if not err <= VERTEX_RTOL:
                out.outcome, out.key = "silent", f"topo: after {change}: output"
                out.message = (f"after {change}, the output differs from a fresh topo simplify's: max relative "
                               f"error {err:.3e} > {VERTEX_RTOL:g}")
                return
        calls = _GraphCalls(simplified)  # (a recapture replaced the graph module: count on the new one)
        try:
            with torch.no_grad(), preserved_state(model):
                run_seeded(simplified, inputs, 0)
        finally:
            calls.close()
    except _Timeout:
        raise
    except Exception as exc:  # noqa: BLE001
        out.outcome, out.key, out.message = "crash", _exception_key(stage, exc), traceback.format_exc()
        return
    if calls.count == 0:
        reason = getattr(getattr(simplified, "report", None), "fallback", None)
        out.outcome, out.key = "refused", f"runs eagerly after {change}: " + _normalize(str(reason or "no graph"))
        out.message = str(reason)


def _check_topo(model, simplified, inputs, set_vertex, spec, out, seeded_outputs, max_rel_error,
                preserved_state, train_step_equivalence, find_arch_parameters) -> None:
    """Topo contract: runs at the model's own weights; vertex-exact output and weight gradients
    (judged as the exact contract's: :func:`topofx.selfcheck.mismatch`)."""
    from topofx.selfcheck import mismatch

    alphas = find_arch_parameters(model)
    model.train()
    simplified.train()
    with preserved_state(model, tensors=alphas):
        torch.manual_seed(0)
        result = simplified(*inputs)
        _loss(result).backward()
        if not all(torch.isfinite(t).all() for t in _leaves(result)):
            out.outcome, out.key, out.message = "silent", "topo: nonfinite_output", "non-finite output at mixed weights"
            return
    for t in alphas + list(model.parameters()):
        t.grad = None
    if set_vertex is None:
        out.notes.append(f"vertex check skipped: {spec['weights']} weights cannot be one-hot")
        return
    with preserved_state(model, tensors=alphas):
        set_vertex(_vertex_choice(spec["seed"]))
        got, expected = seeded_outputs(model, simplified, *inputs)
        err = max_rel_error(got, expected)
        if not err <= VERTEX_RTOL:
            out.outcome, out.key = "silent", "topo: vertex_output"
            out.message = f"vertex forward differs: max relative error {err:.3e} > {VERTEX_RTOL:g}"
            return
        report = train_step_equivalence(model, simplified, inputs)
        grads = [c for c in report.failures if c.category == "weight_grad"]
        if grads and mismatch(model, simplified, inputs, arch=alphas, check_arch=False) is not None:
            out.outcome, out.key = "silent", "topo: vertex_weight_grad"
            worst = max(grads, key=lambda c: c.rel_error)
            out.message = (f"vertex weight gradients differ on {len(grads)} tensors; worst {worst.name}: "
                           f"rel {worst.rel_error:.3e}\n{report}")


def _leaves(obj: Any) -> list[torch.Tensor]:
    from topofx.testing import flatten_tensors

    return [t for _, t in flatten_tensors(obj) if t.is_floating_point()]


def _loss(obj: Any) -> torch.Tensor:
    """A scalar that every output element reaches (a fixed pseudo-random weighting)."""
    total = None
    for i, t in enumerate(_leaves(obj)):
        w = torch.linspace(-1.0, 1.0 + i, t.numel(), dtype=t.dtype).view(t.shape)
        total = (t * w).sum() if total is None else total + (t * w).sum()
    assert total is not None, "the model returned no floating tensor"
    return total


def _warning_texts(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    texts: list[str] = []
    for w in caught:
        text = str(w.message)
        if text not in texts:
            texts.append(text)
    return texts


def check(seed: int, modes: Sequence[str] = MODES, *, simplify: Callable[..., Any] | None = None,
          timeout: float | None = 60.0, v2: bool = True) -> list[Outcome]:
    """Generate model ``seed`` and check it in each of ``modes`` (a fresh model per mode); ``v2=False``:
    without the capture-v2 constructs (:func:`_draw_spec`)."""
    spec = _draw_spec(seed, v2)
    return [check_spec(spec, mode, simplify=simplify, timeout=timeout) for mode in modes]


# ---------------------------------------------------------------------------------------------
# minimizing a failure
# ---------------------------------------------------------------------------------------------
def _shrinks(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Simpler variants of ``spec``, most structural first: fewer cells, nodes, layers and
    candidates, then the default of every other style dimension."""
    def with_(**changes: Any) -> dict[str, Any]:
        return {**spec, **changes}

    cell = spec["cell"]
    if cell == "chain":
        for i in range(len(spec["layers"]) - 1, -1, -1):
            if len(spec["layers"]) > 1:
                yield with_(layers=spec["layers"][:i] + spec["layers"][i + 1:])
        for i, (c_out, stride) in enumerate(spec["layers"]):
            if stride != 1:
                yield with_(layers=[*spec["layers"][:i], [c_out, 1], *spec["layers"][i + 1:]])
    else:
        if spec["cells"] > 1:
            last = spec["cells"] - 1
            kept = [r for r in spec["reductions"] if r < last]
            yield with_(cells=last, reductions=kept if len(kept) < last or cell == "nb201" else kept[:-1])
        for r in spec["reductions"]:
            yield with_(reductions=[x for x in spec["reductions"] if x != r])
        size_key = "nodes" if cell == "nb201" else "steps"
        if spec[size_key] > (2 if cell == "nb201" else 1):
            smaller = with_(**{size_key: spec[size_key] - 1})
            if "projected" in spec:
                n_edges = sum(2 + i for i in range(smaller["steps"]))
                smaller["projected"] = [[e, o] for e, o in spec["projected"] if e < n_edges]
            yield smaller
    if len(spec["ops"]) > 1:
        for i in range(len(spec["ops"])):
            smaller = with_(ops=spec["ops"][:i] + spec["ops"][i + 1:])
            if "projected" in spec:
                smaller["projected"] = [[e, o - (o > i)] for e, o in spec["projected"] if o != i]
            yield smaller
    if spec.get("projected"):
        yield with_(projected=[])
    default_flavor = DEFAULT_FLAVOR[cell]
    if spec["flavor"] != default_flavor:
        yield {k: v for k, v in with_(flavor=default_flavor).items() if k != "projected"}
    if spec.get("join_form", JOIN_FORMS.get(spec["join"], ("",))[0]) != JOIN_FORMS.get(spec["join"], ("",))[0]:
        yield with_(join_form=JOIN_FORMS[spec["join"]][0])
    for dim, value in DEFAULTS.items():
        if spec.get(dim, value) != value:
            yield {k: v for k, v in with_(**{dim: value}).items() if not (dim == "join" and k == "join_form")}
    if spec["C"] != 4:
        yield with_(C=4, **({"stem": 4} if cell == "chain" else {}))


def minimize(spec: dict[str, Any], mode: str, outcome: str, key: str, *,
             simplify: Callable[..., Any] | None = None, timeout: float | None = 60.0,
             budget_s: float = 90.0) -> tuple[dict[str, Any], Outcome]:
    """Greedily simplify ``spec`` while ``check_spec`` still gives the same failure class.

    Returns the smallest spec found and its outcome (the reproducer's report).  ``budget_s`` bounds
    the time spent, so a slow class still gets a (less minimal) reproducer."""
    deadline = time.perf_counter() + budget_s
    best = check_spec(spec, mode, simplify=simplify, timeout=timeout)
    changed = True
    while changed and time.perf_counter() < deadline:
        changed = False
        for candidate in _shrinks(spec):
            if time.perf_counter() >= deadline:
                break
            result = check_spec(candidate, mode, simplify=simplify, timeout=timeout)
            if result.outcome == outcome and result.key == key:
                spec, best, changed = candidate, result, True
                break
    return spec, best


# ---------------------------------------------------------------------------------------------
# running many models
# ---------------------------------------------------------------------------------------------
ROW_DIMENSIONS = ("flavor", "cell", *[d for d in DIMENSIONS if d != "flavor"], "join_form", "ops", *V2_DIMENSIONS)


@dataclass
class Summary:
    """All outcomes of a run, the failure classes and where their reproducers were written."""

    outcomes: list[Outcome]
    reproducers: dict[tuple[str, str, str], Path] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(o.failed for o in self.outcomes)

    def classes(self, failures_only: bool = True) -> dict[tuple[str, str, str], list[Outcome]]:
        """Outcomes grouped by failure class (``(mode, outcome, key)``), largest class first."""
        groups: dict[tuple[str, str, str], list[Outcome]] = defaultdict(list)
        for o in self.outcomes:
            if o.outcome != "ok" and (o.failed or not failures_only):
                groups[o.failure_class].append(o)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    def table(self) -> str:
        """Per style dimension value: models drawn with it and their outcomes (one per model and mode)."""
        kinds = ("ok", "refused", "silent", "missed", "crash", "invalid")
        shown = [k for k in kinds if k not in ("missed", "invalid") or any(o.outcome == k for o in self.outcomes)]
        rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
        models: dict[tuple[str, str], set] = defaultdict(set)
        for o in self.outcomes:
            for dim in ROW_DIMENSIONS:
                values = o.spec.get(dim)
                for v in values if isinstance(values, list) else [values]:
                    if v is not None:
                        rows[(dim, str(v))][o.outcome] += 1
                        models[(dim, str(v))].add(o.seed)
            rows[("mode", o.mode)][o.outcome] += 1
            models[("mode", o.mode)].add(o.seed)
        head = f"{'dimension':<10} {'value':<20} {'models':>6} " + " ".join(f"{k:>7}" for k in shown)
        lines = [head, "-" * len(head)]
        order = ["mode", *ROW_DIMENSIONS]
        for dim, value in sorted(rows, key=lambda dv: (order.index(dv[0]), _value_order(*dv))):
            c = rows[(dim, value)]
            lines.append(f"{dim:<10} {value:<20} {len(models[(dim, value)]):>6} " + " ".join(f"{c[k]:>7}" for k in shown))
        total = Counter(o.outcome for o in self.outcomes)
        lines.append("-" * len(head))
        lines.append(f"{'total':<10} {'':<20} {len({o.seed for o in self.outcomes}):>6} "
                     + " ".join(f"{total[k]:>7}" for k in shown))
        return "\n".join(lines)

    def class_lines(self) -> str:
        """One line per failure and refusal class: count, key, example seed, reproducer."""
        lines = []
        for (mode, outcome, key), items in self.classes(failures_only=False).items():
            path = self.reproducers.get((mode, outcome, key))
            seeds = ", ".join(str(o.seed) for o in items[:5]) + (", ..." if len(items) > 5 else "")
            where = f" -> {path}" if path else ""
            lines.append(f"{len(items):5d}  {mode:<5} {outcome:<8} {key}  [seeds {seeds}]{where}")
        return "\n".join(lines)


def _value_order(dim: str, value: str) -> int:
    if dim == "ops":
        pool = OP_POOL + CHAIN_OPS
        return pool.index(value) if value in pool else len(pool)
    if dim == "join_form":
        forms = list(dict.fromkeys(f for fs in JOIN_FORMS.values() for f in fs))
        return forms.index(value) if value in forms else len(forms)
    values = DIMENSIONS.get(dim) or V2_DIMENSIONS.get(dim) or (MODES if dim == "mode" else ("darts", "nb201", "chain"))
    return values.index(value) if value in values else len(values)


def _model_seed(seed: int, i: int) -> int:
    return seed * 100_000 + i


def _check_task(args: tuple[int, tuple[str, ...], float | None, bool]) -> list[Outcome]:
    seed, modes, timeout, v2 = args
    return check(seed, modes, timeout=timeout, v2=v2)


def _init_worker() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")


def run(n: int, seed: int = 0, modes: Sequence[str] = MODES, *, jobs: int = 1, timeout: float | None = 60.0,
        out: str | Path | None = "fuzz-failures", progress: bool = True,
        simplify: Callable[..., Any] | None = None, minimize_budget_s: float = 90.0, v2: bool = True) -> Summary:
    """Check ``n`` generated models in ``modes``; minimize and write one reproducer per failure class
    to ``out`` (``None``: no reproducers).  ``jobs > 1`` checks models in worker processes
    (``simplify`` must then be the default).  ``v2=False``: without the capture-v2 constructs."""
    from tqdm import tqdm

    seeds = [_model_seed(seed, i) for i in range(n)]
    tasks = [(s, tuple(modes), timeout, v2) for s in seeds]
    outcomes: list[Outcome] = []
    bar = tqdm(total=n, desc="fuzz", unit="model", disable=not progress, file=sys.stderr)
    if jobs > 1:
        if simplify is not None:
            raise ValueError("a custom simplify runs in this process only: use jobs=1")
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs, initializer=_init_worker, maxtasksperchild=50) as pool:
            for result in pool.imap_unordered(_check_task, tasks):
                outcomes += result
                bar.update(1)
                bar.set_postfix(_postfix(outcomes))
    else:
        for s in seeds:
            outcomes += check(s, modes, simplify=simplify, timeout=timeout, v2=v2)
            bar.update(1)
            bar.set_postfix(_postfix(outcomes))
    bar.close()
    outcomes.sort(key=lambda o: (o.seed, MODES.index(o.mode) if o.mode in MODES else 0))
    summary = Summary(outcomes)
    if out is not None:
        _write_reproducers(summary, Path(out), simplify, timeout, minimize_budget_s, progress)
    return summary


def _postfix(outcomes: list[Outcome]) -> dict[str, int]:
    c = Counter(o.outcome for o in outcomes)
    return {k: c[k] for k in ("ok", "refused", "silent", "missed", "crash") if c[k]}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "failure"


def _write_reproducers(summary: Summary, out: Path, simplify: Callable[..., Any] | None,
                       timeout: float | None, budget_s: float, progress: bool) -> None:
    """Minimize the first model of each failure class and write ``<class>.py`` and ``<class>.txt``."""
    classes = summary.classes(failures_only=True)
    if not classes:
        return
    out.mkdir(parents=True, exist_ok=True)
    for (mode, outcome, key), items in classes.items():
        first = items[0]
        if progress:
            print(f"minimizing [{mode} {outcome}] {key} (seed {first.seed}) ...", file=sys.stderr)
        if outcome == "invalid":
            spec, result = first.spec, first
        else:
            spec, result = minimize(first.spec, mode, outcome, key, simplify=simplify, timeout=timeout,
                                    budget_s=budget_s)
        stem = f"{mode}-{outcome}-{_slug(key)}"
        py = out / f"{stem}.py"
        py.write_text(reproducer_source(spec, mode))
        (out / f"{stem}.txt").write_text(
            f"failure class: mode={mode} outcome={outcome}\n  {key}\n"
            f"count: {len(items)} of {len({o.seed for o in summary.outcomes})} models "
            f"(seeds {', '.join(str(o.seed) for o in items[:20])}{' ...' if len(items) > 20 else ''})\n"
            f"reproducer: {py.name} (python {py.name}); minimized from seed {first.seed}\n"
            f"original spec: {json.dumps(first.spec, sort_keys=True)}\n"
            f"minimized spec: {json.dumps(spec, sort_keys=True)}\n\n"
            + ("warnings:\n" + "\n".join(f"  {w}" for w in result.warnings) + "\n\n" if result.warnings else "")
            + f"{result.message}\n")
        summary.reproducers[(mode, outcome, key)] = py


def reproducer_source(spec: dict[str, Any], mode: str) -> str:
    """The generated model plus a ``__main__`` block that runs ``mode``'s check and prints the result."""
    main_block = [
        "", "",
        'if __name__ == "__main__":',
        "    import topofx",
        "    from topofx.testing import train_step_equivalence",
        "",
        "    model, inputs = build()",
        f'    simplified = topofx.simplify(model, inputs, mode="{mode}")',
        "    print(simplified.report)",
    ]
    hooks = _hooks(spec)
    if mode == "exact":
        main_block += ["    print(train_step_equivalence(model, simplified, inputs))"]
        for hook in hooks:  # what a training loop changes between steps; the graph must follow
            main_block += ["    torch.manual_seed(1)", f"    {hook}({'' if hook == 'step_schedule' else 'model'})",
                           f"    print('after {hook}:', train_step_equivalence(model, simplified, inputs))"]
    else:
        main_block += [
            "    from topofx.ir import max_rel_error",
            "    from topofx.testing import find_arch_parameters, seeded_outputs",
            "",
            "    torch.manual_seed(0)",
            "    simplified(*inputs)  # runs at the model's own (mixed) weights",
            "    mixed = [a.detach().clone() for a in find_arch_parameters(model)]",
            "    if set_vertex is not None:",
            f"        set_vertex(model, lambda row, n: random.Random({spec['seed']} * 7919 + row).randrange(n))",
            "        model.train()",
            "        simplified.train()",
            "        got, expected = seeded_outputs(model, simplified, *inputs)",
            "        print('vertex forward max relative error', max_rel_error(got, expected), '(contract: <= 1e-5)')",
            "        report = train_step_equivalence(model, simplified, inputs)",
            "        print('vertex weight gradients:', [str(c) for c in report.failures if c.category == 'weight_grad'] or 'equal')",
        ]
        if hooks:
            main_block += ["    with torch.no_grad():  # back to the mixed weights",
                           "        for a, value in zip(find_arch_parameters(model), mixed):",
                           "            a.copy_(value)"]
        for hook in hooks:  # a topo graph is vertex-exact only: compare with a fresh topo simplify after the change
            main_block += [
                "    torch.manual_seed(1)", f"    {hook}({'' if hook == 'step_schedule' else 'model'})",
                "    fresh = topofx.simplify(_same_history(model), inputs, mode=\"topo\")",
                "    got, expected = seeded_outputs(fresh, simplified, *inputs)",
                f"    print('after {hook}: max relative error against a fresh topo simplify', max_rel_error(got, expected))"]
        main_block.insert(3, "    import random")
        if hooks:
            main_block.insert(3, "    from topofx.fuzz import _same_history  # a deep copy that runs per call what model has come to")
    return render(spec) + "\n".join(main_block) + "\n"


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None, prog: str = "python -m topofx.fuzz") -> int:
    """Run the fuzzer; exit status 1 if any model is ``silent``, ``crash`` or ``invalid``, else 0."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Generate random small supernets in the coding styles of public NAS codebases "
        "and check topofx's contracts on each (exact: one train step equal; topo: vertex-exact).")
    parser.add_argument("--n", type=int, default=100, help="number of models (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run: model i has seed SEED*100000+i")
    parser.add_argument("--mode", default="exact,topo", help="modes to check, comma-separated (default exact,topo)")
    parser.add_argument("--out", default="fuzz-failures", help="folder for minimized reproducers (default fuzz-failures/)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per model and mode (default 60)")
    parser.add_argument("--minimize-budget", type=float, default=90.0,
                        help="seconds spent minimizing each failure class (default 90)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--v1", action="store_true",
                        help="without the capture-v2 constructs (custom autograd Functions, scheduled scalars, type "
                        "checks, alphas in lists, candidates set to None, draws from Python's and NumPy's generators): "
                        "the models the seeds gave before them")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    modes = tuple(m.strip() for m in args.mode.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        print(f"{prog}: error: --mode takes exact, topo or exact,topo; got {args.mode!r}", file=sys.stderr)
        return 2
    if args.n < 1 or args.jobs < 1:
        print(f"{prog}: error: --n and --jobs must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    summary = run(args.n, args.seed, modes, jobs=args.jobs, timeout=args.timeout, out=args.out,
                  progress=not args.no_progress, minimize_budget_s=args.minimize_budget, v2=not args.v1)
    print(summary.table())
    classes = summary.class_lines()
    if classes:
        print("\nclasses (count, mode, outcome, key, example seeds, reproducer):")
        print(classes)
    bad = sum(o.failed for o in summary.outcomes)
    print(f"\n{bad} failing (silent/missed/crash) of {len(summary.outcomes)} model-mode checks"
          + (f"; reproducers in {args.out}/" if summary.reproducers else ""))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
