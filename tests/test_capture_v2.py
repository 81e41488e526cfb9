"""Constructs of real search code that capture used to get silently wrong, or to refuse (issue 22).

Each model is this file's own, written in the idiom of the code where the construct was seen:

3. a custom ``torch.autograd.Function`` whose backward is not its forward's autograd (a binary-gate
   supernet gives every gate a gradient, ProxylessNAS-style): captured as one node calling ``apply``,
   gradients of the gates and of every conv equal the original's, in exact and topo mode;
4. Python numbers read from outside the traced modules' attributes (a module-level scheduler's
   ``decay_rate``, a global dict, a closure over a config object, a class attribute): after the
   training loop changes them, the simplified module follows (captured anew), in both modes.
"""
from __future__ import annotations

import copy
import gc
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn, rand
from torch.autograd import Variable

import topofx
from topofx import capture
from topofx.ir import VALUE
from topofx.testing import assert_train_step_equivalent, train_step_equivalence

MODES = ("exact", "topo")
C = 4


def _x(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, C, 8, 8, generator=torch.Generator().manual_seed(seed))


def _candidates() -> nn.ModuleList:
    return nn.ModuleList([
        nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C, affine=False)),
        nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=False)),
        nn.MaxPool2d(3, 1, 1),
    ])


# --- 3. a custom autograd Function -----------------------------------------------------------------
class ArchGradient(torch.autograd.Function):
    """Forward: the active path's output; backward: d loss / d gate for every path (binary gates)."""

    @staticmethod
    def forward(ctx, gates, active, *outs):
        ctx.save_for_backward(*outs)
        ctx.active = active
        return outs[active].clone()

    @staticmethod
    def backward(ctx, grad):
        outs = ctx.saved_tensors
        gate_grad = torch.stack([(grad * o).sum() for o in outs])
        return (gate_grad, None, *[grad if i == ctx.active else None for i in range(len(outs))])


class BinaryGateEdge(nn.Module):
    def __init__(self):
        super().__init__()
        self.candidate_ops = _candidates()
        self.gates = nn.Parameter(torch.tensor([0.5, 0.3, 0.2]))
        self.active = 0

    def forward(self, x):
        outs = [op(x) for op in self.candidate_ops]
        return ArchGradient.apply(self.gates, self.active, *outs)


class BinaryGateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.edge = BinaryGateEdge()
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.edge(self.stem(x)).mean((2, 3)))


def _applied(gm: torch.fx.GraphModule) -> list[capture.AppliedFunction]:
    """The modules of the graph's nodes that apply a custom Function."""
    modules = (gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module")
    return [m for m in modules if isinstance(m, capture.AppliedFunction)]


@pytest.mark.parametrize("mode", MODES)
def test_custom_autograd_function_keeps_its_backward(mode):
    model, x = BinaryGateNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    applied = _applied(simplified.graph_module)
    assert len(applied) == 1 and applied[0].function is ArchGradient
    report = assert_train_step_equivalent(model, simplified, (x,), arch_params=[model.edge.gates],
                                          candidate_arch_params=[simplified.original.edge.gates])
    assert any(c.category == "arch_grad" for c in report.comparisons)


def test_capture_of_a_function_keeps_the_gate_gradients():
    """Before: capture traced into ``forward`` and the gates got no gradient at all."""
    model, x = BinaryGateNet(), _x()
    gm = capture.trace(model, (x,))
    gm(x).sum().backward()
    assert model.edge.gates.grad is not None and model.edge.gates.grad.abs().sum() > 0


class PathGateGradient(torch.autograd.Function):
    """Forward: the sampled path's output, passed through.  Backward: the binary-gate gradient of every
    path, the paths not taken computed by a bound method of the edge given to ``apply``; from it the
    gradient of ``alpha`` through its softmax (ProxylessNAS-style: not the autograd of the forward)."""

    @staticmethod
    def forward(ctx, path_output, active, alpha, x, out):
        ctx.path_output, ctx.active = path_output, active
        ctx.save_for_backward(alpha, x, out)
        return out.detach().requires_grad_()

    @staticmethod
    def backward(ctx, grad):
        alpha, x, out = ctx.saved_tensors
        with torch.no_grad():  # the other paths run in train mode: their BNs update running statistics
            gate = torch.stack([(grad * (out if k == ctx.active else ctx.path_output(k, x))).sum()
                                for k in range(len(alpha))])
            probs = alpha.softmax(0)
            alpha_grad = probs * (gate - (gate * probs).sum())
        return None, None, alpha_grad, None, grad


class SampledPathEdge(nn.Module):
    """Runs the path sampled outside forward (``active``); ``apply`` is given ``self.path_output``."""

    def __init__(self):
        super().__init__()
        self.candidate_ops = _candidates()
        self.alpha = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))
        self.active = 1

    def path_output(self, k, x):
        return self.candidate_ops[k](x)

    def forward(self, x):
        return PathGateGradient.apply(self.path_output, self.active, self.alpha, x, self.path_output(self.active, x))


class SampledPathNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.edge = SampledPathEdge()
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.edge(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_a_function_given_a_bound_method_keeps_its_backward(mode):
    """Before: ``apply(self.path_output, ...)`` fell back (FX cannot write a bound method into a graph).
    Now the node's module holds the method: outputs, weight and alpha gradients and the running
    statistics that the backward's other paths update equal the eager original's, after a resample too."""
    model, x = SampledPathNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    (applied,) = _applied(simplified.graph_module)
    assert applied.held[0] == simplified.original.edge.path_output  # the very method, by reference
    for active in (1, 0):  # the edge resamples between calls: the simplified module follows
        model.edge.active = simplified.original.edge.active = active
        report = assert_train_step_equivalent(model, simplified, (_x(active + 1),), arch_params=[model.edge.alpha],
                                              candidate_arch_params=[simplified.original.edge.alpha])
        assert {"arch_grad", "buffer"} <= {c.category for c in report.comparisons}
    model.edge.alpha.grad = None
    model(x).sum().backward()
    assert model.edge.alpha.grad.abs().min() > 0  # every path's gate has a gradient: the backward ran


def test_a_copy_calls_the_bound_method_of_its_own_modules():
    """``copy.deepcopy`` of the simplified module: the held method follows the copy of its edge, so the
    copy's backward runs the copy's other paths (its BNs update, the original's stay as they were)."""
    model, x = SampledPathNet(), _x()
    simplified = topofx.simplify(model, (x,), mode="exact", strict=True)
    twin = copy.deepcopy(simplified)
    (held,) = _applied(twin.graph_module)[0].held.values()
    assert held.__self__ is twin.original.edge and held.__self__ is not model.edge
    mean = model.edge.candidate_ops[0][2].running_mean.clone()
    twin(x).sum().backward()
    assert torch.equal(model.edge.candidate_ops[0][2].running_mean, mean) and model.edge.alpha.grad is None
    assert not torch.equal(twin.original.edge.candidate_ops[0][2].running_mean, mean)
    assert twin.original.edge.alpha.grad.abs().min() > 0


class ClosureGateGradient(torch.autograd.Function):
    """ProxylessNAS-style again, closures this time: ``apply`` is given two functions made in forward --
    the active path, and the gate gradients of every path, which closes over the edge's ``alpha``."""

    @staticmethod
    def forward(ctx, x, alpha, run_path, gate_grads):
        ctx.gate_grads = gate_grads
        x_in = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            out = run_path(x_in)
        ctx.save_for_backward(x_in, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        x_in, out = ctx.saved_tensors
        (grad_x,) = torch.autograd.grad(out, x_in, grad)
        return grad_x, ctx.gate_grads(x_in.detach(), out.detach(), grad), None, None


class ClosurePathEdge(nn.Module):
    def __init__(self):
        super().__init__()
        self.candidate_ops = _candidates()
        self.alpha = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))
        self.active = 1

    def forward(self, x):
        ops, active, alpha = self.candidate_ops, self.active, self.alpha

        def gate_grads(x_in, out, grad):
            with torch.no_grad():  # the other paths run in train mode: their BNs update running statistics
                gate = torch.stack([(grad * (out if k == active else ops[k](x_in))).sum() for k in range(len(ops))])
                probs = alpha.softmax(0)
                return probs * (gate - (gate * probs).sum())

        return ClosureGateGradient.apply(x, alpha, lambda t: ops[active](t), gate_grads)


class ClosurePathNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.edge = ClosurePathEdge()
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.edge(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_a_function_given_closures_over_the_models_tensors_keeps_its_backward(mode):
    """Seen on ProxylessNAS's own search code: the closure made while tracing closed over the tracer's
    stand-in for ``alpha``, and every backward returned it (simplify raised, in both modes).  The held
    closure now reads the very parameter; one over the active path's index is another argument when the
    index changes (a re-trace compares what the nodes hold, not only the code); a copy follows the copy
    of the model."""
    model, x = ClosurePathNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert len(_applied(simplified.graph_module)) == 1
    for active in (1, 0, 2):  # a resample between steps: the closure over the index is made anew, as eagerly
        model.edge.active = simplified.original.edge.active = active
        report = assert_train_step_equivalent(model, simplified, (x,), arch_params=[model.edge.alpha],
                                              candidate_arch_params=[simplified.original.edge.alpha])
        assert {"arch_grad", "buffer"} <= {c.category for c in report.comparisons}
    twin = copy.deepcopy(simplified)
    mean = simplified.original.edge.candidate_ops[0][2].running_mean.clone()
    twin(x).sum().backward()
    assert torch.equal(simplified.original.edge.candidate_ops[0][2].running_mean, mean)
    assert simplified.original.edge.alpha.grad is None and twin.original.edge.alpha.grad.abs().min() > 0


class BinarizeRows(torch.autograd.Function):
    """Straight-through one-hot rows: the arg-max of each row in forward (a Python int per row, which
    has no meta kernel), the gradient as is in backward."""

    @staticmethod
    def forward(ctx, probs):
        hard = torch.zeros_like(probs)
        for i in range(probs.size(0)):
            hard[i, int(probs[i].argmax())] = 1.0
        return hard

    @staticmethod
    def backward(ctx, grad):
        return grad


class ZippedMixedOp(nn.Module):
    def __init__(self):
        super().__init__()
        self._ops = _candidates()

    def forward(self, x, weights):
        assert len(weights) == len(self._ops)
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class BinarizedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.edges = nn.ModuleList([ZippedMixedOp() for _ in range(3)])
        self.alphas = nn.Parameter(1e-3 * torch.randn(3, 3))
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        h = self.stem(x)
        for edge, weights in zip(self.edges, BinarizeRows.apply(F.softmax(self.alphas, dim=-1))):
            h = edge(h, weights)
        return self.head(h.mean((2, 3)))


def _binarized_step_holds(model: nn.Module, simplified: nn.Module, x: torch.Tensor, mode: str) -> None:
    """Exact: a training step as the original's.  Topo: the weights are one-hot rows on every call, so
    outputs and weight gradients are the original's (the merged BNs keep statistics of their own, and
    the straight-through gradient of a merged edge is the merge's)."""
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,), arch_params=[model.alphas],
                                     candidate_arch_params=[simplified.original.alphas])
        return
    report = train_step_equivalence(model, simplified, (x,), arch_params=[model.alphas],
                                    candidate_arch_params=[simplified.original.alphas])
    bad = [f"{c.category} {c.name}: {c.rel_error:.2e}" for c in report.comparisons
           if not c.ok and c.category in ("output", "weight_grad")]
    assert not report.problems and not bad, bad


@pytest.mark.parametrize("mode", MODES)
def test_the_output_of_a_function_without_a_meta_run_is_iterated_and_weighs_edges(mode):
    """Before: "iteration over a value whose length is unknown at capture" (a fallback). The Function has
    no meta run (``int(...)`` in its forward), so its output's shape is taken from its real value, a
    decision checked per call: the rows weigh three mixed edges, merged in topo mode."""
    torch.manual_seed(0)
    model, x = BinarizedNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert len(_applied(simplified.graph_module)) == 1 and simplified.report.edges == 3
    if mode == "topo":
        assert sum(len(p.rewrites) for p in simplified.report.passes if p.name == "floating_merge") == 3
    _binarized_step_holds(model, simplified, x, mode)
    with torch.no_grad():  # every row's arg-max moves
        for m in (model, simplified.original):
            m.alphas.copy_(torch.eye(3)[[2, 0, 1]])
    _binarized_step_holds(model, simplified, x, mode)


# --- 4. numbers read from outside the traced modules ------------------------------------------------
class DecayScheduler:
    """Steps a coefficient once per epoch (the auxiliary skip's decay)."""

    def __init__(self, rate: float):
        self.decay_rate = rate

    def step(self) -> None:
        self.decay_rate *= 0.5


scheduler = DecayScheduler(1.0)
SEARCH = {"skip_scale": 1.0}


class SearchConfig:
    tau = 1.0


class AuxSkipCell(nn.Module):
    bias_scale = 1.0  # a class attribute the loop sets on the class

    def __init__(self, config: SearchConfig):
        super().__init__()
        self.candidate_ops = _candidates()
        self.alpha = nn.Parameter(1e-3 * torch.randn(3))
        self.config = config

        def temperature(logits):  # a closure over the config object
            return F.softmax(logits / config.tau, -1)

        self.weights_of = temperature

    def forward(self, x):
        w = self.weights_of(self.alpha)
        mixed = sum(wk * op(x) for wk, op in zip(w, self.candidate_ops))
        return mixed + x * scheduler.decay_rate * SEARCH["skip_scale"] * type(self).bias_scale


class AuxSkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.cell = AuxSkipCell(SearchConfig())
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.cell(self.stem(x)).mean((2, 3)))


def _restore_globals():
    scheduler.decay_rate, SEARCH["skip_scale"], AuxSkipCell.bias_scale = 1.0, 1.0, 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("change", ["scheduler", "global dict", "closure object", "class attribute"])
def test_numbers_read_outside_the_modules_are_followed(mode, change):
    _restore_globals()
    try:
        model, x = AuxSkipNet(), _x()
        simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
        {"scheduler": scheduler.step,
         "global dict": lambda: SEARCH.update(skip_scale=3.0),
         "closure object": lambda: setattr(simplified.original.cell.config, "tau", 0.1),
         "class attribute": lambda: setattr(AuxSkipCell, "bias_scale", 2.5)}[change]()
        model.cell.config.tau = simplified.original.cell.config.tau
        if mode == "exact":
            assert_train_step_equivalent(model, simplified, (x,))
        else:  # topo is vertex-exact only: it must equal a topo simplify made after the change
            fresh = topofx.simplify(copy.deepcopy(simplified.original), (x,), mode=mode, strict=True)
            with torch.no_grad():
                torch.testing.assert_close(simplified(x), fresh(x))
        # the scheduler's and the dict's floats are graph inputs (test_float_inputs.py); a float read
        # through a class attribute stays a guarded constant: its change captures anew
        assert bool(simplified.__dict__.get("recaptured")) == (change in ("closure object", "class attribute"))
    finally:
        _restore_globals()


class AliasingSkipCell(AuxSkipCell):
    """The same numbers, read through locals: no access path in forward's code leads to them."""

    def forward(self, x):
        config, schedule = self.config, scheduler
        w = F.softmax(self.alpha / config.tau, -1)
        mixed = sum(wk * op(x) for wk, op in zip(w, self.candidate_ops))
        return mixed + x * schedule.decay_rate


@pytest.mark.parametrize("mode", MODES)
def test_numbers_read_through_local_aliases_are_followed(mode):
    _restore_globals()
    try:
        model, x = AuxSkipNet(), _x()
        model.cell = AliasingSkipCell(SearchConfig())
        simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
        for change in (scheduler.step, lambda: setattr(simplified.original.cell.config, "tau", 0.1)):
            change()
            model.cell.config.tau = simplified.original.cell.config.tau
            # topo is vertex-exact only: it must equal a topo simplify made after the change
            expected = model if mode == "exact" else topofx.simplify(copy.deepcopy(model), (x,), mode=mode)
            with torch.no_grad():
                torch.testing.assert_close(simplified(x), expected(x), rtol=1e-5, atol=1e-6)
        assert simplified.__dict__.get("recaptured"), "the change was not seen"
    finally:
        _restore_globals()


def test_a_copy_reads_the_same_outside_numbers():
    # DARTS-V2's unrolled step deep-copies the model: the copy follows the same module-level scheduler
    _restore_globals()
    try:
        model, x = AuxSkipNet(), _x()
        simplified = topofx.simplify(copy.deepcopy(model), (x,), mode="exact", strict=True)
        twin = copy.deepcopy(simplified)
        scheduler.step()
        with torch.no_grad():
            torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-6)
        assert not twin.__dict__.get("recaptured")  # the scheduler's coefficient is an input of the copy's graph too
    finally:
        _restore_globals()


GC_PHASES = {"seen": 0.0}


def _count_collections(phase, info):  # a gc callback, as hypothesis and profilers install
    GC_PHASES["seen"] += 1.0


def test_a_gc_callback_is_not_read_by_forward():
    gc.callbacks.append(_count_collections)
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # collect at nearly every allocation: the callback runs inside the trace
    try:
        model, x = AuxSkipNet(), _x()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a guarded gc counter would warn on every change
            simplified = topofx.simplify(copy.deepcopy(model), (x,), mode="exact", strict=True)
            gc.collect()
            simplified(x)
        assert "recaptured" not in simplified.__dict__
        assert not any("GC_PHASES" in r.where for r, _ in simplified.guards.reads)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(_count_collections)


# --- 1. type checks and legacy wrappers on traced values -------------------------------------------
class TypeCheckingEdge(nn.Module):
    """A graph-framework edge: checks what it is given, as library code does, before mixing."""

    def __init__(self):
        super().__init__()
        self.candidate_ops = _candidates()

    def forward(self, x, weights):
        assert isinstance(x, dict) or isinstance(x, torch.Tensor)
        if not isinstance(weights, np.ndarray) and not torch.is_tensor(weights):
            raise TypeError(f"Unsupported type of weights: {type(weights)}")
        mask = Variable(torch.ones_like(x[:, :1]).div_(1.0), requires_grad=False)
        return sum(w * op(x) for w, op in zip(weights, self.candidate_ops)) * mask


class TypeCheckingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.edges = nn.ModuleList([TypeCheckingEdge(), TypeCheckingEdge()])
        self.alpha = nn.Parameter(1e-3 * torch.randn(2, 3))
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        x = self.stem(x)
        weights = F.softmax(self.alpha, dim=-1)
        for edge, w in zip(self.edges, weights):
            x = edge(x, w)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_type_checks_and_variable_see_a_tensor(mode):
    model, x = TypeCheckingNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert simplified.report.fallback is None and simplified.report.edges == 2
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,))
    else:  # both edges' conv candidates merged
        assert sum(r.action == "merged" for r in simplified.report.rewrites) == 2


# --- torch functions reached other than as torch.<name> (DARTS's drop_path, an import by name) ------
class DropPathEdge(nn.Module):
    """A DARTS-style edge whose drop-path draws its mask with a factory imported by name, and checks the
    batch size it reads is a Python int, as library code does."""

    def __init__(self, factory):
        super().__init__()
        self.candidate_ops = _candidates()
        self.alpha = nn.Parameter(1e-3 * torch.randn(3))
        self.factory = factory

    def forward(self, x):
        n = x.size(0)
        assert isinstance(n, int) and not isinstance(n, torch.Tensor)
        out = sum(w * op(x) for w, op in zip(F.softmax(self.alpha, -1), self.candidate_ops))
        return out * self.factory(n)


def _noise_from_imported_rand(n):
    return 1 + 0.2 * rand(1, C, 1, 1)  # `from torch import rand`: no torch.<name> for the tracer to patch


def _dropping_net(factory) -> nn.Module:
    return nn.Sequential(nn.Conv2d(C, C, 3, padding=1), DropPathEdge(factory))


@pytest.mark.parametrize("mode", MODES)
def test_a_factory_imported_by_name_draws_on_every_call(mode):
    """Seen on held-out DARTS-family code: a random factory reached as a name, not as the attribute
    ``torch.rand`` the tracer patches.  Its draw is a graph node (per call, as eagerly); it used to be
    drawn once at capture (refused only because the verification's draw differed)."""
    model, x = _dropping_net(_noise_from_imported_rand), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert simplified.report.fallback is None and simplified.report.edges == 1
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(simplified(x))
    assert torch.equal(draws[0], draws[1]) and not torch.allclose(draws[0], draws[2])
    if mode == "exact":  # (topo mode equals the original at one-hot weights only)
        assert_train_step_equivalent(model, simplified, (x,))


# --- 5. structure the training loop changes between steps ------------------------------------------
class DroppableEdge(nn.Module):
    """Candidates may be set to ``None`` by the loop (to save memory) and skipped by forward."""

    def __init__(self):
        super().__init__()
        self._ops = _candidates()
        self.alpha = nn.Parameter(1e-3 * torch.randn(3))

    def forward(self, x):
        w = F.softmax(self.alpha, -1)
        return sum(w[k] * op(x) for k, op in enumerate(self._ops) if op is not None)


class DroppableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.edge = DroppableEdge()
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.edge(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_candidates_set_to_none_between_steps_are_followed(mode):
    model, x = DroppableNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    dropped = simplified.original.edge._ops[0]
    simplified.original.edge._ops[0] = model.edge._ops[0] = None  # the loop drops a candidate ...
    fresh = topofx.simplify(copy.deepcopy(simplified.original), (x,), mode=mode, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), fresh(x))
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,))
    simplified.original.edge._ops[0] = dropped  # ... and puts it back
    assert simplified.guards.verdict((x,)) == "recapture"


def test_verification_compares_backward():
    """A capture that keeps the forward but changes the backward (here: the Function traced through, as
    capture did before) is refused by the verification, which used to compare outputs only."""
    from unittest import mock

    model, x = BinaryGateNet(), _x()
    with mock.patch.object(capture.tracer, "_is_library_file", lambda filename: True):  # trace through, as before
        gm = capture.trace(model, (x,))
    assert not _applied(gm)
    with pytest.raises(capture.CaptureError, match="training step disagrees"):
        capture.verify_capture(model, gm, (x,))


# --- 2. architecture weights kept as tensors in a Python list --------------------------------------
class ListAlphaNet(nn.Module):
    """Alphas appended per edge to a plain list (no attribute each), replaced between epochs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.edges = nn.ModuleList([_candidates(), _candidates()])
        self.alphas = []
        for _ in self.edges:
            self.alphas.append(Variable(1e-3 * torch.randn(3), requires_grad=True))
        self.head = nn.Linear(C, 3)

    def arch_parameters(self):
        return self.alphas

    def forward(self, x):
        x = self.stem(x)
        for ops, alpha in zip(self.edges, self.alphas):
            w = F.softmax(alpha, dim=-1)
            x = sum(wk * op(x) for wk, op in zip(w, ops))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_alphas_in_a_list_stay_live(mode):
    model, x = ListAlphaNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert simplified.report.edges == 2
    ours = simplified.original.alphas
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,), arch_params=model.alphas, candidate_arch_params=ours)
    simplified(x).sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in ours)  # gradients reach the list's tensors
    with torch.no_grad():
        ours[0].add_(torch.randn(3))  # an optimizer step: followed without a recapture
    calls = simplified.__dict__.get("calls", 0)
    fresh = topofx.simplify(copy.deepcopy(simplified.original), (x,), mode=mode, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), fresh(x))
    assert not simplified.__dict__.get("recaptured") and simplified.__dict__["calls"] == calls + 1
    ours[1] = Variable(torch.tensor([5.0, -5.0, 0.0]), requires_grad=True)  # a new epoch's tensor
    fresh = topofx.simplify(copy.deepcopy(simplified.original), (x,), mode=mode, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), fresh(x))


class EdgeRecord:
    """An edge's data in a graph-based search space: attribute reads go to a private dict."""

    def __init__(self, **fields):
        self._fields = dict(fields)

    def __getattr__(self, key):
        if key.startswith("__") or key == "_fields":
            raise AttributeError(key)
        return self._fields[key]

    def set(self, key, value):
        self._fields[key] = value


class CellGraph(nn.Module):
    """A cell as a DAG of nodes 1 -> 2 -> 3 (plus 1 -> 3), an adjacency dict of edge records holding each
    edge's candidates and its alpha; forward walks the nodes in order and sums their in-edges."""

    def __init__(self):
        super().__init__()
        self._adj = {1: {2: None, 3: None}, 2: {3: None}, 3: {}}
        for u, succ in self._adj.items():
            for v in succ:
                ops = _candidates()
                self.add_module(f"edge_{u}_{v}", ops)
                succ[v] = EdgeRecord(op=ops, alpha=nn.Parameter(1e-3 * torch.randn(3)))
        self.head = nn.Linear(C, 3)

    def edges(self):
        return [(u, v, data) for u, succ in self._adj.items() for v, data in succ.items()]

    def arch_parameters(self):
        return [data.alpha for _, _, data in self.edges()]

    def forward(self, x):
        assert isinstance(x, dict) or isinstance(x, torch.Tensor)
        states = {1: x}
        for node in (2, 3):
            inputs = []
            for u, v, data in self.edges():
                if v == node:
                    w = torch.softmax(data.alpha, dim=-1)
                    inputs.append(sum(wk * op(states[u]) for wk, op in zip(w, data.op)))
            states[node] = sum(inputs)
        return self.head(states[3].mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_alphas_in_a_graphs_edge_records_stay_live(mode):
    model, x = CellGraph(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert simplified.report.edges == 3
    ours = simplified.original.arch_parameters()
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,), arch_params=model.arch_parameters(), candidate_arch_params=ours)
    simplified(x).sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in ours)
    record = simplified.original._adj[1][3]
    record.set("alpha", nn.Parameter(torch.tensor([5.0, -5.0, 0.0])))  # a new tensor in the record
    fresh = topofx.simplify(copy.deepcopy(simplified.original), (x,), mode=mode, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), fresh(x))


class ChoiceBlockNet(nn.Module):
    """NAS-Bench-1Shot1 style: the alphas are plain tensors held by name *and* in ``_arch_parameters``;
    forward reads them only through that list (mixed-op weights by index, the inputs' weights by slice,
    one per choice block), and each choice block sums its weighted inputs before its mixed op."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.blocks = nn.ModuleList([_candidates() for _ in range(3)])
        self.alphas_mixed_op = Variable(1e-3 * torch.randn(3, 3), requires_grad=True)
        self.alphas_inputs = [Variable(1e-3 * torch.randn(1, n), requires_grad=True) for n in (2, 3)]
        self._arch_parameters = [self.alphas_mixed_op, *self.alphas_inputs]

    def arch_parameters(self):
        return self._arch_parameters

    def forward(self, x):
        weights = F.softmax(self._arch_parameters[0], dim=-1)
        input_weights = [F.softmax(a, dim=-1) for a in self._arch_parameters[1:]]
        states = [self.stem(x)]
        for k, ops in enumerate(self.blocks):
            inputs = states if k == 0 else [w * s for w, s in zip(input_weights.pop(0).squeeze(0), states)]
            h = sum(inputs)
            states.append(sum(w * op(h) for w, op in zip(weights[k], ops)))
        return states[-1].mean((2, 3))


@pytest.mark.parametrize("mode", MODES)
def test_alphas_held_by_name_and_read_through_a_list_stay_live(mode):
    """Seen on held-out Beta-DARTS (NAS-Bench-1Shot1 spaces): a tensor held both by name and in a list
    got no slot of its own, so the list read gave forward the real tensor and its softmax was baked into
    the graph (simplify fell back, strict=True raised).  Now read live, and the list, not the name, is
    what the graph follows when the training loop rebinds one of them."""
    model, x = ChoiceBlockNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert simplified.report.edges >= 3  # the mixed ops (topology may also count the weighted input sums)
    ours = simplified.original.arch_parameters()
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,), arch_params=model.arch_parameters(), candidate_arch_params=ours)
    simplified(x).sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in ours)
    simplified.original.alphas_mixed_op = Variable(torch.randn(3, 3), requires_grad=True)  # the name only
    fresh = topofx.simplify(copy.deepcopy(simplified.original), (x,), mode=mode, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), fresh(x))
    ours[0] = Variable(torch.randn(3, 3), requires_grad=True)  # the list's element: forward reads this one
    fresh = topofx.simplify(copy.deepcopy(simplified.original), (x,), mode=mode, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), fresh(x))


class ListedScalesNet(nn.Module):
    """Path scales held by name and listed in ``_betas``; forward multiplies by the listed tensors as they are."""

    def __init__(self):
        super().__init__()
        self.ops = _candidates()[:2]
        self.beta0 = Variable(torch.tensor(0.3), requires_grad=True)
        self.beta1 = Variable(torch.tensor(0.7), requires_grad=True)
        self._betas = [self.beta0, self.beta1]

    def forward(self, x):
        return sum(b * op(x) for b, op in zip(self._betas, self.ops))


def test_a_tensor_read_through_a_list_is_not_read_by_its_name():
    """The same tensor held by name and in a list, used as it is: the graph read it by its name (FX finds a
    registered tensor's name by identity), so after the training loop rebound the name -- forward still
    multiplying by the list's tensor -- the simplified module silently used the new one.  (A capture
    matter: exact mode, where the simplified module equals the original at any weights.)"""
    model, x = ListedScalesNet(), _x()
    simplified = topofx.simplify(model, (x,), mode="exact", strict=True)
    model.beta1 = Variable(torch.tensor(-3.0), requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), model(x))
    model._betas[0] = Variable(torch.tensor(5.0), requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), model(x))


class ProjectedAlphasNet(nn.Module):
    """ISTA-NAS style: forward(x, all_freeze) projects compressed alphas into ``self.alphas_normal`` (a plain
    attribute assigned anew on every call) unless ``all_freeze``, and every cell reads that attribute."""

    def __init__(self):
        super().__init__()
        self.ops = _candidates()
        self.alphas_ = nn.Parameter(torch.randn(2, 2))
        self.A = torch.randn(2, 3)

    def proj_alphas(self):
        self.alphas_normal = self.alphas_.mm(self.A)

    def forward(self, x, all_freeze=False):
        if not all_freeze:
            self.proj_alphas()
        for i in range(2):
            x = sum(w * op(x) for w, op in zip(self.alphas_normal[i], self.ops))
        return x


@pytest.mark.parametrize("fresh", [True, False], ids=["new-attribute", "existing-attribute"])
@pytest.mark.parametrize("mode", MODES)
def test_an_attribute_forward_assigns_every_call_is_assigned_by_the_graph(mode, fresh):
    """Before: the trace's write was dropped (a new attribute was deleted with FX's constants, an existing
    plain tensor was put back) and simplify captured: after an architecture step, the ``all_freeze`` call
    read a stale ``alphas_normal`` -- silently wrong.  Now the graph assigns it (an AttributeStore node)."""
    model, x = ProjectedAlphasNet(), _x()
    if not fresh:
        with torch.no_grad():
            model(x)  # a previous call left the attribute
    twin = copy.deepcopy(model)
    simplified = topofx.simplify(twin, (x,), mode=mode, strict=True)
    held = [v for m in simplified.graph_module.modules() for v in (*vars(m).values(), *m._buffers.values())]
    assert not any(isinstance(v, torch.fx.Proxy) for v in held), "the trace's stand-in was left on the graph module"
    with torch.no_grad():
        for step, freeze in enumerate([False, True, False, True]):
            if step == 2:  # an architecture step
                model.alphas_.add_(1.0)
                twin.alphas_.add_(1.0)
            torch.testing.assert_close(simplified(x, freeze), model(x, freeze))
            torch.testing.assert_close(twin.alphas_normal, model.alphas_normal)
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,), arch_params=[model.alphas_],
                                     candidate_arch_params=[twin.alphas_])


# --- forward that stores Python state on its first call (SNAS's resource counts) --------------------
class CountedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.flops = 0

    def forward(self, x):
        if self.flops == 0:  # counted once, from the input's size
            self.flops = C * C * 9 * x.size()[2] ** 2
        return self.op(x)


class CountingMixedOp(nn.Module):
    def __init__(self, resource_row):
        super().__init__()
        self._ops = nn.ModuleList([CountedConv(), CountedConv()])
        self._resource = resource_row  # a view of the network's table
        self.counted = False

    def forward(self, x, weights):
        if self.counted:
            return sum(w * op(x) for w, op in zip(weights, self._ops))
        result = 0
        for index, (w, op) in enumerate(zip(weights, self._ops)):
            result += w * op(x)
            self._resource[index] = op.flops
        self.counted = True
        return result


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.op_flops = torch.zeros(1, 2)
        self.log_alpha = torch.zeros(1, 2).normal_(1, 0.01).requires_grad_()
        self.mixed = CountingMixedOp(self.op_flops[0])

    def forward(self, x):
        w = F.softmax(self.log_alpha, dim=-1)
        return self.mixed(x, w[0]), (self.op_flops * w).sum()  # output and resource penalty


@pytest.mark.parametrize("mode", MODES)
def test_first_call_python_state_is_made_eagerly_then_captured(mode):
    """The trace used to leave traced values in ``flops`` and ``counted = True`` on the real modules: the
    graph replayed the first call, the eager model did not (fallback, relative error ~1e12)."""
    model, x = CountingNet(), _x()
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert simplified.original.mixed._ops[0].flops == C * C * 9 * 64 and simplified.original.mixed.counted
    model(x)  # the original after its own first call
    if mode == "exact":
        assert_train_step_equivalent(model, simplified, (x,), arch_params=[model.log_alpha],
                                     candidate_arch_params=[simplified.original.log_alpha])
    with torch.no_grad():
        torch.testing.assert_close(simplified(x)[1], model(x)[1])  # the penalty reads the counts


# --- 6. a projection loop that changes the supernet after simplify (DARTS-PT) ------------------------
class SkipZeroMixedOp(nn.Module):
    """Candidates whose weight is exactly zero are not run (a projected edge computes its one op)."""

    def __init__(self):
        super().__init__()
        self._ops = _candidates()

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops) if w != 0)


class ProjectionNet(nn.Module):
    """Per cell type: alphas, a bool flag per edge (still a candidate edge) and the one-hot rows of the
    projected edges, in dicts by cell type; projection writes the row and clears the flag, and the
    weights forward uses are the softmax with the projected rows written over through ``.data``."""

    def __init__(self, edges: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.cells = nn.ModuleDict({kind: nn.ModuleList([SkipZeroMixedOp() for _ in range(edges)])
                                    for kind in ("normal", "reduce")})
        self.head = nn.Linear(C, 3)
        self.alphas = {kind: (1e-3 * torch.randn(edges, 3)).requires_grad_() for kind in self.cells}
        self.candidate_flags = {kind: torch.ones(edges, dtype=torch.bool) for kind in self.cells}
        self.proj_weights = {kind: torch.zeros(edges, 3) for kind in self.cells}

    def arch_parameters(self):
        return list(self.alphas.values())

    def project_op(self, eid: int, opid: int, kind: str) -> None:
        self.proj_weights[kind][eid][opid] = 1
        self.candidate_flags[kind][eid] = False

    def get_projected_weights(self, kind: str) -> torch.Tensor:
        weights = F.softmax(self.alphas[kind], dim=-1)
        for eid in range(len(self.cells[kind])):
            if not self.candidate_flags[kind][eid]:
                weights[eid].data.copy_(self.proj_weights[kind][eid])
        return weights

    def forward(self, x):
        x = self.stem(x)
        for kind, cell in self.cells.items():
            weights = self.get_projected_weights(kind)
            for i, edge in enumerate(cell):
                x = x + edge(x, weights[i])
        return self.head(x.mean((2, 3)))


def test_projections_after_simplify_keep_training_equivalent():
    """Each projection changes a decision the graph baked in; from the second on, the deciding method
    runs per call and the model is captured anew, iterating over that method's result: its shape is
    known on meta, so the capture keeps a graph (it used to fall back, and the drop-in to crash in the
    training step: ``recapture`` trained a graph module ``None``)."""
    torch.manual_seed(0)
    model, x = ProjectionNet(), _x()
    model.project_op(0, 1, "normal")  # projected before simplify, as DARTS-PT's first epoch does
    simplified = topofx.simplify(model, (x,), mode="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "decides in Python on values that changed again": per call
        for eid, kind in ((1, "normal"), (0, "reduce"), (2, "normal"), (1, "reduce")):
            model.project_op(eid, 0, kind)
            assert_train_step_equivalent(model, simplified, (x,), arch_params=model.arch_parameters())
            assert simplified.graph_module is not None and not simplified.report.fallback
    assert simplified.__dict__.get("recaptured")


def test_meta_value_of_a_per_call_method_reading_held_tensors():
    """A method run per call that takes no tensor arguments and reads tensors held in dicts: its
    node's value is known on meta with its real shape (it used to be unknown: the method ran on the
    trace's stand-ins of the held tensors and its Python decision raised)."""
    model, x = ProjectionNet(), _x()
    capture.PER_CALL[model] = {capture.unit_key(model, (model, "get_projected_weights"))}
    try:
        gm = capture.trace(model, (x,))
    finally:
        capture.PER_CALL.pop(model, None)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                 capture.MethodCall)]
    assert len(calls) == 2
    assert all(n.meta[VALUE].shape == (3, 3) and n.meta[VALUE].is_meta for n in calls)


class ClippingProjectionNet(ProjectionNet):
    """Once the loop turns clipping on, forward decides on the input's values: that cannot be captured."""

    clip = None  # set by the loop mid-search

    def forward(self, x):
        if self.clip is not None and x.abs().max() > self.clip:
            x = x.clamp(-self.clip, self.clip)
        return super().forward(x)


def test_a_recapture_that_falls_back_runs_the_original_and_warns_once():
    torch.manual_seed(0)
    model, x = ClippingProjectionNet(), _x()
    simplified = topofx.simplify(model, (x,), mode="exact")
    assert simplified.graph_module is not None
    model.clip = 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_train_step_equivalent(model, simplified, (x,), arch_params=model.arch_parameters())
        model.project_op(0, 1, "normal")
        assert_train_step_equivalent(model, simplified, (x,), arch_params=model.arch_parameters())
    assert simplified.graph_module is None  # from now on the original's eager forward
    fallbacks = [w for w in caught if "Falling back to the model's own eager forward" in str(w.message)]
    assert len(fallbacks) == 1 and "x.abs().max()" in str(fallbacks[0].message)


# --- 7. tensors with autograd history held across the step, never read by forward (SmoothDARTS) ------
class SavedAlphasNet(nn.Module):
    """The weight step softmaxes the alphas in place and keeps clones of the originals (with autograd
    history) in a list until the step is over; forward reads the alphas only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 3, padding=1)
        self.edges = nn.ModuleList([_candidates(), _candidates()])
        self.alphas_normal = (1e-3 * torch.randn(2, 3)).requires_grad_()
        self._arch_parameters = [self.alphas_normal]
        self.head = nn.Linear(C, 3)

    def arch_parameters(self):
        return self._arch_parameters

    def softmax_arch_parameters(self):
        self._saved_arch_parameters = [p.clone() for p in self._arch_parameters]
        for p in self._arch_parameters:
            p.data.copy_(F.softmax(p, dim=-1))

    def restore_arch_parameters(self):
        for p, saved in zip(self._arch_parameters, self._saved_arch_parameters):
            p.data.copy_(saved.data)
        del self._saved_arch_parameters

    def forward(self, x):
        x = self.stem(x)
        for ops, w in zip(self.edges, self.alphas_normal):
            x = x + sum(wk * op(x) for wk, op in zip(w, ops))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_tensors_with_history_that_forward_never_reads_are_no_part_of_the_graph(mode):
    """They used to become ``get_attr`` nodes without users, and the capture was refused for reading a
    tensor with autograd history computed before the call."""
    torch.manual_seed(0)
    model, x = SavedAlphasNet(), _x()
    model.softmax_arch_parameters()
    simplified = topofx.simplify(model, (x,), mode=mode, strict=True)
    assert not any("saved" in str(n.target) for n in simplified.graph_module.graph.nodes)
    for _ in range(2):  # weight steps: each keeps new clones and restores them after
        if mode == "exact":
            assert_train_step_equivalent(model, simplified, (x,), arch_params=model.arch_parameters())
        model.restore_arch_parameters()
        model.softmax_arch_parameters()
    model.restore_arch_parameters()
    fresh = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(simplified(x), fresh(x))
    assert not simplified.__dict__.get("recaptured")


def test_a_copy_of_held_closures_keeps_their_shape():
    """Copying a held closure (``copy.deepcopy`` of the simplified module): one that calls itself copies
    once, one whose cell is bound only later keeps that cell unbound (it raised)."""
    from topofx.capture.values import _copy_function

    def make():
        def depth(n):
            return 0 if n == 0 else depth(n - 1) + step

        def later():
            return bound_later  # noqa: F821 - assigned after this function is made, never here

        step = 2
        return depth, later

    depth, later = make()
    depth_copy, later_copy = _copy_function(depth, {}), _copy_function(later, {})
    assert depth_copy(3) == 6 and depth_copy is not depth
    assert depth_copy in [c.cell_contents for c in depth_copy.__closure__]  # it calls its copy, not the original
    with pytest.raises(NameError):
        later_copy()



class DirichletMixEdge(nn.Module):
    """DrNAS-style: the edge's mixing weights are a Dirichlet sample of its concentration each call."""

    def __init__(self):
        super().__init__()
        self.candidate_ops = _candidates()
        self.beta = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        weights = torch.distributions.Dirichlet(F.elu(self.beta) + 1).rsample()
        return sum(w * op(x) for w, op in zip(weights, self.candidate_ops))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("edge, node", [(ClosurePathEdge, capture.AppliedFunction),
                                        (DirichletMixEdge, capture.DistributionCall)])
def test_a_sequential_root_whose_edge_becomes_a_node_of_topofx(edge, node, mode):
    """Seen on ProxylessNAS's supernet under an ``nn.Sequential`` root: the module of a Function's or a
    distribution's node was registered on the root while the root's forward iterated its children
    ("dictionary changed size during iteration", a fallback); the root's children stay as they were."""
    model, x = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), edge(), nn.Conv2d(C, C, 1)), _x()
    children = dict(model.named_children())
    simplified = topofx.simplify(copy.deepcopy(model), (x,), mode=mode, strict=True)
    assert simplified.report.fallback is None
    assert any(isinstance(m, node) for m in simplified.graph_module.children())
    assert dict(simplified.original.named_children()).keys() == children.keys()
    assert not any(name.startswith("topofx_") for name in vars(simplified.original))
    if mode == "exact":  # (topo mode equals the original at one-hot weights only)
        assert_train_step_equivalent(model, simplified, (x,))


# --- the caller's random streams (issue 22, F3) ------------------------------------------------------
class JitteredDropPathEdge(nn.Module):
    """A NoisyDARTS-style edge: its drop-path mask comes from ``torch.cuda.FloatTensor(n, 1, 1, 1)``
    (a CPU stand-in here, a Python callable the graph records) and ``bernoulli_``; whether to drop at
    all is decided with Python's and NumPy's generators, both with probability one, in a method of its
    own (draws a graph cannot make: the method runs per call, ``topofx.capture.host_random``)."""

    def __init__(self, keep: float = 0.7):
        super().__init__()
        self.candidate_ops = _candidates()
        self.alpha = nn.Parameter(1e-3 * torch.randn(3))
        self.keep = keep

    def forward(self, x):
        out = sum(w * op(x) for w, op in zip(F.softmax(self.alpha, -1), self.candidate_ops))
        return self.jitter(out)

    def jitter(self, out):
        if random.random() < 1.0 and np.random.uniform() < 1.0:
            mask = torch.cuda.FloatTensor(out.size(0), 1, 1, 1).bernoulli_(self.keep)
            out = out / self.keep * mask
        return out


def _random_streams() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


@pytest.mark.parametrize("mode", MODES)
def test_simplify_leaves_the_callers_random_streams_as_it_found_them(mode, monkeypatch):
    """Capture, verification and the rewrites run the user's code for real; a draw they made moved the
    search loop's random streams (the rewrites' meta run of the recorded stand-in drew a real mask), so
    the draws after ``simplify`` differed from those without it."""
    monkeypatch.setattr(torch.cuda, "FloatTensor", lambda *size: torch.empty(*size))
    model, x = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), JitteredDropPathEdge()), _x()
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    before = _random_streams()
    simplified = topofx.simplify(model, (x,), mode=mode, strict=True)
    after = _random_streams()
    assert simplified.report.fallback is None and simplified.report.edges == 1
    assert torch.equal(after[0], before[0]), "torch's generator moved"
    assert after[1] == before[1], "Python's random moved"
    assert (after[2] == before[2]).all(), "NumPy's generator moved"
