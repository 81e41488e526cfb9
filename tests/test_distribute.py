"""``passes.distribute``: candidates that end in a skip sum, ``w_k * (op_k(x) + x)``.

A MobileNet / ProxylessNAS-style supernet: each searchable layer mixes inverted-residual blocks
(1x1 expand -> kxk depthwise -> 1x1 project, BN after each, ReLU6 after the first two) that end in
``x + block(x)`` when stride and width allow, weighted by ``softmax(alpha)`` and summed the way a
weighted-sum helper accumulates them (``res = out_0 * w[0]; res = res + out_k * w[k]``).  Before the
pass, floating merge saw candidates ending in an add and merged only the layers without a skip.

Checked: topo mode merges every layer (the skip layers through distribution); the pass alone is
exact in real arithmetic (one training step at mixed weights: outputs, weight and architecture
gradients, BN statistics); topo mode is vertex-exact; and skip sums the pass cannot prove (a
summand written in place, a broadcast summand, a single skip candidate) are left as they were.
"""
from __future__ import annotations

import copy
import functools
import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx.capture import trace
from topofx.ir import preserved_state
from topofx.passes import distribute, functional_modules
from topofx.rewrite import run_to_fixpoint
from topofx.topology import weight_provenance
from topofx.testing import assert_eval_equivalent, assert_train_step_equivalent, set_one_hot, train_step_equivalence

CHOICES = [(3, 3), (3, 5), (6, 3), (6, 5)]  # (expand ratio, depthwise kernel)
WIDTHS = [(8, 8, 2), (8, 8, 1), (8, 8, 1), (8, 16, 2), (16, 16, 1)]  # (in, out, stride) per layer
SKIP_LAYERS = sum(1 for i, o, s in WIDTHS if i == o and s == 1)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU6(inplace=True)] if act else []))


class InvertedResidual(nn.Sequential):
    """expand -> depthwise -> project; ``x + block(x)`` when the shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, k: int):
        hidden = cin * expand
        super().__init__(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, k, stride, groups=hidden),
                         conv_bn(hidden, cout, 1, act=False))
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        return x + super().forward(x) if self.skip else super().forward(x)


def weighted(items: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """A weighted-sum helper's accumulation."""
    res = items[0] * weights[0]
    for item, w in zip(items[1:], weights[1:]):
        res = res + item * w
    return res


class MixedLayer(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleList([InvertedResidual(cin, cout, stride, e, k) for e, k in CHOICES])
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(CHOICES)))

    def forward(self, x):
        return weighted([op(x) for op in self.ops], F.softmax(self.alpha, -1))


class Supernet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.layers = nn.Sequential(*[MixedLayer(*w) for w in WIDTHS])
        self.head = nn.Linear(16, 10)

    def arch_parameters(self):
        return [m.alpha for m in self.layers]

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def _pair(mode: str, model: nn.Module | None = None):
    torch.manual_seed(0)
    model = model or Supernet()
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model)
    return reference, topofx.simplify(model, (x,), mode=mode, strict=True), x


def _rewrites(report, name: str) -> list:
    return next(p for p in report.passes if p.name == name).rewrites


def test_topo_merges_the_skip_layers():
    """Every layer's candidates are merged, those that end in ``x + block(x)`` included."""
    _, simple, _ = _pair("topo")
    report = simple.report
    assert report.fallback is None and report.edges == len(WIDTHS), str(report)
    merged = {e for r in _rewrites(report, "floating_merge") for e in r.edges}
    assert len(merged) == len(WIDTHS), f"{len(merged)} of {len(WIDTHS)} layers merged\n{report}"
    assert len(_rewrites(report, "distribute")) == SKIP_LAYERS, str(report)


def test_topo_merges_both_projection_groups_of_every_layer():
    """Each expand ratio's projections read hidden tensors of their own width: two groups per layer.
    Both merge (the layer's sum rebuilt once, after both); before, the sum took one group per round
    and weight folding, later in the round, folded the other group's weights into its BNs."""
    _, simple, _ = _pair("topo")
    report = simple.report
    groups = Counter(e for r in _rewrites(report, "floating_merge") for e in r.edges)
    expand_ratios = len({e for e, _ in CHOICES})
    assert sorted(groups.values()) == [expand_ratios] * len(WIDTHS), f"{groups}\n{report}"
    assert not _rewrites(report, "weight_folding"), str(report)  # no candidate BN is left to fold


class ReducedNode(nn.Module):
    """Two mixed layers, on the stem's output and on its double, whose weighted terms one
    ``functools.reduce`` sums: one sum holding two edges."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([MixedLayer(8, 8, 2), MixedLayer(8, 8, 2)])

    def forward(self, x):
        terms = []
        for layer, h in zip(self.layers, (x, 2 * x)):
            w = F.softmax(layer.alpha, -1)
            terms += [w[k] * op(h) for k, op in enumerate(layer.ops)]
        return functools.reduce(operator.add, terms)


def test_topo_merges_every_edge_of_one_sum():
    """Both edges of the one sum merge both their groups (the sum rebuilt once, after all four);
    before, the second edge waited a round and weight folding took its candidates apart."""
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 8, 3), ReducedNode())
    reference, simple, x = _pair("topo", model)
    report = simple.report
    groups = Counter(e for r in _rewrites(report, "floating_merge") for e in r.edges)
    assert report.edges == 2 and sorted(groups.values()) == [2, 2], f"{groups}\n{report}"
    assert not _rewrites(report, "weight_folding"), str(report)
    alphas = [layer.alpha for layer in reference[1].layers]
    with preserved_state(reference, tensors=alphas):
        set_one_hot(alphas, lambda r, n: n - 1)
        vertex = train_step_equivalence(reference, simple, (x,))
    bad = [f"{c.category} {c.name}: {c.rel_error:.2e}" for c in vertex.comparisons
           if not c.ok and c.category in ("output", "weight_grad")]  # merged BNs keep their own statistics
    assert not vertex.problems and not bad, bad


def test_edges_read_weights_through_slices():
    """The helper weights ``items[0]`` by ``weights[0]`` and zips the rest with ``weights[1:]``: every
    candidate of a layer belongs to its edge, at its index of the one row (``w[1:][k]`` is ``w[1 + k]``)."""
    torch.manual_seed(0)
    model, x = Supernet(), torch.randn(2, 3, 32, 32)
    edges = topofx.analyze(trace(model, (x,)).graph, model).edges
    assert [len(e.candidates) for e in edges] == [len(CHOICES)] * len(WIDTHS)
    assert all(not e.other_terms for e in edges)
    assert all(weight_provenance(c.weight)[1] == k for e in edges for k, c in enumerate(e.candidates))
    child = topofx.derive(model, (x,), genotype=[1, 0, 3, 2, 0])
    assert [c.index for c in child.meta["topofx_choices"]] == [1, 0, 3, 2, 0]


def test_distribution_alone_is_exact_in_real_arithmetic():
    """The pass alone, at mixed weights: one training step equals the original's."""
    torch.manual_seed(0)
    model, x = Supernet(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_()
    gm = trace(model, (x,))
    runs = run_to_fixpoint(gm, model, [functional_modules, distribute], (x,))
    done = next(r for r in runs if r.name == "distribute")
    assert len(done.rewrites) == SKIP_LAYERS and not done.rejected, done
    skips = [n for n in gm.graph.nodes if n.op == "call_function" and n.name in {r.result for r in done.rewrites}]
    assert len(skips) == SKIP_LAYERS  # one (sum of weights) * x term per skip layer
    report = assert_train_step_equivalent(model, gm, (x,), arch_params=model.arch_parameters(),
                                          candidate_arch_params=model.arch_parameters())
    assert report.counts()["arch_grad"] == len(WIDTHS)
    assert report.counts()["buffer"] == sum(1 for _ in model.buffers())
    assert_eval_equivalent(model, gm, (x,))


def test_exact_mode_does_not_distribute():
    reference, simple, x = _pair("exact")
    assert all(p.name != "distribute" for p in simple.report.passes), str(simple.report)
    assert_train_step_equivalent(reference, simple, (x,))


def assert_vertex_exact(reference: nn.Module, simple: nn.Module, x: torch.Tensor, pick) -> None:
    """With one-hot alphas (``pick``) the topo model's output and weight gradients are the original's."""
    with preserved_state(reference, tensors=reference.arch_parameters()):
        set_one_hot(reference.arch_parameters(), pick)
        vertex = train_step_equivalence(reference, simple, (x,))
    bad = [f"{c.category} {c.name}: {c.rel_error:.2e}" for c in vertex.comparisons
           if not c.ok and c.category in ("output", "weight_grad")]  # merged BNs keep their own statistics
    assert not vertex.problems and not bad, bad


@pytest.mark.parametrize("pick", [lambda r, n: 0, lambda r, n: (r + 1) % n, lambda r, n: n - 1])
def test_topo_is_vertex_exact(pick):
    assert_vertex_exact(*_pair("topo"), pick)


class WrittenSkip(InvertedResidual):
    """The block's output is written in place after the sum reads it: a later read sees the new value."""

    def forward(self, x):
        out = nn.Sequential.forward(self, x)
        res = x + out
        out.add_(1.0)
        return res


class BroadcastSkip(InvertedResidual):
    """The summand is a per-channel vector broadcast over the block's output."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True) + nn.Sequential.forward(self, x)


class OneSkipLayer(MixedLayer):
    """Only one candidate ends in a skip sum: nothing is shared, nothing to distribute."""

    def __init__(self):
        super().__init__(8, 8, 1)
        self.ops[1].skip = self.ops[2].skip = self.ops[3].skip = False


def _layer_of(block: type) -> nn.Module:
    layer = MixedLayer(8, 8, 1)
    layer.ops = nn.ModuleList([block(8, 8, 1, e, k) for e, k in CHOICES])
    return layer


@pytest.mark.parametrize("layer", [lambda: _layer_of(WrittenSkip), lambda: _layer_of(BroadcastSkip), OneSkipLayer],
                         ids=["written", "broadcast", "one-skip"])
def test_leaves_unprovable_skip_sums_alone(layer):
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 8, 3), layer())
    reference, simple, x = _pair("topo", model)
    assert simple.report.fallback is None and simple.report.edges == 1, str(simple.report)
    assert not _rewrites(simple.report, "distribute"), str(simple.report)
    with preserved_state(reference, tensors=[reference[1].alpha]):
        set_one_hot([reference[1].alpha], lambda r, n: 1)
        vertex = train_step_equivalence(reference, simple, (x,))
    assert not vertex.problems and all(c.ok for c in vertex.comparisons if c.category == "output"), str(vertex)
