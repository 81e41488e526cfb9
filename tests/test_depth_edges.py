"""Depth choices: a repeat whose output mixes the outputs after 1, 2, ... of its blocks.

A ProxylessNAS-style supernet in the idiom of a one-shot library: every block is a mixed layer of
inverted residuals (``test_distribute``'s), and each stage repeats its blocks with a searchable
depth: the outputs after each allowed depth are weighted by ``softmax(alpha)`` read through the
joint probability of the depth's options (``1. * w[i]``) and summed by the weighted-sum helper.
That sum is a mixed edge whose input is the first allowed depth's output (the shallowest depth is
the identity on it) and whose candidates are nested: each runs on from the previous one and so
holds the mixed layers (other edges) of the blocks between.  Before, topology read it as a node
join (a sum over other edges' joins) and found only the layers.

Checked: topology finds every layer and every depth choice, with the candidates in order; derive
keeps the chosen depth; exact mode equals the original (outputs, weight and architecture
gradients, BN statistics); topo mode merges every layer and is vertex-exact.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from test_distribute import CHOICES, MixedLayer, assert_vertex_exact, conv_bn, weighted

import topofx
from topofx.capture import trace
from topofx.testing import assert_train_step_equivalent

STAGES = [[(8, 8, 2), (8, 8, 1), (8, 8, 1)], [(8, 16, 2), (16, 16, 1)]]  # (in, out, stride) per block
DEPTHS = [(1, 2, 3), (1, 2)]
LAYERS = sum(len(s) for s in STAGES)


class MixedRepeat(nn.Module):
    """The outputs after each allowed depth, weighted by the probability of that depth."""

    def __init__(self, blocks: list[nn.Module], depths: tuple[int, ...]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.depths = depths
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(depths)))

    def forward(self, x):
        w = F.softmax(self.alpha, -1)
        depth_weights = {d: 1. * w[i] for i, d in enumerate(self.depths)}  # joint probability of one label
        res, weights = [], []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in depth_weights:
                res.append(x)
                weights.append(depth_weights[i])
        return weighted(res, weights)


class DepthSupernet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.stages = nn.Sequential(*[MixedRepeat([MixedLayer(*b) for b in blocks], d)
                                      for blocks, d in zip(STAGES, DEPTHS)])
        self.head = nn.Linear(16, 10)

    def arch_parameters(self):
        return [m.alpha for m in self.modules() if isinstance(m, (MixedLayer, MixedRepeat))]

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


def _model():
    torch.manual_seed(0)
    return DepthSupernet(), torch.randn(2, 3, 32, 32)


def test_depth_choices_are_edges():
    """Each repeat's sum is an edge: its input the first depth's output, its candidates the identity
    on it and the nested runs to each deeper depth (each holding the layers in between)."""
    model, x = _model()
    topo = topofx.analyze(trace(model, (x,)).graph, model)
    depth_edges = [e for e in topo.edges if len(e.candidates) != len(CHOICES)]
    assert len(topo.edges) == LAYERS + len(STAGES) and not topo.node_joins, [e.name for e in topo.edges]
    assert [len(e.candidates) for e in depth_edges] == [len(d) for d in DEPTHS]
    for edge in depth_edges:
        assert edge.candidates[0].is_identity and edge.candidates[0].output is edge.input
        for shallow, deep in zip(edge.candidates, edge.candidates[1:]):
            assert set(shallow.branch) < set(deep.branch)


def test_derive_keeps_the_chosen_depth():
    model, x = _model()
    with torch.no_grad():
        model.stages[0].alpha.copy_(torch.tensor([0., 0., 5.]))  # depth 3
        model.stages[1].alpha.copy_(torch.tensor([5., 0.]))  # depth 1
    child = topofx.derive(model, (x,))
    depths = [c for c in child.meta["topofx_choices"] if len(c.candidates) != len(CHOICES)]
    assert [c.index for c in depths] == [2, 0]
    called = {n.target.split(".")[:4][-1] for n in child.graph.nodes if n.op == "call_module" and n.target.startswith("stages.1.")}
    assert called == {"0"}, called  # stage 2 runs its first block only


def test_exact_mode_equals_the_original():
    model, x = _model()
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="exact", strict=True)
    assert simple.report.edges == LAYERS + len(STAGES), str(simple.report)
    assert_train_step_equivalent(reference, simple, (x,), arch_params=reference.arch_parameters(),
                                 candidate_arch_params=model.arch_parameters())


@pytest.mark.parametrize("pick", [lambda r, n: 0, lambda r, n: n - 1])
def test_topo_merges_every_layer_and_is_vertex_exact(pick):
    model, x = _model()
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="topo", strict=True)
    merged = {e for r in simple.report.rewrites if r.pass_name == "floating_merge" for e in r.edges}
    assert len(merged) == LAYERS, str(simple.report)
    assert_vertex_exact(reference, simple, x, pick)
