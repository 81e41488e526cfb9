"""Capture: what cannot be captured is named precisely; what can be captured is kept live.

Why: a supernet with data-dependent Python control flow cannot become one static graph.  With
``strict=True`` ``simplify`` must raise :class:`topofx.CaptureError` naming the user's file, line
and source text of the construct; without it, it must warn with the same location and fall back to
the model's own eager forward (``report.fallback`` set, outputs unchanged).  Conversely, conditions
on shapes only (PC-DARTS) must be resolved at capture, without a fallback, and architecture
weights kept as plain ``requires_grad`` tensors (original DARTS) must stay live: never frozen into
the graph as constants.

The models below are written in this file on purpose: the error must point *here*.  Each
construct's line carries a ``# CONSTRUCT:<tag>`` marker that :func:`construct` looks up, so the
expected line numbers survive edits of this file.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import topofx
from topofx import CaptureError, zoo
from topofx.testing import (
    assert_eval_equivalent,
    assert_follows_alpha,
    assert_train_step_equivalent,
)

THIS_FILE = os.path.abspath(__file__)


def construct(tag: str) -> tuple[int, str]:
    """(line number, stripped source text) of the line marked ``# CONSTRUCT:<tag>`` in this file."""
    marker = f"# CONSTRUCT:{tag}"
    with open(THIS_FILE) as f:
        for lineno, line in enumerate(f, 1):
            if line.rstrip().endswith(marker):
                return lineno, line[: line.index("#")].strip()
    raise LookupError(marker)


def assert_names_construct(message: str, tag: str) -> None:
    lineno, source = construct(tag)
    assert f"{THIS_FILE}:{lineno}" in message, f"expected {THIS_FILE}:{lineno} in: {message}"
    assert source in message, f"expected the source text {source!r} in: {message}"


def topofx_warnings(records) -> list[str]:
    return [str(r.message) for r in records if "topofx" in str(r.message)]


# ---------------------------------------------------------------------------------------------
# models with data-dependent control flow, written here
# ---------------------------------------------------------------------------------------------
class DataDependentIf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # CONSTRUCT:if
            return y.relu()
        return -y


class ItemSelectsOp(nn.Module):
    """GDAS-like: pick the candidate to run with ``.item()``."""

    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)])
        self.alpha = nn.Parameter(torch.tensor([0.1, 0.9]))

    def forward(self, x):
        return self.ops[torch.argmax(self.alpha).item()](x)  # CONSTRUCT:item-index


class ItemInIf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean().item() > 0:  # CONSTRUCT:item-if
            y = y * 2
        return y


CASES = [
    pytest.param(DataDependentIf, "if", id="if-sum"),
    pytest.param(ItemInIf, "item-if", id="item-if"),
]


def make(cls):
    torch.manual_seed(0)
    return cls(), torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("cls, tag", CASES)
def test_strict_raises_naming_the_construct(cls, tag):
    model, x = make(cls)
    with pytest.raises(CaptureError) as info:
        topofx.simplify(model, x, mode="exact", strict=True)
    assert_names_construct(str(info.value), tag)


@pytest.mark.parametrize("cls, tag", CASES)
def test_non_strict_warns_and_falls_back(cls, tag):
    model, x = make(cls)
    with pytest.warns(UserWarning) as records:
        simple = topofx.simplify(model, x, mode="exact")
    messages = topofx_warnings(records)
    assert len(messages) == 1, messages
    assert_names_construct(messages[0], tag)
    # the warning is attributed to the caller of simplify (this file), not to topofx internals
    located = [r for r in records if "topofx" in str(r.message)][0]
    assert os.path.abspath(located.filename) == THIS_FILE
    report = simple.report
    assert report.fallback
    assert_names_construct(report.fallback, tag)
    assert simple.graph_module is None
    assert "fallback" in str(report)
    # eager fallback: identical behaviour, same parameters
    assert all(p is q for p, q in zip(simple.parameters(), model.parameters(), strict=True))
    assert_train_step_equivalent(model, simple, x, rtol=0, atol=0)
    assert_eval_equivalent(model, simple, x, rtol=0, atol=0)


def test_item_of_architecture_values_is_captured_and_guarded():
    """``ops[argmax(alpha).item()]`` decides on architecture values only: captured for the current
    choice, and captured again when a step of the alphas changes it."""
    model, x = make(ItemSelectsOp)
    simple = topofx.simplify(copy.deepcopy(model), x, mode="exact", strict=True)
    assert simple.report.fallback is None
    torch.testing.assert_close(simple(x), model(x))
    code = simple.graph_module.code
    with torch.no_grad():
        for m in (model, simple):
            m.alpha.copy_(torch.tensor([0.9, 0.1]))  # the other candidate wins now
    torch.testing.assert_close(simple(x), model(x))
    assert simple.graph_module.code != code  # captured anew for the new choice


def test_item_used_as_a_number_is_captured_and_recomputed():
    """``.item()`` that only feeds arithmetic is capturable, but must stay a graph op: its value
    on the example input must not be baked in as a constant."""

    class ScaleByItem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y * y.abs().mean().item()

    model, x = make(ScaleByItem)
    simple = topofx.simplify(model, x, mode="exact", strict=True)
    assert simple.report.fallback is None
    other = 5 * torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(simple(other), model(other))


# ---------------------------------------------------------------------------------------------
# zoo models with data-dependent control flow (GDAS: hard sampling with .item())
# ---------------------------------------------------------------------------------------------
def test_nb201_gdas_is_captured_without_an_adapter(monkeypatch):
    """xautodl's GDAS redraws until finite in its own forward (speculated: the redraw is never needed
    on a fresh draw, and a call that needs it runs eagerly) and picks candidates with ``.item()`` in its
    cells (which run per call): one graph, exactly GDAS's step -- the way a copy of GDAS's code that
    no adapter is registered for is captured."""
    monkeypatch.setattr(topofx.simplifier, "adapter_for", lambda model: None)
    model, x = zoo.build("nb201-gdas", C=8, N=1, image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simple = topofx.simplify(copy.deepcopy(model), x, mode="exact", strict=True)
    assert simple.report.fallback is None
    assert simple.report.decided_per_call and simple.graph_module.meta["topofx_speculation"]
    assert_train_step_equivalent(model, simple, x)


def test_gdas_style_zoo_model_is_captured_with_its_sampling_and_cells_run_per_call():
    """GDAS written as a sampling method (redraw until finite) and cells that pick their candidate with
    ``.item()``: the redraw never happens on a fresh draw (speculated, checked per call); the cells'
    choice changes with every draw (each cell runs per call, as written). One graph, no adapter."""
    model, x = zoo.build("gdas-style", C=4, N=1, image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simple = topofx.simplify(copy.deepcopy(model), x, mode="exact", strict=True)
    assert simple.report.fallback is None
    decided = simple.graph_module.meta["topofx_decided_per_call"]
    assert any(name.startswith("cells.") for name in decided)  # `.item()` of the sampled index: per call
    assert simple.graph_module.meta["topofx_speculation"]  # the redraw-until-finite loop: speculated
    assert_train_step_equivalent(model, simple, x)


# ---------------------------------------------------------------------------------------------
# conditions on shapes only: PC-DARTS
# ---------------------------------------------------------------------------------------------
def test_pcdarts_shape_condition_is_captured_without_fallback():
    model, x = zoo.build("pcdarts", C=8, layers=3, steps=2, multiplier=2, image_size=16, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no warning at all
        simple = topofx.simplify(model, x, mode="exact", strict=True)
    assert simple.report.fallback is None and simple.graph_module is not None
    # the shape condition took, per edge, the branch the eager forward takes: the graph calls the
    # bypass max-pools exactly as often as the eager model does (checked on the raw capture)
    from topofx.capture import trace

    calls = {}
    pools = [m for n, m in model.named_modules() if n.endswith(".mp")]
    assert pools, "PC-DARTS edges have a bypass max-pool named mp"
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls.get(id(mod), 0) + 1))
             for m in pools]
    try:
        with torch.no_grad():
            model.eval()
            model(*x)
            model.train()
    finally:
        for h in hooks:
            h.remove()
    gm = trace(model, x)
    in_graph = sum(1 for n in gm.graph.nodes if n.op == "call_module" and str(n.target).endswith(".mp"))
    assert 0 < in_graph == sum(calls.values()) < len(pools)
    assert_train_step_equivalent(model, simple, x, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# plain-tensor architecture weights (original DARTS) stay live
# ---------------------------------------------------------------------------------------------
def _darts_orig(dtype=torch.float32):
    model, x = zoo.build("darts-orig", C=4, layers=3, steps=2, multiplier=2, image_size=16, batch_size=4)
    return model, x


def test_darts_orig_plain_alphas_stay_live():
    model, x = _darts_orig()
    alphas = [model.alphas_normal, model.alphas_reduce]
    assert all(not isinstance(a, nn.Parameter) and a.requires_grad and a.is_leaf for a in alphas)
    simple = topofx.simplify(model, x, mode="exact")
    assert simple.report.fallback is None
    # after capture the model still holds the very same plain tensors (not buffers, not params)
    assert model.alphas_normal is alphas[0] and model.alphas_reduce is alphas[1]
    assert "alphas_normal" not in dict(model.named_buffers())
    assert "alphas_normal" not in model.state_dict()

    simple.eval()
    with torch.no_grad():
        before = simple(*x)
        for a in alphas:
            a.add_(torch.randn_like(a))
        after = simple(*x)
        expected = model(*x)
    assert not torch.allclose(before, after), "changing alpha did not change the output"
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)

    simple.train()
    for a in alphas:
        a.grad = None
    simple(*x).square().sum().backward()
    for a in alphas:
        assert a.grad is not None and a.grad.abs().sum() > 0
    assert_train_step_equivalent(model, simple, x, rtol=1e-5)
    assert_follows_alpha(model, simple, x)


def test_darts_orig_plain_alphas_stay_live_after_dtype_cast():
    """``simplified.double()`` must not snapshot the plain-tensor alphas: the original model keeps
    following (and sending gradients to) them after ``.double()`` (type promotion), so must the
    simplified module."""
    model, x = _darts_orig()
    simple = topofx.simplify(model, x, mode="exact")
    simple.double()
    x64 = tuple(t.double() for t in x)
    assert_follows_alpha(model, simple, x64)
    # the plain alphas stay float32 in both (.double() does not touch them), so their gradients are
    # float32 sums: compare at float32 precision
    assert_train_step_equivalent(model, simple, x64, rtol=1e-6, atol=1e-12)


def test_tensor_with_history_no_module_holds_is_refused():
    """A weight computed with autograd history outside forward() and held by no module (a closure)
    would be frozen: refuse it.  (One a module holds is a graph input: tests/test_tensor_inputs.py.)"""
    alpha = nn.Parameter(torch.zeros(2))
    weights = F.softmax(alpha, dim=-1)  # has grad_fn; FX makes it a constant of the graph

    class Precomputed(nn.Module):
        def __init__(self):
            super().__init__()
            self.ops = nn.ModuleList([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)])

        def forward(self, x):
            return sum(w * op(x) for w, op in zip(weights, self.ops))

    model, x = make(Precomputed)
    with pytest.raises(CaptureError, match="that no module holds"):
        topofx.simplify(model, x, mode="exact", strict=True)


# ---------------------------------------------------------------------------------------------
# Python branches on self.training are resolved at capture
# ---------------------------------------------------------------------------------------------
class TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.alpha = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        y = w[0] * self.conv(x) + w[1] * x.mean(1, keepdim=True)
        if self.training:  # e.g. drop-path or noise only while training
            y = y * 2
        return y


def test_branch_on_self_training_is_not_baked_in():
    """Captured in train mode, the simplified module must still behave like the original in eval
    mode (exact mode promises equality in train *and* eval), or refuse/fall back."""
    model, x = make(TrainingBranch)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        simple = topofx.simplify(model, x, mode="exact")
    assert_train_step_equivalent(model, simple, x, rtol=1e-5)
    assert_eval_equivalent(model, simple, x, rtol=1e-5)
