"""Issue 22, construct 7: mixed edges whose join is written other than as a ``+`` chain.

Public search code writes ``y = sum_k w_k * op_k(x)`` as a reduction over stacked candidates (NNI's
DARTS layer: ``torch.sum(torch.stack(outs) * w.view(-1, 1, 1, 1, 1), 0)``, with a zero weight slice
when "none" is a candidate; NNI 3.0's cell instead softmaxes over K+1 entries and ``torch.cat``s a zero
block onto the stack for "none"), as ``einsum``/``tensordot``/``matmul`` over the stack, or as an in-place
``add_`` accumulation.  Each syntax below is one small DARTS-like supernet (C=4, 8x8, one cell of three
mixed edges: node 1 = e(x), node 2 = e(x) + e(node 1)), and for each:

1. ``simplify`` finds its three mixed edges (``report.edges``, read by topology after
   ``passes.canonical_joins`` rewrote the join into a ``+`` chain);
2. exact mode: one training step equals the original's -- outputs, every weight and architecture
   gradient, BN running statistics;
3. topo mode: prefix sharing and floating merge rewrote the edges, and at one-hot architecture
   weights the output and weight gradients equal the original's (vertex-exactness).

Joins that do not prove to be weighted sums over architecture weights stay as they are.
"""
from __future__ import annotations

import copy
import functools
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx.ir import preserved_state
from topofx.testing import assert_train_step_equivalent, set_one_hot, train_step_equivalence

C, EDGES = 4, 3


def relu_conv_bn(k: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, k, padding=k // 2, bias=False), nn.BatchNorm2d(C, affine=False))


class Zero(nn.Module):
    def forward(self, x):
        return x.mul(0.)


def join(syntax: str, w: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
    """``sum_k w[k] * outs[k]``, written in ``syntax``."""
    if syntax in ("nni", "nni_none", "nni_drop_path"):
        return torch.sum(torch.stack(outs) * w.view(-1, 1, 1, 1, 1), 0)
    if syntax in ("nni3", "nni3_none"):  # NNI 3.0's cell: the zero candidate as a zero block of the stack
        results = torch.stack(outs)
        shape = [-1] + [1] * (len(results.size()) - 1)
        if w.size(0) == results.size(0) + 1:
            results = torch.cat((results, torch.zeros_like(results[:1])), 0)
        return torch.sum(results * w.view(*shape), 0)
    if syntax == "nni3_zeros_first":  # a fixed-shape zero block (traced as a constant) ahead of the stack
        results = torch.cat((torch.zeros(1, 2, C, 8, 8), torch.stack(outs)), 0)
        return torch.sum(results * w.view(-1, 1, 1, 1, 1), 0)
    if syntax == "stack_last":
        return (torch.stack(outs, dim=-1) * w).sum(-1)
    if syntax == "stack_terms":
        return torch.stack([w[k] * out for k, out in enumerate(outs)]).sum(dim=0)
    if syntax == "einsum":
        return torch.einsum('k,knchw->nchw', w, torch.stack(outs))
    if syntax == "einsum_ellipsis":
        return torch.einsum('...k,k->...', torch.stack(outs, -1), w)
    if syntax == "tensordot":
        return torch.tensordot(w, torch.stack(outs), dims=1)
    if syntax == "matmul_flat":
        stacked = torch.stack(outs)
        return (w @ stacked.flatten(1)).view(stacked.shape[1:])
    if syntax == "matmul_last":
        return torch.matmul(torch.stack(outs, dim=-1), w)
    if syntax == "add_":
        out = w[0] * outs[0]
        for k in range(1, len(outs)):
            out.add_(w[k] * outs[k])
        return out
    if syntax == "reduce":  # a + chain already: an edge's sum that becomes a term of the node's ``e1 + e2``
        return functools.reduce(operator.add, [w[k] * out for k, out in enumerate(outs)])
    if syntax == "add_alpha":
        out = w[0] * outs[0]
        for k in range(1, len(outs)):
            out = torch.add(out, w[k] * outs[k], alpha=0.5)
        return out
    raise ValueError(syntax)


class MixedOp(nn.Module):
    def __init__(self, none: bool):
        super().__init__()
        self.candidates = nn.ModuleList([nn.Identity(), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                         relu_conv_bn(1), relu_conv_bn(3)] + ([Zero()] if none else []))

    def forward(self, x, w, syntax):
        if syntax == "nni_none":  # "none" has no alpha: a zero weight slice for its zero output
            w = torch.cat([w, torch.zeros(1)])
        outs = [op(x) for op in self.candidates]
        if syntax == "nni_drop_path":  # DARTS's drop-path, in place, into the candidates before they are stacked
            for out in outs[1:]:
                mask = out.new_empty(out.size(0), 1, 1, 1).bernoulli_(0.8)
                out.div_(0.8)
                out.mul_(mask)
        return join(syntax, w, outs)


class Supernet(nn.Module):
    """A stem, one cell (node 1 = e0(x), node 2 = e1(x) + e2(node 1)), a linear head."""

    def __init__(self, syntax: str):
        super().__init__()
        self.syntax = syntax
        none = syntax == "nni_none"
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.edges = nn.ModuleList([MixedOp(none) for _ in range(EDGES)])
        # NNI 3.0 softmaxes over K+1 entries, "none" included, and pads the stack with a zero block
        self.alphas = nn.Parameter(1e-3 * torch.randn(EDGES, 5 if syntax in ("nni3_none", "nni3_zeros_first") else 4))
        self.head = nn.Linear(C, 10)

    def arch_parameters(self):
        return [self.alphas]

    def forward(self, x):
        weights = F.softmax(self.alphas, dim=-1)
        x = self.stem(x)
        n1 = self.edges[0](x, weights[0], self.syntax)
        n2 = self.edges[1](x, weights[1], self.syntax) + self.edges[2](n1, weights[2], self.syntax)
        return self.head(F.adaptive_avg_pool2d(n2, 1).flatten(1))


SYNTAXES = ["nni", "nni_none", "nni3", "nni3_none", "nni3_zeros_first", "stack_last", "stack_terms", "einsum", "einsum_ellipsis", "tensordot",
            "matmul_flat", "matmul_last", "add_", "add_alpha"]
PICKS = [lambda r, n: 3, lambda r, n: (r + 2) % n]  # conv3x3 everywhere; conv1x1 / conv3x3 / identity


def _pair(syntax: str, mode: str):
    """``(reference, simplified, x)``: the reference is a copy taken before ``simplify``."""
    torch.manual_seed(0)
    model, x = Supernet(syntax), torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model)
    return reference, topofx.simplify(model, (x,), mode=mode, strict=True), x


@pytest.fixture(scope="module", params=SYNTAXES)
def syntax(request):
    return request.param


@pytest.mark.parametrize("mode", ["exact", "topo"])
def test_finds_the_mixed_edges_and_is_exact(syntax, mode):
    reference, simple, x = _pair(syntax, mode)
    report = simple.report
    assert report.fallback is None and report.edges == EDGES, str(report)
    canonical = next(p for p in report.passes if p.name == "canonical_joins")
    assert len(canonical.rewrites) >= EDGES and not canonical.rejected, str(report)
    if mode == "exact":
        report = assert_train_step_equivalent(reference, simple, (x,))
        counts = report.counts()
        assert counts["arch_grad"] == 1 and counts["buffer"] == sum(1 for _ in reference.buffers())
        assert counts["weight_grad"] == sum(1 for p in reference.parameters() if p is not reference.alphas)
        return
    applied = {p.name for p in report.passes if p.rewrites}
    assert {"prefix_sharing", "floating_merge"} <= applied, str(report)
    for pick in PICKS:
        with preserved_state(reference, tensors=[reference.alphas]):
            set_one_hot([reference.alphas], pick)  # the simplified copy gets them by name
            vertex = train_step_equivalence(reference, simple, (x,))
            bad = [f"{c.category} {c.name}: {c.rel_error:.2e}" for c in vertex.comparisons
                   if not c.ok and c.category in ("output", "weight_grad")]
            assert not vertex.problems and not bad, bad


def test_candidates_written_in_place_before_the_stack():
    """Drop-path writes into the candidate outputs before they are stacked: the chain reads their final
    values, as the stack does (the first reads of their shape do not count)."""
    reference, simple, x = _pair("nni_drop_path", "exact")
    assert simple.report.edges == EDGES, str(simple.report)
    assert_train_step_equivalent(reference, simple, (x,))


@pytest.mark.parametrize("syntax", ["einsum", "add_", "reduce"])
def test_derive_reads_the_edges(syntax):
    torch.manual_seed(0)
    model, x = Supernet(syntax), torch.randn(2, 3, 8, 8)
    child = topofx.derive(model, (x,), genotype=[3, 2, 0])
    assert [c.index for c in child.meta["topofx_choices"]] == [3, 2, 0]


class NotAJoin(nn.Module):
    """Weighted reductions that are no mixed edges, or not provably: weights computed from the input
    (attention), an accumulation read before its last ``add_``, an einsum that transposes, a stack
    changed in place before its reduction, a stack padded with a block of ones or with a zero block
    written in place."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([relu_conv_bn(1), relu_conv_bn(3)])
        self.alpha = nn.Parameter(torch.zeros(2))
        self.kept = []

    def forward(self, x):
        outs = [conv(x) for conv in self.convs]
        attention = F.softmax(x.mean((0, 2, 3))[:2], dim=0)
        a = torch.einsum('k,knchw->nchw', attention, torch.stack(outs))
        w = F.softmax(self.alpha, dim=0)
        b = w[0] * outs[0]
        early = b * 2  # reads the accumulation before it is complete
        b.add_(w[1] * outs[1])
        c = torch.einsum('k,knchw->nhwc', w, torch.stack(outs)).permute(0, 3, 1, 2)
        stacked = torch.stack(outs)
        stacked.mul_(2.0)
        d = torch.sum(stacked * w.view(-1, 1, 1, 1, 1), 0)
        w3 = F.softmax(torch.cat([self.alpha, self.alpha[:1]]), dim=0)
        ones = torch.cat((torch.stack(outs), torch.ones_like(outs[0])[None]), 0)
        e = torch.sum(ones * w3.view(-1, 1, 1, 1, 1), 0)
        padded = torch.stack(outs)
        block = torch.zeros_like(padded[:1])
        block.add_(1.0)
        f = torch.sum(torch.cat((padded, block), 0) * w3.view(-1, 1, 1, 1, 1), 0)
        return a + b + early + c + d + e + f


def test_leaves_other_reductions_alone():
    torch.manual_seed(0)
    model, x = NotAJoin(), torch.randn(2, C, 8, 8)
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="exact", strict=True)
    canonical = next(p for p in simple.report.passes if p.name == "canonical_joins")
    assert not canonical.rewrites and not canonical.rejected, str(simple.report)
    assert_train_step_equivalent(reference, simple, (x,))
