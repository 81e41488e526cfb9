"""Each exact pass on its own, on small hand-built models.

Why: the zoo and random-supernet tests show that the pipeline is exact; these show that each pass
does the rewrite it claims (counted on the graph) and refuses the rewrites that would be unsafe,
in particular around in-place operations and modules reused at several call sites.

Every test captures a model with :func:`topofx.capture.trace`, runs one pass (or a short list) with
:func:`topofx.rewrite.run_to_fixpoint`, counts nodes, and checks a full training step of the
rewritten graph module against the original (outputs, every gradient, BN statistics).
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import topofx.passes as passes
from topofx import cost
from topofx.capture import trace
from topofx.zoo.operations import Zero
from topofx.modules import FusedBatchNorm2d, FusedConv2d
from topofx.passes import horizontal_fusion, prefix_sharing, zero_elimination
from topofx.rewrite import run_to_fixpoint
from topofx.testing import assert_eval_equivalent, assert_train_step_equivalent

X_SHAPE = (4, 4, 8, 8)


def rewrite(model: nn.Module, pass_list, x: torch.Tensor | None = None):
    """Trace ``model`` and run ``pass_list`` to a fixpoint; returns (graph module, input, runs)."""
    torch.manual_seed(0)
    x = torch.randn(*X_SHAPE) if x is None else x
    gm = trace(model, (x,))
    before = count_nodes(gm)
    runs = run_to_fixpoint(gm, model, list(pass_list), (x,))
    return gm, x, before, runs


def count_nodes(gm: fx.GraphModule) -> int:
    return len(gm.graph.nodes)


def modules_called(gm: fx.GraphModule, cls: type, exact_type: bool = True) -> list[fx.Node]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if (type(mod) is cls) if exact_type else isinstance(mod, cls):
                out.append(n)
    return out


def params_intact(model: nn.Module) -> None:
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type != "cpu"]
    assert not bad, f"the rewrite left the model's own tensors on another device (meta?): {bad}"


def check_exact(model, gm, x, rtol=1e-5):
    params_intact(model)
    assert_train_step_equivalent(model, gm, x, rtol=rtol)
    assert_eval_equivalent(model, gm, x, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# candidate operations, DARTS style
# ---------------------------------------------------------------------------------------------
class ZerosLike(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


def relu_conv_bn(C: int, k: int, stride: int = 1, **bn) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(C, **bn))


class Edge(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, x, w):
        return sum(wi * op(x) for wi, op in zip(w, self.ops))


class TwoEdges(nn.Module):
    """Two mixed edges leaving the same node ``h``; arch weights as a Parameter."""

    def __init__(self, make_ops, C: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.e1, self.e2 = Edge(make_ops()), Edge(make_ops())
        n = len(self.e1.ops)
        self.alpha = nn.Parameter(1e-1 * torch.randn(2, n))

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        h = self.stem(x)
        return self.e1(h, w[0]) + self.e2(h, w[1])


def darts_ops(C: int = 4):
    return lambda: [Zero(), Identity(), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                    relu_conv_bn(C, 3), relu_conv_bn(C, 5), relu_conv_bn(C, 3)]


# ---------------------------------------------------------------------------------------------
# zero elimination
# ---------------------------------------------------------------------------------------------
def is_zero_mul(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target == "mul" or n.op == "call_function" and n.target in (operator.mul, torch.mul):
        return any(isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0 for a in n.args)
    return False


def zero_factories(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and getattr(n.target, "__name__", n.target) in ("zeros_like", "zeros", "new_zeros")]


def sum_starts_at_literal_zero(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add
            and any(isinstance(a, (int, float)) and a == 0 for a in n.args)]


@pytest.mark.parametrize("zero", [Zero, ZerosLike], ids=["mul0", "zeros_like"])
def test_zero_elimination_removes_zero_terms(zero):
    torch.manual_seed(0)
    model = TwoEdges(lambda: [zero(), Identity(), relu_conv_bn(4, 3)])
    gm0 = trace(model, (torch.randn(*X_SHAPE),))
    assert len([n for n in gm0.graph.nodes if is_zero_mul(n)]) + len(zero_factories(gm0)) == 2
    assert sum_starts_at_literal_zero(gm0)
    gm, x, before, runs = rewrite(model, [zero_elimination])
    assert [n for n in gm.graph.nodes if is_zero_mul(n)] == []
    assert zero_factories(gm) == []
    # the literal 0 that Python's ``sum`` starts from may stay (it keeps nested sums apart); it is
    # a scalar add, not a zero *tensor* term
    assert count_nodes(gm) < before
    assert sum(len(r.rewrites) for r in runs) >= 2 and all(r.exact for r in runs)
    check_exact(model, gm, x)


def test_zero_elimination_reduction_zero_and_weight_gradient():
    """A strided zero (reduction edge) is dropped too; the weights of the other candidates keep
    their gradients, and the zero candidate's weight gets exactly zero gradient (or none)."""

    class Reduce(nn.Module):
        def __init__(self):
            super().__init__()
            self.ops = nn.ModuleList([Zero(2), relu_conv_bn(4, 3, stride=2), nn.MaxPool2d(3, 2, 1)])
            self.alpha = nn.Parameter(torch.randn(3))

        def arch_parameters(self):
            return [self.alpha]

        def forward(self, x):
            w = F.softmax(self.alpha, dim=-1)
            return sum(wi * op(x) for wi, op in zip(w, self.ops))

    torch.manual_seed(0)
    model = Reduce()
    gm, x, before, runs = rewrite(model, [zero_elimination])
    assert [n for n in gm.graph.nodes if is_zero_mul(n)] == []
    check_exact(model, gm, x)


def test_zero_branch_after_batchnorm_keeps_statistics():
    """``bn(x).mul(0.)``: the term goes, but the BN still updates its running statistics."""

    class BNZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.alpha = nn.Parameter(torch.randn(2))

        def arch_parameters(self):
            return [self.alpha]

        def forward(self, x):
            w = F.softmax(self.alpha, dim=-1)
            return w[0] * self.bn(x).mul(0.0) + w[1] * self.conv(x)

    torch.manual_seed(0)
    model = BNZero()
    gm, x, before, runs = rewrite(model, [zero_elimination])
    assert [n for n in gm.graph.nodes if is_zero_mul(n)] == []
    assert len(modules_called(gm, nn.BatchNorm2d)) == 1, "the BN's statistics update was removed"
    check_exact(model, gm, x)


def test_zero_elimination_leaves_mutated_zero_alone():
    """A 'zero' that is then modified in place is not zero any more."""

    class MutatedZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.alpha = nn.Parameter(torch.randn(2))

        def arch_parameters(self):
            return [self.alpha]

        def forward(self, x):
            w = F.softmax(self.alpha, dim=-1)
            z = x.mul(0.0)
            z.add_(1.0)
            return w[0] * z + w[1] * self.conv(x)

    torch.manual_seed(0)
    model = MutatedZero()
    gm, x, before, runs = rewrite(model, [zero_elimination])
    check_exact(model, gm, x)


# ---------------------------------------------------------------------------------------------
# prefix sharing
# ---------------------------------------------------------------------------------------------
def relus_per_input(gm) -> dict:
    out: dict = {}
    for n in modules_called(gm, nn.ReLU):
        out.setdefault(n.args[0], []).append(n)
    return out


def test_prefix_sharing_one_relu_per_input():
    torch.manual_seed(0)
    model = TwoEdges(darts_ops())
    gm0 = trace(model, (torch.randn(*X_SHAPE),))
    assert [len(v) for v in relus_per_input(gm0).values()] == [6]  # 3 conv candidates x 2 edges
    assert len(modules_called(gm0, nn.AvgPool2d)) == 2
    gm, x, before, runs = rewrite(model, [prefix_sharing])
    groups = relus_per_input(gm)
    assert len(groups) == 1 and all(len(v) == 1 for v in groups.values())
    relu = next(iter(groups.values()))[0]
    assert len([u for u in relu.users if u.op == "call_module"]) == 6  # every conv reads it
    assert len(modules_called(gm, nn.AvgPool2d)) == 1  # the two edges' poolings too
    assert len(modules_called(gm, nn.Conv2d)) == 1 + 6  # stem + candidates: nothing fused here
    # 5 ReLUs, 1 pooling and 1 of the two ``h.mul(0.)`` of the Zero candidates went
    assert count_nodes(gm) == before - 7
    check_exact(model, gm, x)


def test_prefix_sharing_respects_configuration():
    """Different pooling configurations or different inputs are not shared."""

    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.b = nn.AvgPool2d(3, 1, 1, count_include_pad=True)
            self.c = nn.MaxPool2d(3, 1, 1)
            self.d = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.r1, self.r2 = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            y = x + 1
            return self.a(x) + self.b(x) + self.c(x) + self.d(y) + self.r1(x) + self.r2(y)

    torch.manual_seed(0)
    model = Pools()
    gm, x, before, runs = rewrite(model, [prefix_sharing])
    assert count_nodes(gm) == before
    check_exact(model, gm, x)


def test_prefix_sharing_keeps_random_ops_apart():
    """Two dropouts of one tensor draw different masks: never one call."""

    class Drops(nn.Module):
        def __init__(self):
            super().__init__()
            self.d1, self.d2 = nn.Dropout(0.5), nn.Dropout(0.5)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.d1(x)) + self.conv(self.d2(x)) + F.dropout(x, 0.3) + F.dropout(x, 0.3)

    torch.manual_seed(0)
    model = Drops()
    gm, x, before, runs = rewrite(model, [prefix_sharing])
    assert len(modules_called(gm, nn.Dropout)) == 2
    assert len([n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.dropout]) == 2
    check_exact(model, gm, x)


class InplaceReLUs(nn.Module):
    """In-place ReLUs are not shared: each mutates its input (here a fresh tensor per branch)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.r1, self.r2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.c3, self.c4 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a, b = self.c1(x), self.c2(x)
        return self.c3(self.r1(a)) + self.c4(self.r2(b))


class MutatedSharedCandidate(nn.Module):
    """Two equal poolings of ``y``; the first one's result is then ReLU'd *in place*.

    Sharing them would make the second branch see the ReLU'd values: unsafe, must be refused.
    """

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(4, 4, 3, padding=1)
        self.pa = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.pb = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.relu = nn.ReLU(inplace=True)
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv0(x)
        p1 = self.pa(y)
        p2 = self.pb(y)
        q = self.relu(p1)
        return self.c1(q) + self.c2(p2)


class MutatedSharedInput(nn.Module):
    """``y * 2`` twice with an in-place ReLU of ``y`` in between: the two products differ.

    Computing the second product once with the first would read ``y`` before the mutation.
    """

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv0(x)
        p1 = y * 2.0
        self.relu(y)
        p2 = y * 2.0
        return self.c1(p1) + self.c2(p2)


def test_inplace_relus_are_not_shared():
    torch.manual_seed(0)
    model = InplaceReLUs()
    gm, x, before, runs = rewrite(model, [prefix_sharing])
    assert len(modules_called(gm, nn.ReLU)) == 2
    check_exact(model, gm, x)


def test_inplace_relu_consumer_prevents_sharing_its_input():
    torch.manual_seed(0)
    model = MutatedSharedCandidate()
    gm, x, before, runs = rewrite(model, [prefix_sharing])
    assert len(modules_called(gm, nn.AvgPool2d)) == 2, "a value mutated in place was shared"
    check_exact(model, gm, x)


def test_inplace_relu_between_two_reads_prevents_sharing():
    torch.manual_seed(0)
    model = MutatedSharedInput()
    with torch.no_grad():  # sanity: the two products really differ in the original
        y = model.conv0(torch.randn(*X_SHAPE))
        assert (y < 0).any()
    gm, x, before, runs = rewrite(model, [prefix_sharing])
    check_exact(model, gm, x)


def test_inplace_relu_is_safe_after_sharing_when_it_mutates_a_private_value():
    """Sharing is still allowed upstream of an in-place op that mutates a value nobody else reads:
    DARTS-style ``ReLU(inplace=False) -> Conv -> BN -> ReLU(inplace=True)``."""

    class Candidates(nn.Module):
        def __init__(self):
            super().__init__()
            self.r1, self.r2 = nn.ReLU(), nn.ReLU()
            self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.b1, self.b2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.ip1, self.ip2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

        def forward(self, x):
            return self.ip1(self.b1(self.c1(self.r1(x)))) + self.ip2(self.b2(self.c2(self.r2(x))))

    torch.manual_seed(0)
    model = Candidates()
    gm, x, before, runs = rewrite(model, [prefix_sharing])
    assert len([n for n in modules_called(gm, nn.ReLU) if not gm.get_submodule(n.target).inplace]) == 1
    check_exact(model, gm, x)


# ---------------------------------------------------------------------------------------------
# horizontal fusion
# ---------------------------------------------------------------------------------------------
class ConvsOnOneTensor(nn.Module):
    """Three 3x3 conv+BN, one 5x5 conv+BN, one depthwise conv, one strided 3x3 -- all on ``h``."""

    def __init__(self, C: int = 4, bias: bool = False):
        super().__init__()
        self.relu = nn.ReLU()
        self.c3 = nn.ModuleList(nn.Conv2d(C, C + i, 3, padding=1, bias=bias) for i in range(3))
        self.b3 = nn.ModuleList(nn.BatchNorm2d(C + i, affine=bool(i % 2)) for i in range(3))
        self.c5, self.b5 = nn.Conv2d(C, C, 5, padding=2, bias=bias), nn.BatchNorm2d(C)
        self.dw = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False)
        self.s2 = nn.Conv2d(C, C, 3, stride=2, padding=1, bias=bias)
        self.head = nn.Conv2d(3 * C + 3 + 2 * C, 2, 1)

    def forward(self, x):
        h = self.relu(x)
        outs = [b(c(h)) for c, b in zip(self.c3, self.b3)]
        outs += [self.b5(self.c5(h)), self.dw(h)]
        y = self.head(torch.cat(outs, dim=1))
        return y, self.s2(h)


@pytest.mark.parametrize("bias", [False, True])
def test_horizontal_fusion_fuses_same_geometry_convs(bias):
    torch.manual_seed(0)
    model = ConvsOnOneTensor(bias=bias)
    gm0 = trace(model, (torch.randn(*X_SHAPE),))
    assert len(modules_called(gm0, nn.Conv2d)) == 7
    gm, x, before, runs = rewrite(model, [horizontal_fusion])
    fused = modules_called(gm, FusedConv2d)
    # the three 3x3 convs (different output widths) became one
    assert len(fused) == 1 and len(gm.get_submodule(fused[0].target).convs) == 3
    # left alone: the 5x5, the depthwise, the strided 3x3, the head
    assert len(modules_called(gm, nn.Conv2d)) == 4
    # the 3x3 convs' BNs differ in ``affine``: they must stay separate BNs
    assert len(modules_called(gm, nn.BatchNorm2d)) == 4
    assert modules_called(gm, FusedBatchNorm2d) == []
    check_exact(model, gm, x)


class BNsAfterConvs(nn.Module):
    def __init__(self, odd_eps: bool):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4, affine=bool(i % 2), eps=1e-3 if odd_eps and i == 2 else 1e-5)
                                 for i in range(3))

    def forward(self, x):
        a, b, c = (bn(conv(x)) for conv, bn in zip(self.convs, self.bns))
        return a + 2 * b - c


def test_horizontal_fusion_fuses_batchnorms_of_one_configuration():
    torch.manual_seed(0)
    model = BNsAfterConvs(odd_eps=False)
    # affine differs between BNs 0/2 and 1 -> by configuration; make all affine equal first
    for bn in model.bns:
        assert bn.eps == 1e-5
    model.bns[1] = nn.BatchNorm2d(4, affine=False)
    gm, x, before, runs = rewrite(model, [horizontal_fusion])
    assert len(modules_called(gm, FusedConv2d)) == 1 and modules_called(gm, nn.Conv2d) == []
    fused_bn = modules_called(gm, FusedBatchNorm2d)
    assert len(fused_bn) == 1 and len(gm.get_submodule(fused_bn[0].target).bns) == 3
    assert modules_called(gm, nn.BatchNorm2d) == []
    check_exact(model, gm, x)


def test_horizontal_fusion_keeps_batchnorms_of_different_configuration():
    torch.manual_seed(0)
    model = BNsAfterConvs(odd_eps=True)
    gm, x, before, runs = rewrite(model, [horizontal_fusion])
    assert len(modules_called(gm, FusedConv2d)) == 1
    assert len(modules_called(gm, nn.BatchNorm2d)) == 3
    check_exact(model, gm, x)


def test_prefix_sharing_then_fusion_on_darts_edges():
    torch.manual_seed(0)
    model = TwoEdges(darts_ops())
    gm, x, before, runs = rewrite(model, [zero_elimination, prefix_sharing, horizontal_fusion])
    # 4 3x3 convs (2 per edge) fused into one; the 2 5x5 into another
    fused = modules_called(gm, FusedConv2d)
    assert sorted(len(gm.get_submodule(n.target).convs) for n in fused) == [2, 4]
    assert len(modules_called(gm, nn.Conv2d)) == 1  # the stem
    check_exact(model, gm, x)


def test_fused_parameters_are_the_originals():
    torch.manual_seed(0)
    model = ConvsOnOneTensor()
    gm, x, before, runs = rewrite(model, [horizontal_fusion])
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in gm.parameters()} == ids
    # an optimizer step on the originals is seen by the fused graph
    with torch.no_grad():
        model.c3[1].weight.add_(1.0)
    model.eval()
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class SameConvTwice(nn.Module):
    """One conv+BN module pair applied twice to the same input (weight sharing across edges)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.alpha = nn.Parameter(torch.randn(2))

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        return w[0] * self.bn(self.c(x)) + w[1] * self.bn(self.c(x))


class SharedBatchNorm(nn.Module):
    """Two convs on one input followed by the same BN module: stats are updated twice in a row."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c1(x)) + 2 * self.bn(self.c2(x))


class SameConvOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c(x) * 2 + self.c(x)


@pytest.mark.parametrize("cls", [SameConvOnly, SameConvTwice, SharedBatchNorm])
def test_horizontal_fusion_with_a_module_reused_at_two_call_sites(cls):
    torch.manual_seed(0)
    model = cls()
    snapshot = {n: t.detach().clone() for n, t in model.state_dict().items()}
    gm, x, before, runs = rewrite(model, [horizontal_fusion])
    params_intact(model)
    for n, t in model.state_dict().items():
        assert torch.equal(t, snapshot[n]), f"the rewrite changed {n}"
    check_exact(model, gm, x)


def test_horizontal_fusion_with_mutation_between_the_convs():
    """``conv_b`` reads ``h`` after an in-place op on ``h``: it cannot run together with ``conv_a``
    (forward-only model: in-place after a conv read is an inference-style model)."""

    class Mutated(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = nn.Conv2d(4, 4, 3, padding=1)
            self.ca = nn.Conv2d(4, 4, 3, padding=1)
            self.cb = nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.c0(x)
            a = self.ca(h)
            self.relu(h)
            return a + self.cb(h)

    torch.manual_seed(0)
    model = Mutated()
    x = torch.randn(*X_SHAPE)
    with torch.no_grad():
        gm = trace(model, (x,))
        run_to_fixpoint(gm, model, [horizontal_fusion], (x,))
        torch.testing.assert_close(gm(x), model(x))


# ---------------------------------------------------------------------------------------------
# weight folding (w * BN(y) -> BN(y) with the weight folded into its affine map), if present
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(passes, "weight_folding"), reason="no weight_folding pass")
class _Folded(nn.Module):
    def __init__(self, affine: bool):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 1, bias=False)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(4, affine=affine) for _ in range(2)])
        self.alpha = nn.Parameter(torch.tensor([0.3, -0.2]))

    def arch_parameters(self):
        return [self.alpha]

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        return sum(wi * bn(c(x)) for wi, c, bn in zip(w, self.convs, self.bns))


def test_weight_folding_leaves_small_batch_norms_alone():
    """Below ``cost.SMALL_IMAGE`` elements the folded affine map costs more than the product it saves."""
    torch.manual_seed(0)
    gm, x, _, _ = rewrite(_Folded(False), [passes.weight_folding])
    assert x.numel() < cost.SMALL_IMAGE and len(modules_called(gm, FusedBatchNorm2d)) == 0
    gm, x, _, _ = rewrite(_Folded(False), [passes.weight_folding], torch.randn(8, 4, 32, 32))
    assert x.numel() >= cost.SMALL_IMAGE and len(modules_called(gm, FusedBatchNorm2d)) == 2


@pytest.mark.parametrize("affine", [False, True])
def test_weight_folding(affine, any_size):
    torch.manual_seed(0)
    model = _Folded(affine)
    gm, x, before, runs = rewrite(model, [passes.weight_folding])
    assert len(modules_called(gm, nn.BatchNorm2d)) == 0
    assert len(modules_called(gm, FusedBatchNorm2d)) == 2
    check_exact(model, gm, x)
    # in eval mode too, after the running statistics moved
    model.train()
    with torch.no_grad():
        model(x)
    assert_eval_equivalent(model, gm, x, rtol=1e-5)
