"""Lowering passes that run after the rewrites' fixpoint: ``weighted_sum`` (topo mode) and the
opt-in ``channels_last`` layout."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import topofx
from topofx import cost, zoo
from topofx.bench import ChannelsLastInput
from topofx.capture import trace
from topofx.ir import max_rel_error, preserved_state
from topofx.modules import ChannelsLastDepthwise, ConvAvgPool2d, MergedConvBN, MergedKernels
from topofx.modules import weighted_sum as weighted_sum_fn
from topofx.passes import TOPO_LOWERING, TOPO_PASSES, batched_merge, weighted_sum
from topofx.rewrite import run_to_fixpoint
from topofx.topology import is_add
from topofx.testing import assert_train_step_equivalent, seeded_outputs


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _pools(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) is ConvAvgPool2d]


@pytest.fixture(scope="module")
def nb201_rewritten():
    """NAS-Bench-201 cells after topo mode's rewrites, before lowering, with mixed alphas."""
    model, (x,) = zoo.build("nb201-darts", C=8, N=1, batch_size=8)
    with torch.no_grad():
        model.arch_parameters.normal_(generator=torch.Generator().manual_seed(0))  # not the session's RNG
    gm = trace(model, (x,))
    run_to_fixpoint(gm, model, TOPO_PASSES, (x,))
    return model, x, gm


def test_weighted_sum_one_accumulation_and_one_pooling_per_node(nb201_rewritten):
    model, x, gm = nb201_rewritten
    lowered = copy.deepcopy(gm)
    runs = run_to_fixpoint(lowered, model, [weighted_sum], (x,))
    cells = sum(1 for name, _ in model.named_modules() if name.count(".") == 1 and name.startswith("cells.")
                and hasattr(model.get_submodule(name), "edges"))
    nodes = 3 * cells  # NAS-Bench-201: nodes 1..3 of each searched cell
    assert len(runs[0].rewrites) == nodes
    # before: one pooling per node's *input* (0..2), shared by its edges; after: one per node (1..3),
    # of its inputs' weighted sum (the residual blocks' downsampling pools are not weighted terms)
    assert len(_pools(lowered)) == len(_pools(gm))
    pooled_sums = [p for p in _pools(lowered) if p.args[0].target is weighted_sum_fn
                   and all(w is not None for w in p.args[0].args[1])]  # a pooling of weighted inputs
    assert len(pooled_sums) == nodes
    # every node sum and every pooled sum is one call; no product of an activation with a weight is left
    assert len(_calls(lowered, weighted_sum_fn)) == 2 * nodes
    with preserved_state(model):
        expected = gm(x)
    with preserved_state(model):
        got = lowered(x)
    assert max_rel_error(got, expected) <= 1e-5  # the same sums in another association


def test_weighted_sum_gradients_match_unlowered(nb201_rewritten):
    model, x, gm = nb201_rewritten
    lowered = copy.deepcopy(gm)
    run_to_fixpoint(lowered, model, [weighted_sum], (x,))
    grads = []
    for module in (gm, lowered):  # the deep copy has its own parameters
        with preserved_state(module):
            out = module(x)[-1]
            grads.append(torch.autograd.grad(out.logsumexp(-1).sum(), module.arch_parameters)[0])
    assert max_rel_error(grads[1], grads[0]) <= 1e-4


def test_weighted_sum_leaves_small_sums_alone():
    """Below ``cost.SMALL_IMAGE`` elements one accumulation costs more per call than it saves."""
    model, (x,) = zoo.build("nb201-darts", C=4, N=1, batch_size=2, image_size=16)
    gm = trace(model, (x,))
    run_to_fixpoint(gm, model, TOPO_PASSES, (x,))
    sums = [n for n in gm.graph.nodes if is_add(n)]
    assert sums and all(cost.is_small_node(n) for n in sums)
    runs = run_to_fixpoint(gm, model, [weighted_sum], (x,))
    assert runs[0].rewrites == [] and not _calls(gm, weighted_sum_fn)


def test_weighted_sum_leaves_broadcasting_sums_alone(any_size):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.alpha = nn.Parameter(torch.randn(2))

        def forward(self, x):
            w = self.alpha.softmax(-1)
            bias = x.mean((2, 3), keepdim=True)  # broadcast against the activation
            return sum([w[0] * self.conv(x), w[1] * bias, x])

    x = torch.randn(2, 3, 6, 6)
    gm = trace(Net(), (x,))
    runs = run_to_fixpoint(gm, gm, [weighted_sum], (x,))
    assert runs[0].rewrites == [] and not _calls(gm, weighted_sum_fn)


def test_depthwise_convolutions_run_channels_last_in_topo_mode_only():
    model, (x,) = zoo.build("darts-orig", batch_size=2, layers=3)
    depthwise = sum(ChannelsLastDepthwise.supports(m) for m in model.modules())
    assert depthwise > 0
    topo = topofx.simplify(model, x, mode="topo")
    exact = topofx.simplify(model, x, mode="exact")
    wrapped = [m for m in topo.graph_module.modules() if isinstance(m, ChannelsLastDepthwise)]
    assert 0 < len(wrapped) <= depthwise  # merged candidates' stages may be gone; every one left is wrapped
    gm = topo.graph_module  # no plain depthwise convolution is still called
    assert not any(n.op == "call_module" and ChannelsLastDepthwise.supports(gm.get_submodule(n.target)) for n in gm.graph.nodes)
    assert not any(isinstance(m, ChannelsLastDepthwise) for m in exact.graph_module.modules())


def test_channels_last_exact_mode_equals_original_fed_channels_last():
    model, (x,) = zoo.build("darts-orig", batch_size=4, layers=3)
    simplified = topofx.simplify(model, x, mode="exact", layout="channels_last")
    assert "to_channels_last" in simplified.graph_module.code
    assert_train_step_equivalent(ChannelsLastInput(model), simplified, x)


class FlattenByView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1)), y  # .view needs NCHW strides


def test_channels_last_leaves_a_graph_that_needs_nchw_alone():
    model, x = FlattenByView(), torch.randn(2, 3, 6, 6)
    simplified = topofx.simplify(model, x, mode="exact", layout="channels_last")
    assert "to_channels_last" not in simplified.graph_module.code
    got, expected = seeded_outputs(model, simplified, x)
    assert max_rel_error(got, expected) == 0.0


def test_channels_last_returns_outputs_in_the_original_layout():
    class Net(FlattenByView):
        def forward(self, x):
            y = self.conv(x)
            return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1)), y

    model, x = Net(), torch.randn(2, 3, 6, 6)
    simplified = topofx.simplify(model, x, mode="exact", layout="channels_last")
    assert "to_channels_last" in simplified.graph_module.code
    _, feature = simplified(x)
    assert feature.is_contiguous()
    with pytest.raises(ValueError, match="unknown layout"):
        topofx.simplify(model, x, layout="nhwc")


def test_report_counts_a_channels_last_depthwise_as_a_conv():
    """Wrapping a depthwise convolution changes its layout, not the number of convolutions."""
    model, (x,) = zoo.build("darts-orig", batch_size=2, C=4, layers=3)
    report = topofx.simplify(model, x, mode="topo").report
    (layout,) = [p for p in report.passes if p.name == "depthwise_layout"]
    assert layout.rewrites and layout.removed["conv"] == 0


def _merged_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) is MergedConvBN]


def test_batched_merge_equals_the_merges_edge_by_edge():
    """topo mode's merged convolutions of the DARTS space (one per edge), their kernels computed in
    batches: the same training step as the graph that merges edge by edge -- outputs, weight and
    architecture-weight gradients, running statistics of the floated batch norms -- at mixed weights."""
    model, (x,) = zoo.build("darts-orig", C=4, layers=3, batch_size=2, image_size=16)
    with torch.no_grad():
        for alpha in model.arch_parameters():
            alpha.normal_(generator=torch.Generator().manual_seed(0))
    edge_by_edge = trace(model, (x,))
    run_to_fixpoint(edge_by_edge, model, TOPO_PASSES, (x,))
    run_to_fixpoint(edge_by_edge, model, [p for p in TOPO_LOWERING if p is not batched_merge], (x,))
    calls = _merged_calls(edge_by_edge)
    assert len(calls) > 2 and not any(n.kwargs for n in calls)
    batched = copy.deepcopy(edge_by_edge)
    runs = run_to_fixpoint(batched, model, [batched_merge], (x,))
    batches = [n for n in batched.graph.nodes if n.op == "call_module" and type(batched.get_submodule(n.target)) is MergedKernels]
    assert 0 < len(batches) == len(runs[0].rewrites) < len(calls)  # (cells of one width share a batch)
    assert all(set(n.kwargs) == {"mixed"} and n.kwargs["mixed"].args[0] in batches for n in _merged_calls(batched))
    alphas = [[gm.alphas_normal, gm.alphas_reduce] for gm in (edge_by_edge, batched)]  # (the copy's own)
    assert_train_step_equivalent(edge_by_edge, batched, (x,), arch_params=alphas[0], candidate_arch_params=alphas[1])


@pytest.mark.parametrize("write", [False, True])
def test_batched_merge_does_not_move_kernel_reads_across_a_parameter_write(write):
    """Two merged calls join one batch, which reads their kernels where the first call did -- unless a
    node between them writes a parameter in place: then each keeps its own merge."""
    from topofx.passes.batched_merge import _batches

    def merged():
        return MergedConvBN([[(nn.Conv2d(3, 4, k, padding=k // 2), nn.BatchNorm2d(4)) for k in (1, 3)]])

    root = nn.Module()
    root.m0, root.m1, root.scale = merged(), merged(), nn.Parameter(torch.ones(()))
    graph = torch.fx.Graph()
    x, *ws = [graph.placeholder(name) for name in ("x", "w0", "w1", "w2", "w3")]
    first = graph.call_module("m0", (x, *ws[:2]))
    if write:
        graph.call_method("mul_", (graph.get_attr("scale"), 2.0))
    second = graph.call_module("m1", (x, *ws[2:]))
    graph.output((first, second))
    gm = torch.fx.GraphModule(root, graph)
    batches = _batches(gm, [first, second], {first: 1, second: 1})
    assert [members for members, _ in batches] == ([[first], [second]] if write else [[first, second]])
