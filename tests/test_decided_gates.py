"""Per-candidate gates from the user's own code (``topofx.capture.gating``): a hard Gumbel sample drawn in
forward, each candidate run only where ``abs(w) > 1e-10`` -- captured as one graph whose gates are those
decisions, run sparsely: the original's outputs, gradients (alpha's included; unselected candidates get
none) and BN statistics, on every draw."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sampled_step import one_step
from torch import nn

import topofx
from topofx.ir import is_decided_gate


def _candidates(C: int) -> nn.ModuleList:
    conv = lambda k: nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, k, padding=k // 2, bias=False),  # noqa: E731
                                   nn.BatchNorm2d(C, affine=False))
    return nn.ModuleList([conv(3), conv(1), nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                                          nn.BatchNorm2d(C, affine=False)), nn.Identity()])


class _FilterOp(nn.Module):
    """The generator idiom: only the candidates whose sampled weight is not zero are summed."""

    def __init__(self, C: int):
        super().__init__()
        self._ops = _candidates(C)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops) if abs(w) > 1e-10)


class _ListOp(nn.Module):
    """The loop idiom: selected terms collected in a list, one returned as is, several summed."""

    def __init__(self, C: int):
        super().__init__()
        self._ops = _candidates(C)

    def forward(self, x, weights):
        clist = []
        for j, weight in enumerate(weights):
            if abs(weight) > 1e-10:
                clist.append(weights[j] * self._ops[j](x))
        if len(clist) == 1:
            return clist[0]
        return sum(clist)


class _SideEffectOp(_FilterOp):
    """A branch that also runs a module outside the weighted term: no gate can be proven."""

    def __init__(self, C: int):
        super().__init__(C)
        self.extra = nn.BatchNorm2d(C)

    def forward(self, x, weights):
        out = 0
        for w, op in zip(weights, self._ops):
            if abs(w) > 1e-10:
                out = out + w * op(x)
                x = self.extra(x)
        return out


class _WeightArmOp(_FilterOp):
    """The other arm adds the bare weight (its gradient reaches alpha): a gate whose dead term is the weight."""

    def forward(self, x, weights):
        return sum(w * op(x) if abs(w) > 1e-10 else w for w, op in zip(weights, self._ops))


class _ArgmaxOp(_FilterOp):
    """NASLib's GDAS idiom: the row's argmax runs, the others add their bare weight."""

    def forward(self, x, weights):
        argmax = torch.argmax(weights)
        return sum(weights[i] * op(x) if i == argmax else weights[i] for i, op in enumerate(self._ops))


class _HalfArmOp(_FilterOp):
    """The other arm adds something else than the weight: no gate stands for it."""

    def forward(self, x, weights):
        return sum(w * op(x) if abs(w) > 1e-10 else w * 0.5 for w, op in zip(weights, self._ops))


class _Net(nn.Module):
    """Three edges leave the stem's output (their ReLUs and convolutions can be shared and fused), a
    hard Gumbel sample per edge drawn in forward."""

    def __init__(self, op: type, C: int = 4, edges: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.mixed = nn.ModuleList(op(C) for _ in range(edges))
        self.alphas = nn.Parameter(1e-3 * torch.randn(edges, 4))
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        weights = F.gumbel_softmax(self.alphas, tau=5.0, hard=True, dim=-1)
        h = self.stem(x)
        out = sum(op(h, w) for op, w in zip(self.mixed, weights))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _assert_same_steps(model: nn.Module, simplified: nn.Module, x: torch.Tensor, seeds=range(5),
                       owner: nn.Module | None = None) -> None:
    """One step each from every seed: outputs, gradients (the same parameters have one) and buffers equal;
    ``owner`` holds ``simplified``'s parameters where they are not ``model``'s (a copy)."""
    for seed in seeds:
        out, grads, buffers = one_step(model, model, (x,), seed)
        out2, grads2, buffers2 = one_step(owner or model, simplified, (x,), seed)
        assert torch.allclose(out2, out, rtol=1e-5, atol=1e-8)
        assert grads2.keys() == grads.keys()  # unselected candidates get no gradient, as in the original
        for name in grads:
            assert torch.allclose(grads2[name], grads[name], rtol=1e-5, atol=1e-8), name
        for name in buffers:
            assert torch.allclose(buffers2[name], buffers[name], rtol=1e-5, atol=1e-8), name


@pytest.mark.parametrize("op", [_FilterOp, _ListOp, _WeightArmOp, _ArgmaxOp])
@pytest.mark.parametrize("mode", ["exact", "topo"])
def test_decisions_on_a_candidates_own_weight_become_gates(op, mode):
    torch.manual_seed(0)
    model = _Net(op).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = [one_step(model, model, (x,), s)[1].keys() for s in range(5)]
    assert len({frozenset(k) for k in expected}) > 1  # the draws select different candidates
    simplified = topofx.simplify(model, (x,), mode=mode, strict=True)
    report = simplified.report
    assert report.fallback is None and report.decided_per_call == ()
    assert report.sparse == 12 and report.edges == 3
    gm = simplified.graph_module
    assert sum(map(is_decided_gate, gm.graph.nodes)) == 12
    _assert_same_steps(model, simplified, x)


def test_unselected_candidates_are_not_run():
    torch.manual_seed(1)
    model = _Net(_FilterOp).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    simplified = topofx.simplify(model, (x,), mode="exact", strict=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    torch.manual_seed(3)
    weights = F.gumbel_softmax(model.alphas, tau=5.0, hard=True, dim=-1)
    torch.manual_seed(3)
    simplified(x).sum().backward()
    for e, row in enumerate(weights):
        for k, w in enumerate(row):
            params = list(model.mixed[e]._ops[k].parameters())
            moved = [n for n, b in model.mixed[e]._ops[k].named_buffers() if n.endswith("running_mean")
                     and not torch.equal(b, before[f"mixed.{e}._ops.{k}.{n}"])]
            assert bool(moved) == (w.item() != 0)
            assert all((p.grad is not None) == (w.item() != 0) for p in params)


@pytest.mark.parametrize("op", [_SideEffectOp, _HalfArmOp])
def test_what_a_gate_cannot_stand_for_runs_per_call(op):
    """A branch that also runs another module (the window's check), an other arm that adds something
    else than the weight (the probe's)."""
    torch.manual_seed(2)
    model = _Net(op).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    simplified = topofx.simplify(model, (x,), mode="exact", strict=True)
    assert simplified.report.sparse == 0
    assert set(simplified.report.decided_per_call) == {"mixed.0", "mixed.1", "mixed.2"}
    _assert_same_steps(model, simplified, x, seeds=range(3))


def test_copies_of_a_gated_graph_run_sparsely():
    """The graph's code generator is what runs it sparsely, so a copy (the self-check's float64 copies,
    a user's ``copy.deepcopy``) is the original's equal too: unselected BN statistics stay, no gradient."""
    import copy

    torch.manual_seed(4)
    model = _Net(_ListOp).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    twin = copy.deepcopy(topofx.simplify(model, (x,), mode="exact", strict=True))
    assert twin.graph_module is not None and twin.original is not model
    _assert_same_steps(model, twin, x, seeds=range(3), owner=twin.original)


class _EdgeOp(nn.Module):
    """NASLib's idiom: the mixed op reads the weights an optimizer sampled onto its edge before the call,
    decides in a method of its own, and its forward takes varargs."""

    def __init__(self, C: int):
        super().__init__()
        self.primitives = _candidates(C)
        self.edge_data = {}

    def forward(self, x, *args):
        return self.apply_weights(x, self.edge_data["sampled_arch_weight"])

    def apply_weights(self, x, weights):
        argmax = torch.argmax(weights)
        return sum(weights[i] * op(x) if i == argmax else weights[i] for i, op in enumerate(self.primitives))


class _SampledBeforeNet(nn.Module):
    def __init__(self, C: int = 4, edges: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.mixed = nn.ModuleList(_EdgeOp(C) for _ in range(edges))
        self.alphas = nn.Parameter(1e-3 * torch.randn(edges, 4))
        self.head = nn.Linear(C, 10)

    def sample(self):
        """The optimizer's step: a hard Gumbel sample per edge, stored where forward reads it."""
        for op, w in zip(self.mixed, F.gumbel_softmax(self.alphas, tau=5.0, hard=True, dim=-1)):
            op.edge_data["sampled_arch_weight"] = w

    def forward(self, x, *args):
        h = self.stem(x)
        return self.head(F.adaptive_avg_pool2d(sum(op(h) for op in self.mixed), 1).flatten(1))


def test_weights_sampled_before_the_call_gate_a_method_of_every_edge():
    torch.manual_seed(6)
    model = _SampledBeforeNet().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model.sample()
    simplified = topofx.simplify(model, (x,), mode="exact", strict=True)
    assert simplified.report.sparse == 12 and simplified.report.decided_per_call == ()
    selections = set()
    for seed in range(4):
        steps = []
        for net in (model, simplified):  # the same sample for both (one backward per sample)
            torch.manual_seed(100 + seed)
            model.sample()
            steps.append(one_step(model, net, (x,), seed))
        selections.add(tuple(int(op.edge_data["sampled_arch_weight"].argmax()) for op in model.mixed))
        (out, grads, buffers), (out2, grads2, buffers2) = steps
        assert torch.allclose(out2, out, rtol=1e-5, atol=1e-8)
        assert grads2.keys() == grads.keys() and "alphas" in grads
        for name in grads:
            assert torch.allclose(grads2[name], grads[name], rtol=1e-5, atol=1e-8), name
        for name in buffers:
            assert torch.allclose(buffers2[name], buffers[name], rtol=1e-5, atol=1e-8), name
    assert len(selections) > 1
