"""The drop-in guards compare only the attributes of traced modules that traced code can read
(``topofx/capture/reads.py``: ``ReadRecorder.attributes_read``): an attribute forward reads is still
caught when it changes, one it never reads (a training loop's bookkeeping: SmoothDARTS's saved alphas, a
step counter) costs no re-trace; code that reads attributes by computed names keeps every attribute
compared."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import topofx
from topofx.capture import guards
from topofx.capture.reads import reads_unnamed


class _Edge(nn.Module):
    def __init__(self):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1), nn.Identity()])
        self.kinds = ["conv", "conv", "skip"]  # read by forward: a list decides which candidates run
        self.repeat = 1  # read by forward: a number baked into the graph
        self.history = []  # never read by forward: the training loop's own records
        self.step = 0  # never read by forward: a per-step counter

    def forward(self, x, weights):
        out = sum(w * op(x) for w, op, kind in zip(weights, self.ops, self.kinds) if kind != "none")
        for _ in range(self.repeat - 1):
            out = out + self.ops[2](x)
        return out


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.edges = nn.ModuleList([_Edge(), _Edge()])
        self.alpha = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        for edge, w in zip(self.edges, self.alpha.softmax(-1)):
            x = edge(x, w)
        return x


def _simplified(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, torch.Tensor, list]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    simplified = topofx.simplify(model, x, mode="exact", strict=True)
    traces: list = []
    real = guards.retraces_same
    monkeypatch.setattr(guards, "retraces_same", lambda *a: traces.append(1) or real(*a))
    return simplified, x, traces


@pytest.mark.parametrize("change", ["number", "list item", "list"])
def test_an_attribute_forward_reads_is_still_caught(change, monkeypatch):
    torch.manual_seed(0)
    model = _Net()
    simplified, x, _ = _simplified(model, monkeypatch)
    graph = simplified.graph_module
    edge = model.edges[1]
    if change == "number":
        edge.repeat = 3
    elif change == "list item":
        edge.kinds[0] = "none"  # in place: no assignment to watch
    else:
        edge.kinds = ["none", "conv", "skip"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(simplified(x), model(x))
    assert simplified.graph_module is not graph  # captured anew: the graph depended on it


def test_attributes_forward_never_reads_cost_no_retrace(monkeypatch):
    """Bookkeeping the training loop writes between steps (a list of tensor copies, a counter) is not
    compared at all: no re-trace, no warning, the same graph."""
    torch.manual_seed(0)
    model = _Net()

    def bookkeeping(step: int) -> None:
        for edge in model.edges:
            edge.history = [p.detach().clone() for p in edge.parameters()]
            edge.step = step + 1
        with torch.no_grad():
            model.alpha.add_(0.01)

    _assert_steps_keep_the_graph(model, bookkeeping, 4, monkeypatch)


def _assert_steps_keep_the_graph(model: nn.Module, change, steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``change(step)`` before each of ``steps`` calls: equal to the original, no warning, no re-trace."""
    simplified, x, traces = _simplified(model, monkeypatch)
    graph = simplified.graph_module
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(steps):
            change(step)
            torch.testing.assert_close(simplified(x), model(x))
    assert traces == [] and simplified.graph_module is graph


class _ByComputedName(nn.Module):
    """Reads its numbers through ``getattr`` with names built at run time: what it reads is not in its code."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.copies0, self.copies1 = 1, 2

    def forward(self, x, level: int = 1):
        for _ in range(getattr(self, f"copies{level}")):
            x = self.conv(x)
        return x


def test_attributes_read_by_computed_names_are_all_compared(monkeypatch):
    model = _ByComputedName()
    simplified, x, _ = _simplified(model, monkeypatch)
    assert simplified.guards.attributes_read is None
    model.copies1 = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(simplified(x), model(x))


class _StridedConv(nn.Conv2d):
    """A torch module subclassed: its forward is traced through, and torch's own ``Conv2d.forward``
    reads ``self.stride`` -- a name the user's code never spells."""

    def forward(self, x):
        return super().forward(x).relu()


class _Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _StridedConv(3, 3, 3, padding=1)
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.conv(x) * self.alpha


def test_an_attribute_a_library_method_reads_is_caught(monkeypatch):
    model = _Strided()
    simplified, x, _ = _simplified(model, monkeypatch)
    assert "stride" in simplified.guards.attributes_read
    model.conv.stride = (2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = simplified(x)
    assert out.shape == model(x).shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, model(x))


def _constant(self):
    return getattr(self, "alpha", None), hasattr(self.cells[0], "beta")


def _computed(self, i):
    return getattr(self, f"op{i}")


def _computed_with_constant_default(self, name):
    return getattr(self, name, "default")


def _enumerating(self):
    return [k for k in vars(self)], self.__dict__


@pytest.mark.parametrize("fn, unnamed", [(_constant, False), (_computed, True),
                                         (_computed_with_constant_default, True), (_enumerating, True)])
def test_reads_by_computed_names_are_recognised(fn, unnamed):
    assert reads_unnamed(fn.__code__) is unnamed


class _EdgeRecord:
    """A graph-based model's edge record (NASLib's idiom): the optimizer writes the sampled index and a
    per-step tag onto it between steps; forward reads ``scale`` from it."""

    def __init__(self):
        self.argmax, self.scale = 0, 1.0


class _RecordEdge(nn.Module):
    def __init__(self, record: _EdgeRecord):
        super().__init__()
        self.ops = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1), nn.Identity()])
        self.record = record

    def forward(self, x, weights):
        top = torch.argmax(weights)  # a name loaded off the torch module: reads no record
        record = self.record
        return sum(w * op(x) for w, op in zip(weights, self.ops)) * record.scale + 0 * top


class _RecordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.records = [_EdgeRecord(), _EdgeRecord()]
        self.edges = nn.ModuleList([_RecordEdge(r) for r in self.records])
        self.alpha = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        for edge, w in zip(self.edges, self.alpha.softmax(-1)):
            x = edge(x, w)
        return x


def test_a_record_field_named_like_a_torch_function_costs_no_retrace(monkeypatch):
    """``torch.argmax(w)`` in forward does not make every record's ``argmax`` a read: the optimizer
    rewriting it every step re-traced the model on every call (NASLib GDAS: 20 s a step)."""
    torch.manual_seed(0)
    model = _RecordNet()

    def new_sample(step: int) -> None:
        for record in model.records:
            record.argmax = step + 1

    _assert_steps_keep_the_graph(model, new_sample, 3, monkeypatch)


def test_a_record_field_forward_reads_through_an_alias_is_still_caught(monkeypatch):
    torch.manual_seed(0)
    model = _RecordNet()
    simplified, x, _ = _simplified(model, monkeypatch)
    model.records[1].scale = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(simplified(x), model(x))
