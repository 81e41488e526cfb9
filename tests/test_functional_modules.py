"""Functional candidates (``F.conv2d`` / ``F.batch_norm`` on a module's own tensors) reach the rewrites.

A one-shot library whose mixed operations call the functional ops (NNI's DARTS space) hands the graph
``call_function`` convolutions and batch norms reading parameters and buffers through ``get_attr``;
``passes/functional_modules.py`` states them as stock modules holding the same tensors, so the TopoNAS
passes float and merge them (before it: 0 floated, 0 merged) and exact mode fuses them.  Its mode rule
is checked too: a BN whose ``training`` is hard-coded while the graph serves both modes is left alone.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import topofx
from topofx.testing import assert_train_step_equivalent, eval_equivalence, set_one_hot, train_step_equivalence
from test_shared_arch_rows import Net


def build(cells: int = 2):
    torch.manual_seed(0)
    return Net(cells=cells, steps=2), torch.randn(2, 3, 8, 8)


def pass_run(simple, name):
    return next(p for p in simple.report.passes if p.name == name)


def test_topo_floats_and_merges_functional_candidates():
    """Topo mode floats the functional BNs past the joins and merges their convolutions (0 of each
    before the lowering), and the result is vertex-exact against the original."""
    model, x = build()
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="topo", strict=True)
    assert simple.report.fallback is None
    merged = pass_run(simple, "floating_merge")
    assert merged.rewrites, "no functional Conv->BN candidate was floated/merged"
    assert merged.removed["conv"] > 0 and merged.removed["bn"] > 0
    assert simple.report.before["conv"] > simple.report.after["conv"]
    for pick in (3, 4):  # conv_3x3, conv_5x5
        set_one_hot(reference.arch_parameters(), lambda r, n, k=pick: k)
        set_one_hot(model.arch_parameters(), lambda r, n, k=pick: k)
        report = train_step_equivalence(reference, simple, (x,))
        bad = [f"{c.category} {c.name}: rel {c.rel_error:.3g}" for c in report.comparisons
               if not c.ok and c.category in ("output", "weight_grad")]
        assert not bad and not report.problems, (bad, report.problems)


def test_exact_functional_candidates_one_step():
    """Exact mode fuses the lowered convolutions and batch norms; one step equals the original's:
    outputs, weight and architecture gradients, BN running statistics.  The graph's modules hold the
    user's parameters and buffers themselves (gradients and statistics land on them)."""
    model, x = build()
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="exact", strict=True)
    assert simple.report.fallback is None
    assert pass_run(simple, "functional_modules").rewrites
    assert pass_run(simple, "horizontal_fusion").removed["conv"] > 0
    assert_train_step_equivalent(reference, simple, (x,), arch_params=reference.arch_parameters())
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    graph_tensors = [t for t in (*simple.graph_module.parameters(), *simple.graph_module.buffers())]
    assert graph_tensors and all(id(t) in own for t in graph_tensors)
    # a real step lands on the user's tensors
    mean = model.cells[0].ops[0][0]["conv_3x3"].running_mean.clone()
    simple(x).sum().backward()
    cand = model.cells[0].ops[0][0]["conv_3x3"]
    assert cand.weight.grad is not None and cand.bn_weight.grad is not None
    assert not torch.equal(cand.running_mean, mean)


class HardCodedBN(nn.Module):
    """Conv -> BN with the BN's mode hard-coded (``training=True``), running statistics or not: the
    forward never reads ``self.training``, so the graph serves both modes."""

    def __init__(self, C: int = 4, stats: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, 3, 3, 3) * 0.3)
        self.bn_weight = nn.Parameter(torch.rand(C) + 0.5)
        self.bn_bias = nn.Parameter(torch.randn(C) * 0.1)
        self.stats = stats
        if stats:
            self.register_buffer("running_mean", torch.zeros(C))
            self.register_buffer("running_var", torch.ones(C))

    def forward(self, x):
        y = F.conv2d(x, self.weight, None, 1, 1)
        mean, var = (self.running_mean, self.running_var) if self.stats else (None, None)
        return F.batch_norm(y, mean, var, self.bn_weight, self.bn_bias, True, 0.1, 1e-5).relu().mean((2, 3))


def test_hard_coded_training_bn_after_eval():
    """``F.batch_norm(..., training=True)`` with running statistics in a graph served in both modes is
    not lowered (a stock BN would switch to its running statistics after ``.eval()``): after ``.eval()``
    the simplified module still normalizes with batch statistics and updates the statistics, as the
    original does.  Without running statistics the call is lowered (a stock BN without statistics
    uses batch statistics in both modes) and stays correct in eval mode too."""
    for stats in (True, False):
        torch.manual_seed(0)
        model, x = HardCodedBN(stats=stats), torch.randn(4, 3, 6, 6)
        reference = copy.deepcopy(model)
        simple = topofx.simplify(model, (x,), mode="exact", strict=True)
        lowered = [r.detail for r in pass_run(simple, "functional_modules").rewrites]
        assert any(d.startswith("Conv2d") for d in lowered)
        assert any(d.startswith("BatchNorm2d") for d in lowered) is (not stats), lowered
        simple.eval()
        reference.eval()
        assert "graph_training" not in simple.__dict__  # served in both modes
        report = eval_equivalence(reference, simple, (x,))
        assert report.ok, str(report)
        with torch.no_grad():
            out, expected = simple(x), reference(x)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
        if stats:  # the eval call still updated the statistics, as the original's did
            assert torch.allclose(model.running_mean, reference.running_mean)
            assert not torch.equal(model.running_mean, torch.zeros(4))


class SlicedConv(nn.Module):
    """A conv whose weight is a slice of a larger parameter, and a functional BN in eval mode."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.register_buffer("running_mean", torch.randn(4) * 0.1)
        self.register_buffer("running_var", torch.rand(4) + 0.5)

    def forward(self, x):
        y = F.conv2d(x, self.weight[:4], None, 1, 1)
        return F.batch_norm(y, self.running_mean, self.running_var, None, None, self.training, 0.1, 1e-5)


def test_sliced_weight_left_alone_and_eval_capture_lowered():
    """A sliced weight is not lowered; a BN reading ``self.training`` captured in eval mode (the graph
    serves eval mode only) is, as an eval-mode stock BN."""
    torch.manual_seed(0)
    model, x = SlicedConv().eval(), torch.randn(2, 3, 5, 5)
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="exact", strict=True)
    lowered = [r.detail for r in pass_run(simple, "functional_modules").rewrites]
    assert lowered == ["BatchNorm2d on running_mean, running_var"], lowered
    assert eval_equivalence(reference, simple, (x,)).ok


def test_lowered_tensors_follow_reassignment_and_double():
    """The lowered modules hold the model's tensors: a re-assigned parameter and ``.double()`` (which
    replaces buffers) are followed by the guards."""
    model, x = build(cells=1)
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="exact", strict=True)
    new = torch.randn_like(model.cells[0].ops[0][0]["conv_3x3"].weight)
    model.cells[0].ops[0][0]["conv_3x3"].weight = nn.Parameter(new.clone())
    reference.cells[0].ops[0][0]["conv_3x3"].weight = nn.Parameter(new.clone())
    assert_train_step_equivalent(reference, simple, (x,), arch_params=reference.arch_parameters())
    simple.double()
    reference.double()
    assert_train_step_equivalent(reference, simple, (x.double(),), arch_params=reference.arch_parameters())
    simple(x.double()).sum().backward()
    reference(x.double()).sum().backward()
    cand, ref = model.cells[0].ops[0][0]["conv_3x3"], reference.cells[0].ops[0][0]["conv_3x3"]
    assert cand.running_mean.dtype == torch.float64
    assert torch.allclose(cand.running_mean, ref.running_mean)


class SharedStats(nn.Module):
    """One set of running statistics updated by two functional BN calls (the order of the updates
    matters): neither is lowered; the result stays exact."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))

    def forward(self, x):
        y = F.conv2d(x, self.weight, None, 1, 1)
        a = F.batch_norm(y, self.running_mean, self.running_var, None, None, self.training, 0.1, 1e-5)
        b = F.batch_norm(y * 2 + 1, self.running_mean, self.running_var, None, None, self.training, 0.1, 1e-5)
        return a + b


def test_shared_running_stats_left_alone():
    torch.manual_seed(0)
    model, x = SharedStats(), torch.randn(2, 3, 5, 5)
    reference = copy.deepcopy(model)
    simple = topofx.simplify(model, (x,), mode="exact", strict=True)
    lowered = [r.detail for r in pass_run(simple, "functional_modules").rewrites]
    assert lowered == ["Conv2d on weight"], lowered
    assert_train_step_equivalent(reference, simple, (x,))
